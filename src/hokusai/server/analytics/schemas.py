"""Request and response bodies of the analytics routes (compare, evaluate, predict, metrics, lineage, impact)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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


class RankedContributor(BaseModel):
    """One address of the leaderboard, with the figures of its impact (/models/contributors/{address}/impact)."""

    rank: int = Field(description="1-based position over the whole ranking (ties: address ascending)")
    address: str
    total_improvement_score: float = Field(description="Sum of the positive scores, as the impact computes it")
    total_contributions: int
    total_models_improved: int
    models_improved: list[str] = Field(description="Models where the address's summed score is above 0, by name")
    first_contribution: str
    last_contribution: str


class ContributorLeaderboard(BaseModel):
    contributors: list[RankedContributor]
    total: int = Field(description="Addresses with at least one contribution")
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
