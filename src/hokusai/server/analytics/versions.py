"""What MLflow knows about one model version, gathered for the analytics: its run, logged model, evaluations and
benchmark, and which way each metric should move.

A version's metrics are, in increasing precedence: its source run's metrics, its logged model's metrics (the
latest value of each key), the metrics of its latest evaluation run (`eval_*`), and the benchmark the version was
registered with (`benchmark_value` under the `benchmark_metric` name).

A version's benchmark is the metric its `benchmark_metric` tag names, valued by `benchmark_value` when it was
registered with one, else by its own metric of that name (above). `benchmark_step` is the one place that measures a
version against its parent: impact, compare and the improvement history all go through it, so they agree.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime

from hokusai.server.errors import InvalidRequest
from hokusai.server.mlflow.registry_client import (
    LoggedModel,
    MlflowApi,
    ModelVersion,
    RegistryClient,
    Run,
    filter_literal,
    version_number,
)
from hokusai.server.registry.inputs import MAX_ALIAS_LENGTH, is_number
from hokusai.server.timestamps import from_millis

BENCHMARK_METRIC_TAG = "benchmark_metric"
BENCHMARK_VALUE_TAG = "benchmark_value"
# Tags of evaluation runs naming the version they measured (no dots: MLflow filters would need backquotes).
EVALUATED_MODEL_TAG = "hokusai_evaluated_model"
EVALUATED_VERSION_TAG = "hokusai_evaluated_version"
EVALUATION_PREFIX = "eval_"
REFERENCE_FORMAT = "a model reference must be Name:Version or Name@alias"


class InvalidReference(InvalidRequest):
    def __init__(self, reference: str) -> None:
        super().__init__(f"Invalid model reference {reference!r}: {REFERENCE_FORMAT}")


@dataclass(frozen=True)
class ModelReference:
    name: str
    version: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, reference: str) -> ModelReference:
        """`Name:Version` or `Name@alias`; the last separator counts, so names may contain the other one."""
        reference = reference.strip()
        name, colon, version = reference.rpartition(":")
        if colon and name and is_number(version):
            return cls(name=name, version=version)
        name, at, alias = reference.rpartition("@")
        if at and name and len(alias) <= MAX_ALIAS_LENGTH and re.fullmatch(r"[A-Za-z0-9_-]+", alias):
            return cls(name=name, alias=alias)
        raise InvalidReference(reference)


@dataclass
class VersionFacts:
    model_version: ModelVersion
    run: Run | None = None
    logged_model: LoggedModel | None = None
    evaluation: Run | None = None  # the latest evaluation run of this version

    @property
    def name(self) -> str:
        return self.model_version.name

    @property
    def version(self) -> str:
        return self.model_version.version

    @property
    def tags(self) -> Mapping[str, str]:
        return self.model_version.tags

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def run_id(self) -> str | None:
        return self.model_version.run_id

    @property
    def logged_model_id(self) -> str | None:
        return self.model_version.logged_model_id

    @property
    def created_at(self) -> datetime:
        return from_millis(self.model_version.created_ms)

    @property
    def benchmark(self) -> tuple[str, float] | None:
        """The (metric, value) registered together; a metric named without a value is not one (see benchmark_value)."""
        return benchmark_of(self.tags)

    def recorded_metrics(self) -> dict[str, float]:
        """What training recorded: the source run's metrics and the logged model's (which win)."""
        merged = run_metrics(self.run)
        if self.logged_model is not None:
            merged.update(self.logged_model.metrics)
        return merged

    def metrics(self) -> dict[str, float]:
        merged = self.recorded_metrics()
        merged.update(run_metrics(self.evaluation))
        if self.benchmark is not None:
            merged[self.benchmark[0]] = self.benchmark[1]
        return merged

    def benchmark_metric(self) -> str | None:
        """The metric the version names as its benchmark, with or without a registered value."""
        return benchmark_metric_of(self.tags)

    def benchmark_value(self, metric: str | None = None) -> float | None:
        """The version's value of `metric` (by default its benchmark metric): `benchmark_value` when it was registered
        for that metric, else its own metric of that name (latest evaluation, logged model, source run); None when it
        has none."""
        metric = metric or self.benchmark_metric()
        return self.metrics().get(metric) if metric else None


@dataclass(frozen=True)
class BenchmarkStep:
    """A version measured against its parent on one metric; improvement is None when a side has no value."""

    metric: str | None
    value: float | None
    parent_value: float | None
    improvement: float | None


def benchmark_step(
    facts: VersionFacts,
    parent: VersionFacts | None,
    direction: MetricDirection,
    fallback_metric: str | None = None,
) -> BenchmarkStep:
    """The version's benchmark metric (else its parent's, else `fallback_metric`) on both sides, and the
    direction-aware change (positive = better)."""
    metric = facts.benchmark_metric() or (parent.benchmark_metric() if parent else None) or fallback_metric
    if metric is None:
        return BenchmarkStep(None, None, None, None)
    value = facts.benchmark_value(metric)
    parent_value = parent.benchmark_value(metric) if parent is not None else None
    improvement = None
    if value is not None and parent_value is not None:
        improvement = direction.improvement(metric, parent_value, value)
    return BenchmarkStep(metric, value, parent_value, improvement)


def benchmark_metric_of(tags: Mapping[str, str]) -> str | None:
    return tags.get(BENCHMARK_METRIC_TAG, "").strip() or None


def benchmark_of(tags: Mapping[str, str]) -> tuple[str, float] | None:
    """The (metric, value) a version was registered with, when both tags are there and the value is a number."""
    metric, value = benchmark_metric_of(tags), tags.get(BENCHMARK_VALUE_TAG)
    if not metric or value is None:
        return None
    try:
        return metric, float(value)
    except ValueError:
        return None


def run_metrics(run: Run | None) -> dict[str, float]:
    return dict(run.metrics) if run is not None else {}


class MetricDirection:
    """Which way is better for a metric: lower when a part of its name is a loss/error/latency kind."""

    def __init__(self, lower_is_better: frozenset[str]) -> None:
        self._patterns = [_name_parts(kind) for kind in lower_is_better]

    def lower_is_better(self, metric: str) -> bool:
        parts = _name_parts(metric)
        return any(
            parts[start : start + len(pattern)] == pattern
            for pattern in self._patterns
            for start in range(len(parts) - len(pattern) + 1)
        )

    def improvement(self, metric: str, before: float, after: float) -> float:
        """Positive when `after` is better than `before`, negative for a regression."""
        return before - after if self.lower_is_better(metric) else after - before


def _name_parts(name: str) -> list[str]:
    return [part for part in re.split(r"[^a-z0-9]+", name.lower()) if part]


class VersionReader:
    """Reads versions and what hangs off them, through the one typed MLflow client."""

    def __init__(self, mlflow: RegistryClient | MlflowApi, evaluation_experiment: str) -> None:
        """`mlflow`: the client, or the call it is built on (tests count calls there)."""
        self._mlflow = mlflow if isinstance(mlflow, RegistryClient) else RegistryClient(mlflow)
        self._evaluation_experiment = evaluation_experiment
        self._evaluation_experiment_id: str | None = None

    @property
    def mlflow(self) -> RegistryClient:
        return self._mlflow

    async def version(self, name: str, version: str) -> ModelVersion:
        return await self._mlflow.get_version(name, version_number(name, version))

    async def resolve(self, reference: ModelReference) -> ModelVersion:
        if reference.version is not None:
            return await self.version(reference.name, reference.version)
        return await self._mlflow.version_by_alias(reference.name, reference.alias or "")

    async def facts(self, version: ModelVersion, with_evaluation: bool = True) -> VersionFacts:
        """The version with its run, logged model and latest evaluation, fetched side by side."""
        facts = VersionFacts(version)
        run, logged, evaluation = await asyncio.gather(
            self.run(facts.run_id),
            self._mlflow.logged_model(facts.logged_model_id) if facts.logged_model_id else _nothing(),
            self.latest_evaluation(facts.name, facts.version) if with_evaluation else _nothing(),
        )
        facts.run, facts.logged_model, facts.evaluation = run, logged, evaluation
        return facts

    async def run(self, run_id: str | None) -> Run | None:
        """The run, or None when the version names none or it was deleted (a version outlives its run)."""
        return await self._mlflow.run(run_id) if run_id else None

    async def facts_of_versions(self, versions: list[ModelVersion]) -> dict[str, VersionFacts]:
        """What `facts` gathers, for many versions of one model in a few calls that do not grow with each version:
        the experiments, the runs (500 ids a search), the logged models (500 ids a search, only when a version has
        one) and the evaluations of the model (one search, only when the evaluation experiment exists). Keyed by
        version number."""
        facts = {version.version: VersionFacts(version) for version in versions}
        if not facts:
            return facts
        experiments = await self._mlflow.experiments()
        experiment_ids = [experiment.experiment_id for experiment in experiments]
        evaluations_in = next((e.experiment_id for e in experiments if e.name == self._evaluation_experiment), None)
        if evaluations_in is not None:
            self._evaluation_experiment_id = evaluations_in
        runs, logged, evaluations = await asyncio.gather(
            self.runs({f.run_id for f in facts.values() if f.run_id}, experiment_ids),
            self.logged_models({f.logged_model_id for f in facts.values() if f.logged_model_id}, experiment_ids),
            self.latest_evaluations({f.name for f in facts.values()}, evaluations_in),
        )
        for one in facts.values():
            one.run = runs.get(one.run_id or "")
            one.logged_model = logged.get(one.logged_model_id or "")
            one.evaluation = evaluations.get((one.name, one.version))
        return facts

    async def runs(self, run_ids: set[str], experiment_ids: list[str] | None = None) -> dict[str, Run]:
        """Many runs in a few calls: every experiment is searched for the ids at once, 500 ids a call."""
        if not run_ids:
            return {}
        experiments = experiment_ids if experiment_ids is not None else await self.experiment_ids()
        return await self._mlflow.runs(run_ids, experiments)

    async def logged_models(self, model_ids: set[str], experiment_ids: list[str]) -> dict[str, LoggedModel]:
        """Many logged models in a few calls, searched by id in every experiment, 500 ids a call."""
        return await self._mlflow.logged_models(model_ids, experiment_ids)

    async def experiment_ids(self) -> list[str]:
        return [experiment.experiment_id for experiment in await self._mlflow.experiments()]

    async def all_versions(self, name: str) -> list[ModelVersion]:
        """Every version of a model, oldest first (a name no filter can hold included: see `every_version`)."""
        versions = [version async for version in self._mlflow.every_version(name)]
        return sorted(versions, key=lambda v: int(v.version))

    def every_version(self) -> AsyncIterator[ModelVersion]:
        """Every version in MLflow, read 1,000 a page."""
        return self._mlflow.every_version()

    async def evaluation_experiment_id(self, create: bool = False) -> str | None:
        if self._evaluation_experiment_id is None:
            found = await self._mlflow.experiment_id(self._evaluation_experiment)
            if found is not None:
                self._evaluation_experiment_id = found
            elif create:
                created = await self._mlflow.create_experiment(self._evaluation_experiment)
                if created is None:  # created by another request meanwhile
                    return await self.evaluation_experiment_id()
                self._evaluation_experiment_id = created
        return self._evaluation_experiment_id

    async def latest_evaluation(self, name: str, version: str) -> Run | None:
        experiment_id = await self.evaluation_experiment_id()
        literal = filter_literal(name)
        if experiment_id is None or literal is None:  # no filter can name a model with both quotes: none found
            return None
        page = await self._mlflow.search_runs_page(
            [experiment_id],
            f"tags.{EVALUATED_MODEL_TAG} = {literal} AND tags.{EVALUATED_VERSION_TAG} = '{version}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return page.runs[0] if page.runs else None

    async def latest_evaluations(self, names: set[str], experiment_id: str | None) -> dict[tuple[str, str], Run]:
        """The latest evaluation run of every evaluated version of the models, keyed by (name, version): one search
        per model (1,000 runs a page), newest first, as latest_evaluation finds them one at a time."""
        found: dict[tuple[str, str], Run] = {}
        if experiment_id is None:
            return found
        for name in sorted(names):
            literal = filter_literal(name)
            if literal is None:
                continue
            runs = self._mlflow.search_runs(
                [experiment_id], f"tags.{EVALUATED_MODEL_TAG} = {literal}", order_by=["attributes.start_time DESC"]
            )
            async for run in runs:
                version = run.tags.get(EVALUATED_VERSION_TAG)
                if version is not None:
                    found.setdefault((name, version), run)
        return found


async def _nothing() -> None:
    return None
