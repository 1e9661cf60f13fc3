"""Request and response bodies of /models/*."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from hokusai.server.registry.inputs import (
    MAX_ALIAS_LENGTH,
    MAX_DESCRIPTION_LENGTH,
    MAX_NAME_LENGTH,
    MAX_TAG_KEY_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    MAX_TAGS_PER_REQUEST,
    canonical_version,
    holdable_name,
    name_problem,
)

Stage = Literal["None", "Staging", "Production", "Archived"]
STAGES: dict[str, Stage] = {stage.lower(): stage for stage in ("None", "Staging", "Production", "Archived")}


class ModelVersionSummary(BaseModel):
    name: str
    version: str
    status: str
    created_at: int = Field(description="Milliseconds since the epoch, as MLflow keeps it")
    tags: dict[str, str]
    stage: Stage
    aliases: list[str]


class ModelList(BaseModel):
    models: list[ModelVersionSummary]
    next_page_token: str | None = None


class ModelVersionDetail(ModelVersionSummary):
    description: str
    source: str
    run_id: str | None
    updated_at: int


def _tag_key(key: str) -> str:
    if not key.strip() or len(key) > MAX_TAG_KEY_LENGTH:
        raise ValueError(f"tag keys must be 1-{MAX_TAG_KEY_LENGTH} characters")
    return key


# Bounded as MLflow's columns are (each tag is one MLflow call, so their number is bounded too).
TagKey = Annotated[str, AfterValidator(_tag_key)]
TagValue = Annotated[str, Field(max_length=MAX_TAG_VALUE_LENGTH)]
Description = Annotated[str, Field(max_length=MAX_DESCRIPTION_LENGTH)]


class ModelVersionUpdate(BaseModel):
    description: Description | None = None
    tags: dict[TagKey, TagValue | None] | None = Field(
        None, max_length=MAX_TAGS_PER_REQUEST, description="Merged into the version's tags; null removes a tag"
    )


def stage_in_any_case(value: object) -> object:
    """`production`, `PRODUCTION` ... -> `Production`; anything else is left for the Literal to refuse (422)."""
    return STAGES.get(value.lower(), value) if isinstance(value, str) else value


AnyCaseStage = Annotated[Stage, BeforeValidator(stage_in_any_case)]


class StageTransition(BaseModel):
    stage: AnyCaseStage
    archive_existing: bool = False


class ProductionModel(BaseModel):
    name: str
    version: str
    stage: Stage
    deployed_at: str = Field(description="When the version entered Production (ISO 8601, UTC)")


class ProductionList(BaseModel):
    models: list[ProductionModel]


class Message(BaseModel):
    message: str


# --- batch ---------------------------------------------------------------------------------------------------

MAX_BATCH_OPERATIONS = 100


class _Operation(BaseModel):
    model: str = Field(max_length=MAX_NAME_LENGTH + 11, description='"name:version"')

    @field_validator("model")
    @classmethod
    def _model_version(cls, model: str) -> str:
        """A name and a version MLflow can hold; the version written canonically (`m:007` -> `m:7`)."""
        name, colon, version = model.rpartition(":")
        number = canonical_version(version)
        if not colon or not name or number is None or not holdable_name(name):
            raise ValueError('expected "name:version" with a positive version number')
        return f"{name}:{number}"

    @property
    def name(self) -> str:
        return self.model.rsplit(":", 1)[0]

    @property
    def version(self) -> str:
        return self.model.rsplit(":", 1)[1]


class TransitionOperation(_Operation):
    action: Literal["transition_stage"]
    stage: AnyCaseStage
    archive_existing: bool = False


class SetTagsOperation(_Operation):
    action: Literal["set_tags"]
    tags: dict[TagKey, TagValue] = Field(min_length=1, max_length=MAX_TAGS_PER_REQUEST)


class DeleteTagsOperation(_Operation):
    action: Literal["delete_tags"]
    keys: list[TagKey] = Field(min_length=1, max_length=MAX_TAGS_PER_REQUEST)


class SetAliasOperation(_Operation):
    action: Literal["set_alias"]
    alias: str = Field(min_length=1, max_length=MAX_ALIAS_LENGTH, pattern=r"^[A-Za-z0-9_-]+$")


class DeleteAliasOperation(_Operation):
    action: Literal["delete_alias"]
    alias: str = Field(min_length=1, max_length=MAX_ALIAS_LENGTH)


class UpdateDescriptionOperation(_Operation):
    action: Literal["update_description"]
    description: Description


class DeleteVersionOperation(_Operation):
    action: Literal["delete_version"]


BatchOperation = Annotated[
    TransitionOperation
    | SetTagsOperation
    | DeleteTagsOperation
    | SetAliasOperation
    | DeleteAliasOperation
    | UpdateDescriptionOperation
    | DeleteVersionOperation,
    Field(discriminator="action"),
]


class BatchRequest(BaseModel):
    operations: list[BatchOperation] = Field(min_length=1, max_length=MAX_BATCH_OPERATIONS)
    stop_on_error: bool = False


class BatchOperationResult(BaseModel):
    """The outcome of one operation of POST /models/batch (dspy's BatchResult is a whole batch's answer)."""

    index: int
    action: str
    model: str
    success: bool
    error: str | None = None
    result: dict | None = None


class BatchResponse(BaseModel):
    total: int
    successful: int
    failed: int
    skipped: int
    results: list[BatchOperationResult]


# --- registration --------------------------------------------------------------------------------------------

# Fixed path segments of /models/*: a model with one of these names could never be addressed.
RESERVED_MODEL_NAMES = frozenset(
    {"compare", "evaluate", "evaluations", "production", "register", "batch", "contributors"}
)


MAX_METADATA_ENTRIES = MAX_TAGS_PER_REQUEST - 2  # model_type and hokusai_model_id are tags too


class RegisterRequest(BaseModel):
    model_data: str = Field(
        min_length=1,
        max_length=1000,
        description="runs:/..., models:/m-..., models:/name/version, mlflow-artifacts:/...",
    )
    model_type: str = Field(min_length=1, max_length=100)
    model_name: str | None = Field(None, min_length=1, max_length=MAX_NAME_LENGTH)
    metadata: dict[TagKey, Any] = Field(
        default_factory=dict,
        max_length=MAX_METADATA_ENTRIES,
        description=f"Becomes the version's tags (each value as text or JSON, at most {MAX_TAG_VALUE_LENGTH} chars)",
    )

    @field_validator("model_name")
    @classmethod
    def _addressable(cls, name: str | None) -> str | None:
        if name is not None:
            if (problem := name_problem(name)) is not None:
                raise ValueError(problem)
            if name.lower() in RESERVED_MODEL_NAMES:
                raise ValueError(f"{name!r} is reserved: it is a fixed segment of /models/*")
        return name

    @field_validator("metadata")
    @classmethod
    def _tag_values(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        for value in metadata.values():
            text = value if isinstance(value, str) else json.dumps(value)
            if len(text) > MAX_TAG_VALUE_LENGTH:
                raise ValueError(f"metadata values are at most {MAX_TAG_VALUE_LENGTH} characters (as text or JSON)")
        return metadata


class RegisterResponse(BaseModel):
    model_id: str
    model_name: str
    version: str
    registration_timestamp: str


# --- analytics -----------------------------------------------------------------------------------------------


class ContributorShare(BaseModel):
    address: str = Field(description="EIP-55 checksum form")
    weight: float


class ComparedVersion(BaseModel):
    """One side of a comparison; every metric also appears at the top level, as in the reference."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    metrics: dict[str, float]


class Comparison(BaseModel):
    model1: ComparedVersion
    model2: ComparedVersion
    delta: dict[str, float] = Field(description="model2 - model1, for every metric both have")
    recommendation: str
    metric: str | None = Field(description="The metric the recommendation follows")
    higher_is_better: bool | None
    better: Literal["model1", "model2"] | None = Field(description="null when equivalent or not comparable")


class PredictRequest(BaseModel):
    inputs: list[dict[str, Any]] | dict[str, list[Any]] = Field(
        description="Records ([{column: value}, ...]) or columns ({column: [values]})"
    )


class PredictResponse(BaseModel):
    model: str
    predictions: list[Any]
    rows: int
    latency_ms: float = Field(description="What the caller waited for, fetching and loading the model included")
    loaded: bool = Field(False, description="The model was loaded (in a worker process) for this call")
    load_ms: float | None = Field(None, description="Time to get a worker and load the model, when it was")


class DateRange(BaseModel):
    start: str
    end: str


class DailyCount(BaseModel):
    date: str
    count: int


class PredictionHistory(BaseModel):
    total_predictions: int = Field(description="Rows predicted (successful calls)")
    total_requests: int
    failed_requests: int
    date_range: DateRange | None
    daily_counts: list[DailyCount]


class ProductionMetrics(BaseModel):
    window_seconds: float
    request_count: int
    prediction_count: int
    error_rate: float | None
    latency_ms: float | None = Field(description="Median latency of successful calls in the window")
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    throughput_rps: float = Field(description="Requests per second over the window")


class VersionMetrics(BaseModel):
    model: str
    training_metrics: dict[str, float]
    validation_metrics: dict[str, float]
    production_metrics: ProductionMetrics
    evaluation_run_id: str | None = None


class DatasetInput(BaseModel):
    name: str
    digest: str
    source_type: str
    source: str
    context: str | None


class VersionLineage(BaseModel):
    model: str
    model_id: str | None
    run_id: str | None
    parents: list[str]
    training_data: list[str]
    datasets: list[DatasetInput]
    experiments: list[str]
    contributors: list[ContributorShare]


class ImprovementStep(BaseModel):
    version: str
    metrics: dict[str, float]
    created_at: str
    contributor: str | None
    contributors: list[ContributorShare]
    parent: str | None
    benchmark_metric: str | None
    improvement: float | None = Field(description="Direction-aware change of the benchmark metric over the parent")


class ImprovementHistory(BaseModel):
    model_id: str
    model_name: str
    lineage: list[ImprovementStep]
    total_versions: int
    latest_version: str


class Contribution(BaseModel):
    model_id: str
    model_name: str
    version: str
    weight: float
    benchmark_metric: str | None
    benchmark_value: float | None
    parent: str | None
    parent_value: float | None
    improvement_score: float = Field(description="Direction-aware improvement over the parent, times the weight")
    contributed_at: str


class ContributorImpact(BaseModel):
    address: str
    total_models_improved: int
    total_improvement_score: float = Field(description="Sum of the positive scores: a regression is never impact")
    total_contributions: int
    contributions: list[Contribution]
    first_contribution: str | None
    last_contribution: str | None
    limit: int
    offset: int


EvaluationMetric = Literal[
    "accuracy", "precision", "recall", "f1_score", "roc_auc", "log_loss", "mse", "rmse", "mae", "r2"
]


class EvaluateRequest(BaseModel):
    model_name: str = Field(min_length=1, max_length=256)
    model_version: str = Field(min_length=1, max_length=32)
    dataset_path: str = Field(min_length=1, max_length=1000)
    metrics: list[EvaluationMetric] = Field(
        default_factory=lambda: ["accuracy", "precision", "recall", "f1_score"], min_length=1
    )
    target_column: str = Field("label", min_length=1, max_length=250)


class Evaluation(BaseModel):
    evaluation_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    model_name: str
    model_version: str
    dataset_path: str
    metrics: dict[str, float] | None = None
    sample_count: int | None = None
    run_id: str | None = None
    duration_seconds: float | None = None
    error: str | None = None
    created_at: str
    finished_at: str | None = None
