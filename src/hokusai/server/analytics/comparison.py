"""Comparing two model versions on the metrics they recorded, and recommending one by their benchmark metric."""

from __future__ import annotations

import asyncio

from hokusai.server.analytics.schemas import ComparedVersion, Comparison
from hokusai.server.analytics.versions import MetricDirection, ModelReference, VersionFacts, VersionReader
from hokusai.server.errors import InvalidRequest


class ComparisonService:
    def __init__(self, reader: VersionReader, direction: MetricDirection, tolerance: float) -> None:
        self._reader = reader
        self._direction = direction
        self._tolerance = tolerance

    async def compare(
        self, first: str, second: str, metric: str | None = None, tolerance: float | None = None
    ) -> Comparison:
        references = ModelReference.parse(first), ModelReference.parse(second)
        versions = await asyncio.gather(*(self._reader.resolve(reference) for reference in references))
        one, two = await asyncio.gather(*(self._reader.facts(version) for version in versions))
        metrics1, metrics2 = one.metrics(), two.metrics()
        shared = sorted(metrics1.keys() & metrics2.keys())
        delta = {key: metrics2[key] - metrics1[key] for key in shared}
        chosen = self._benchmark_metric(metric, one, two, shared)
        comparison = Comparison(
            model1=_side(one, metrics1),
            model2=_side(two, metrics2),
            delta=delta,
            recommendation="No metric recorded by both versions: nothing to recommend",
            metric=chosen,
            higher_is_better=None,
            better=None,
        )
        if chosen is None:
            return comparison
        before, after = one.benchmark_value(chosen), two.benchmark_value(chosen)
        if before is None or after is None:
            missing = one if before is None else two
            raise InvalidRequest(f"Metric {chosen!r} is not recorded for {missing.reference}")
        gain = self._direction.improvement(chosen, before, after)
        allowed = (self._tolerance if tolerance is None else tolerance) * max(abs(before), abs(after))
        comparison.higher_is_better = not self._direction.lower_is_better(chosen)
        if abs(gain) <= allowed:
            comparison.recommendation = f"Equivalent on {chosen}: keep either version"
        else:
            comparison.better = "model2" if gain > 0 else "model1"
            winner = two if gain > 0 else one
            label = f"version {winner.version}" if one.name == two.name else winner.reference
            comparison.recommendation = f"Use {label}"
        return comparison

    @staticmethod
    def _benchmark_metric(asked: str | None, one: VersionFacts, two: VersionFacts, shared: list[str]) -> str | None:
        """The metric asked for, else the benchmark metric the versions name (with or without a registered value;
        the second version's first), when both have it, else the first shared metric."""
        if asked:
            return asked
        for facts in (two, one):
            named = facts.benchmark_metric()
            if named and named in shared:
                return named
        return shared[0] if shared else None


def _side(facts: VersionFacts, metrics: dict[str, float]) -> ComparedVersion:
    flat = {key: value for key, value in metrics.items() if key not in {"name", "version", "metrics"}}
    return ComparedVersion(name=facts.name, version=facts.version, metrics=metrics, **flat)
