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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hokusai.server.errors import InvalidRequest
from hokusai.server.registry.inputs import MAX_ALIAS_LENGTH, filter_literal, holdable_name, is_number
from hokusai.server.registry.mlflow_api import MlflowApi
from hokusai.server.registry.registration import LOGGED_MODEL
from hokusai.server.registry.service import ModelNotFound, quoted, version_number
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
    name: str
    version: str
    raw: dict[str, Any]
    run: dict[str, Any] | None = None
    logged_model: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None  # the latest evaluation run of this version
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def run_id(self) -> str | None:
        return self.raw.get("run_id") or None

    @property
    def logged_model_id(self) -> str | None:
        match = LOGGED_MODEL.match(self.raw.get("source", ""))
        return match.group(1) if match else None

    @property
    def created_at(self) -> datetime:
        return from_millis(self.raw.get("creation_timestamp", 0))

    @property
    def benchmark(self) -> tuple[str, float] | None:
        """The (metric, value) registered together; a metric named without a value is not one (see benchmark_value)."""
        return benchmark_of(self.tags)

    def recorded_metrics(self) -> dict[str, float]:
        """What training recorded: the source run's metrics and the logged model's (which win)."""
        merged = run_metrics(self.run)
        if self.logged_model is not None:
            merged.update(latest_metrics(self.logged_model.get("data", {}).get("metrics", [])))
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


def tags_of(raw: dict[str, Any] | None) -> dict[str, str]:
    return {tag["key"]: tag.get("value", "") for tag in (raw or {}).get("tags", []) or []}


def benchmark_metric_of(tags: dict[str, str]) -> str | None:
    return tags.get(BENCHMARK_METRIC_TAG, "").strip() or None


def benchmark_of(tags: dict[str, str]) -> tuple[str, float] | None:
    """The (metric, value) a version was registered with, when both tags are there and the value is a number."""
    metric, value = benchmark_metric_of(tags), tags.get(BENCHMARK_VALUE_TAG)
    if not metric or value is None:
        return None
    try:
        return metric, float(value)
    except ValueError:
        return None


def latest_metrics(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """The latest value of each key (by step, then timestamp), as MLflow shows a run's metrics."""
    latest: dict[str, tuple[int, int, float]] = {}
    for metric in metrics:
        order = (int(metric.get("step", 0) or 0), int(metric.get("timestamp", 0) or 0))
        value = float(metric.get("value", 0.0))
        if metric["key"] not in latest or order >= latest[metric["key"]][:2]:
            latest[metric["key"]] = (*order, value)
    return {key: value for key, (_, _, value) in latest.items()}


def run_metrics(run: dict[str, Any] | None) -> dict[str, float]:
    return latest_metrics(((run or {}).get("data") or {}).get("metrics", []))


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
    """Reads versions and what hangs off them; every call goes through the one upstream client."""

    def __init__(self, api: MlflowApi, evaluation_experiment: str) -> None:
        self._api = api
        self._evaluation_experiment = evaluation_experiment
        self._evaluation_experiment_id: str | None = None

    async def version(self, name: str, version: str) -> dict[str, Any]:
        version = version_number(name, version)
        found = await self._api(
            "GET",
            "/model-versions/get",
            params={"name": name, "version": version},
            not_found=ModelNotFound(name, version),
        )
        return found["model_version"]

    async def resolve(self, reference: ModelReference) -> dict[str, Any]:
        if reference.version is not None:
            return await self.version(reference.name, reference.version)
        if not holdable_name(reference.name):
            raise ModelNotFound(reference.name, f"@{reference.alias}")
        found = await self._api(
            "GET",
            "/registered-models/alias",
            params={"name": reference.name, "alias": reference.alias or ""},
            not_found=ModelNotFound(reference.name, f"@{reference.alias}"),
        )
        return found["model_version"]

    async def facts(self, raw: dict[str, Any], with_evaluation: bool = True) -> VersionFacts:
        """The version with its run, logged model and latest evaluation, fetched side by side."""
        facts = VersionFacts(name=raw["name"], version=raw["version"], raw=raw, tags=tags_of(raw))
        run, logged, evaluation = await asyncio.gather(
            self.run(facts.run_id),
            self.logged_model(facts.logged_model_id) if facts.logged_model_id else _nothing(),
            self.latest_evaluation(facts.name, facts.version) if with_evaluation else _nothing(),
        )
        facts.run, facts.logged_model, facts.evaluation = run, logged, evaluation
        return facts

    async def run(self, run_id: str | None) -> dict[str, Any] | None:
        """The run, or None when the version names none or it was deleted (a version outlives its run)."""
        if not run_id:
            return None
        found = await self._api(
            "GET", "/runs/get", params={"run_id": run_id}, tolerated=frozenset({"RESOURCE_DOES_NOT_EXIST"})
        )
        return found.get("run")

    async def logged_model(self, model_id: str) -> dict[str, Any] | None:
        found = await self._api(
            "GET", f"/logged-models/{model_id}", tolerated=frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})
        )
        return found.get("model")

    async def facts_of_versions(self, versions: list[dict[str, Any]]) -> dict[str, VersionFacts]:
        """What `facts` gathers, for many versions of one model in a few calls that do not grow with each version:
        the experiments, the runs (500 ids a search), the logged models (500 ids a search, only when a version has
        one) and the evaluations of the model (one search, only when the evaluation experiment exists). Keyed by
        version number."""
        facts = {raw["version"]: VersionFacts(raw["name"], raw["version"], raw, tags=tags_of(raw)) for raw in versions}
        if not facts:
            return facts
        experiments = await self.experiments()
        experiment_ids = [experiment["experiment_id"] for experiment in experiments]
        evaluations_in = next(
            (e["experiment_id"] for e in experiments if e.get("name") == self._evaluation_experiment), None
        )
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

    async def runs(self, run_ids: set[str], experiment_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Many runs in a few calls: every experiment is searched for the ids at once, 500 ids a call."""
        if not run_ids:
            return {}
        experiments = experiment_ids if experiment_ids is not None else await self.experiment_ids()
        found: dict[str, dict[str, Any]] = {}
        ordered = sorted(run_ids)
        for start in range(0, len(ordered), 500):
            chunk = ordered[start : start + 500]
            page_token = None
            while True:
                body = {
                    "experiment_ids": experiments,
                    "filter": f"attributes.run_id IN ({', '.join(quoted(run_id) for run_id in chunk)})",
                    "run_view_type": "ALL",
                    "max_results": 1000,
                }
                if page_token:
                    body["page_token"] = page_token
                page = await self._api("POST", "/runs/search", json=body)
                for run in page.get("runs", []):
                    found[run["info"]["run_id"]] = run
                page_token = page.get("next_page_token")
                if not page_token:
                    break
        return found

    async def logged_models(self, model_ids: set[str], experiment_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Many logged models in a few calls, searched by id in every experiment, 500 ids a call."""
        found: dict[str, dict[str, Any]] = {}
        ordered = sorted(model_ids)
        for start in range(0, len(ordered), 500):
            chunk = ordered[start : start + 500]
            page_token = None
            while True:
                body: dict[str, Any] = {
                    "experiment_ids": experiment_ids,
                    "filter": f"model_id IN ({', '.join(quoted(model_id) for model_id in chunk)})",
                    "max_results": 500,
                }
                if page_token:
                    body["page_token"] = page_token
                page = await self._api("POST", "/logged-models/search", json=body)
                for model in page.get("models", []):
                    found[model["info"]["model_id"]] = model
                page_token = page.get("next_page_token")
                if not page_token:
                    break
        return found

    async def experiment_ids(self) -> list[str]:
        return [experiment["experiment_id"] for experiment in await self.experiments()]

    async def experiments(self) -> list[dict[str, Any]]:
        """Every experiment, deleted ones included (a version outlives its run's experiment), 1,000 a page."""
        found: list[dict[str, Any]] = []
        page_token = None
        while True:
            params = {"max_results": "1000", "view_type": "ALL"}
            if page_token:
                params["page_token"] = page_token
            page = await self._api("GET", "/experiments/search", params=params)
            found += page.get("experiments", [])
            page_token = page.get("next_page_token")
            if not page_token:
                return found

    async def all_versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of a model, oldest first.

        A name no filter literal can hold (both quotes, made straight in MLflow) is found by reading every version:
        slower, but such a model never fails a rebuild or its own lineage.
        """
        literal = filter_literal(name)
        if literal is None:
            versions = [raw async for raw in self.every_version() if raw["name"] == name]
        else:
            versions = [raw async for raw in self.every_version(f"name = {literal}")]
        return sorted(versions, key=lambda v: int(v["version"]))

    async def every_version(self, filter_string: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Versions matching the filter (all of them without one), read 1,000 a page."""
        page_token = None
        while True:
            params = {"max_results": "1000"}
            if filter_string:
                params["filter"] = filter_string
            if page_token:
                params["page_token"] = page_token
            page = await self._api("GET", "/model-versions/search", params=params)
            for raw in page.get("model_versions", []):
                yield raw
            page_token = page.get("next_page_token")
            if not page_token:
                return

    async def evaluation_experiment_id(self, create: bool = False) -> str | None:
        if self._evaluation_experiment_id is None:
            found = await self._api(
                "GET",
                "/experiments/get-by-name",
                params={"experiment_name": self._evaluation_experiment},
                tolerated=frozenset({"RESOURCE_DOES_NOT_EXIST"}),
            )
            if "experiment" in found:
                self._evaluation_experiment_id = found["experiment"]["experiment_id"]
            elif create:
                created = await self._api(
                    "POST",
                    "/experiments/create",
                    json={"name": self._evaluation_experiment},
                    tolerated=frozenset({"RESOURCE_ALREADY_EXISTS"}),
                )
                if "experiment_id" not in created:  # created by another request meanwhile
                    return await self.evaluation_experiment_id()
                self._evaluation_experiment_id = created["experiment_id"]
        return self._evaluation_experiment_id

    async def latest_evaluation(self, name: str, version: str) -> dict[str, Any] | None:
        experiment_id = await self.evaluation_experiment_id()
        literal = filter_literal(name)
        if experiment_id is None or literal is None:  # no filter can name a model with both quotes: none found
            return None
        page = await self._api(
            "POST",
            "/runs/search",
            json={
                "experiment_ids": [experiment_id],
                "filter": f"tags.{EVALUATED_MODEL_TAG} = {literal} AND tags.{EVALUATED_VERSION_TAG} = '{version}'",
                "order_by": ["attributes.start_time DESC"],
                "max_results": 1,
            },
        )
        runs = page.get("runs", [])
        return runs[0] if runs else None

    async def latest_evaluations(
        self, names: set[str], experiment_id: str | None
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """The latest evaluation run of every evaluated version of the models, keyed by (name, version): one search
        per model (1,000 runs a page), newest first, as latest_evaluation finds them one at a time."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        if experiment_id is None:
            return found
        for name in sorted(names):
            literal = filter_literal(name)
            if literal is None:
                continue
            page_token = None
            while True:
                body: dict[str, Any] = {
                    "experiment_ids": [experiment_id],
                    "filter": f"tags.{EVALUATED_MODEL_TAG} = {literal}",
                    "order_by": ["attributes.start_time DESC"],
                    "max_results": 1000,
                }
                if page_token:
                    body["page_token"] = page_token
                page = await self._api("POST", "/runs/search", json=body)
                for run in page.get("runs", []):
                    version = tags_of(run.get("data")).get(EVALUATED_VERSION_TAG)
                    if version is not None:
                        found.setdefault((name, version), run)
                page_token = page.get("next_page_token")
                if not page_token:
                    break
        return found


async def _nothing() -> None:
    return None
