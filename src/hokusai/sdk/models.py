"""Typed results of the SDK: plain dataclasses built from the server's JSON (fields the server adds later are
ignored, so an older SDK keeps working against a newer server)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

Result = TypeVar("Result")


def build(cls: type[Result], data: Any) -> Result:
    """`cls` (a dataclass, or list[...] / dict[str, ...] of one) from decoded JSON."""
    return _convert(cls, data)


def _convert(kind: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(kind) if option is not type(None)]
        return _convert(options[0], value) if len(options) == 1 else value
    if origin is list:
        return [_convert(typing.get_args(kind)[0], item) for item in value]
    if origin is dict:
        return {key: _convert(typing.get_args(kind)[1], item) for key, item in value.items()}
    if dataclasses.is_dataclass(kind) and isinstance(value, dict):
        hints = typing.get_type_hints(kind)
        known = {f.name for f in dataclasses.fields(kind)}
        return kind(**{name: _convert(hints[name], item) for name, item in value.items() if name in known})
    return value


# --- models --------------------------------------------------------------------------------------------------


@dataclass
class ModelVersion:
    name: str
    version: str
    status: str = "READY"
    created_at: int = 0  # milliseconds since the epoch
    tags: dict[str, str] = field(default_factory=dict)
    stage: str = "None"
    aliases: list[str] = field(default_factory=list)


@dataclass
class ModelVersionDetail(ModelVersion):
    description: str = ""
    source: str = ""
    run_id: str | None = None
    updated_at: int = 0


@dataclass
class ModelPage:
    models: list[ModelVersion]
    next_page_token: str | None = None


@dataclass
class Registration:
    model_id: str
    model_name: str
    version: str
    registration_timestamp: str


@dataclass
class BatchOperationResult:
    index: int
    action: str
    model: str
    success: bool
    error: str | None = None
    result: dict[str, Any] | None = None


@dataclass
class BatchResult:
    total: int
    successful: int
    failed: int
    skipped: int
    results: list[BatchOperationResult]


@dataclass
class ProductionModel:
    name: str
    version: str
    stage: str
    deployed_at: str


@dataclass
class ProductionModels:
    models: list[ProductionModel]


@dataclass
class ComparedVersion:
    name: str
    version: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Comparison:
    model1: ComparedVersion
    model2: ComparedVersion
    delta: dict[str, float]
    recommendation: str
    metric: str | None = None
    higher_is_better: bool | None = None
    better: str | None = None


@dataclass
class Evaluation:
    evaluation_id: str
    status: str
    model_name: str
    model_version: str
    dataset_path: str
    metrics: dict[str, float] | None = None
    sample_count: int | None = None
    run_id: str | None = None
    duration_seconds: float | None = None
    error: str | None = None
    created_at: str | None = None
    finished_at: str | None = None


@dataclass
class ProductionMetrics:
    window_seconds: float
    request_count: int
    prediction_count: int
    throughput_rps: float
    error_rate: float | None = None
    latency_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None


@dataclass
class VersionMetrics:
    model: str
    training_metrics: dict[str, float]
    validation_metrics: dict[str, float]
    production_metrics: ProductionMetrics
    evaluation_run_id: str | None = None


@dataclass
class DatasetInput:
    name: str
    digest: str
    source_type: str
    source: str
    context: str | None = None


@dataclass
class ContributorShare:
    address: str
    weight: float


@dataclass
class VersionLineage:
    model: str
    parents: list[str]
    training_data: list[str]
    experiments: list[str]
    model_id: str | None = None
    run_id: str | None = None
    datasets: list[DatasetInput] = field(default_factory=list)
    contributors: list[ContributorShare] = field(default_factory=list)


@dataclass
class ImprovementStep:
    version: str
    metrics: dict[str, float]
    created_at: str
    contributor: str | None = None
    contributors: list[ContributorShare] = field(default_factory=list)
    parent: str | None = None
    benchmark_metric: str | None = None
    improvement: float | None = None


@dataclass
class ImprovementHistory:
    model_id: str
    lineage: list[ImprovementStep]
    total_versions: int
    latest_version: str
    model_name: str | None = None


@dataclass
class Prediction:
    model: str
    predictions: list[Any]
    rows: int
    latency_ms: float


@dataclass
class DateRange:
    start: str
    end: str


@dataclass
class DailyCount:
    date: str
    count: int


@dataclass
class PredictionHistory:
    total_predictions: int
    daily_counts: list[DailyCount]
    date_range: DateRange | None = None
    total_requests: int = 0
    failed_requests: int = 0


@dataclass
class Contribution:
    model_id: str
    improvement_score: float
    contributed_at: str
    model_name: str | None = None
    version: str | None = None
    weight: float = 1.0
    benchmark_metric: str | None = None
    benchmark_value: float | None = None
    parent: str | None = None
    parent_value: float | None = None


@dataclass
class ContributorImpact:
    address: str
    total_models_improved: int
    total_improvement_score: float
    contributions: list[Contribution]
    first_contribution: str | None = None
    last_contribution: str | None = None
    total_contributions: int = 0
    limit: int = 100
    offset: int = 0


@dataclass
class RankedContributor:
    rank: int  # 1-based over the whole ranking
    address: str
    total_improvement_score: float
    total_contributions: int = 0
    total_models_improved: int = 0
    models_improved: list[str] = field(default_factory=list)
    first_contribution: str | None = None
    last_contribution: str | None = None


@dataclass
class ContributorLeaderboard:
    contributors: list[RankedContributor]
    total: int = 0  # addresses ranked, over every page
    limit: int = 50
    offset: int = 0


# --- DSPy ----------------------------------------------------------------------------------------------------


@dataclass
class SignatureInfo:
    input_fields: list[str]
    output_fields: list[str]
    signature: str = ""
    field_types: dict[str, str] = field(default_factory=dict)


@dataclass
class Program:
    program_id: str
    name: str
    version: str
    signatures: list[SignatureInfo]
    description: str = ""
    module: str = ""
    instructions: str = ""
    demos: list[dict[str, Any]] = field(default_factory=list)
    lm: dict[str, Any] | None = None
    source: str = "declared"
    model_uri: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


@dataclass
class ExecutionResult:
    execution_id: str
    success: bool
    execution_time: float
    program_name: str
    outputs: dict[str, Any] | None = None
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchExecution:
    batch_id: str
    total: int
    successful: int
    failed: int
    results: list[ExecutionResult]
    execution_time: float = 0.0


@dataclass
class ExecutionRecord:
    execution_id: str
    program_id: str
    program_version: str
    mode: str
    success: bool
    execution_time: float
    started_at: str
    batch_id: str | None = None
    error: str | None = None
    error_type: str | None = None
    input_bytes: int = 0
    output_bytes: int = 0
    inputs: dict[str, Any] | None = None
    outputs: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None


@dataclass
class ProgramStatistics:
    total_executions: int
    successful_executions: int = 0
    success_rate: float | None = None
    average_execution_time: float | None = None
    p95_execution_time: float | None = None


@dataclass
class Statistics(ProgramStatistics):
    per_program: dict[str, ProgramStatistics] = field(default_factory=dict)


@dataclass
class DSPyStats:
    statistics: Statistics
    cache_enabled: bool
    mlflow_tracking: bool
    language_model: str | None = None


@dataclass
class DSPyHealth:
    status: str
    total_executions: int
    success_rate: float | None = None
    language_model: str | None = None
    detail: str | None = None
    programs: int = 0


@dataclass
class Message:
    message: str
