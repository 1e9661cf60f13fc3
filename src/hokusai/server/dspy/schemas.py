"""Request and response bodies of /api/v1/dspy/*."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hokusai.server.dspy.signatures import MAX_SIGNATURE_LENGTH

ModuleKind = Literal["Predict", "ChainOfThought"]
Mode = Literal["normal", "dry_run", "debug"]
PROGRAM_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class ProgramLM(BaseModel):
    """A program's own model on the service's LM server. No API base of its own: the service's API key would be
    sent wherever a program author pointed it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="Model name, e.g. openai/my-model")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)


class ProgramDeclaration(BaseModel):
    program_id: str = Field(pattern=PROGRAM_ID)
    name: str = Field(min_length=1, max_length=256)
    version: str = Field("1.0.0", pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
    description: str = Field("", max_length=5000)
    module: ModuleKind = "Predict"
    signature: str | None = Field(
        None, max_length=MAX_SIGNATURE_LENGTH, description="One predictor's signature: 'a, b -> c'"
    )
    signatures: list[Annotated[str, Field(max_length=MAX_SIGNATURE_LENGTH)]] | None = Field(
        None, min_length=1, max_length=1, description="One signature per predictor (the module kinds have one)"
    )
    instructions: str = Field("", max_length=20_000)
    demos: list[dict[str, Any]] = Field(default_factory=list, max_length=100)
    lm: ProgramLM | None = None
    source: str | None = Field(
        None,
        pattern=r"^models:/[^/]+/[1-9][0-9]*$",
        description="models:/<name>/<version> of an mlflow.dspy model (a pickle: refused unless allowed)",
    )

    @model_validator(mode="after")
    def _one_way_to_give_the_program(self) -> ProgramDeclaration:
        given = [self.signature is not None, self.signatures is not None, self.source is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of `signature`, `signatures` or `source`")
        return self

    @property
    def signature_list(self) -> list[str]:
        return self.signatures if self.signatures is not None else [self.signature or ""]


class SignatureView(BaseModel):
    signature: str
    input_fields: list[str]
    output_fields: list[str]
    field_types: dict[str, str]


class ProgramView(BaseModel):
    program_id: str
    name: str
    version: str
    description: str
    module: str
    signatures: list[SignatureView]
    instructions: str
    demos: list[dict[str, Any]]
    lm: ProgramLM | None = None
    source: Literal["declared", "trusted", "pickled"] = "declared"
    model_uri: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


class ExecuteRequest(BaseModel):
    program_id: str = Field(min_length=1, max_length=128)
    version: str | None = Field(None, max_length=64, description="Default: the latest registered version")
    inputs: dict[str, Any]
    mode: Mode = "normal"
    timeout: float | None = Field(None, gt=0, description="Seconds; capped by HOKUSAI_DSPY_MAX_TIMEOUT")


class ExecutionResult(BaseModel):
    execution_id: str
    success: bool
    outputs: dict[str, Any] | None
    error: str | None
    execution_time: float = Field(description="Seconds")
    program_name: str
    metadata: dict[str, Any]


class BatchExecuteRequest(BaseModel):
    program_id: str = Field(min_length=1, max_length=128)
    version: str | None = Field(None, max_length=64)
    inputs_list: list[dict[str, Any]] = Field(min_length=1)
    mode: Mode = "normal"
    timeout: float | None = Field(None, gt=0, description="Seconds per item")


class BatchResult(BaseModel):
    batch_id: str
    total: int
    successful: int
    failed: int
    execution_time: float
    results: list[ExecutionResult]


class ExecutionRecord(BaseModel):
    execution_id: str
    program_id: str
    program_version: str
    batch_id: str | None
    mode: str
    success: bool
    error: str | None
    error_type: str | None
    execution_time: float
    input_bytes: int
    output_bytes: int
    inputs: dict[str, Any] | None
    outputs: dict[str, Any] | None
    usage: dict[str, Any] | None
    started_at: str


class ProgramStatistics(BaseModel):
    total_executions: int
    successful_executions: int
    success_rate: float | None
    average_execution_time: float | None
    p95_execution_time: float | None


class Statistics(ProgramStatistics):
    per_program: dict[str, ProgramStatistics]


class StatsResponse(BaseModel):
    statistics: Statistics
    cache_enabled: bool
    mlflow_tracking: bool
    language_model: str | None


class DspyHealth(BaseModel):
    status: Literal["healthy", "unconfigured"]
    total_executions: int
    success_rate: float | None
    language_model: str | None
    detail: str | None = None
    programs: int


class Message(BaseModel):
    message: str


class CacheCleared(Message):
    """Beyond the reference's `message`: how far the clear went (each service process keeps its own caches)."""

    processes_reached: int
    warning: str | None = None  # present when other processes may exist and were not reached
