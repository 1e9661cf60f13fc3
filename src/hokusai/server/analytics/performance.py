"""What a version measured: training and validation metrics from its runs, production metrics from its predictions.

Run metrics are sorted by their prefix: `train_`/`training_` are training metrics, `val_`/`validation_`/`eval_` are
validation metrics (shown without the prefix); an unprefixed metric of the source run describes the training run. The
latest evaluation run (POST /models/evaluate) adds to, and wins over, the validation metrics.
"""

from __future__ import annotations

import asyncio

from hokusai.server.analytics.predictions import PredictionStore
from hokusai.server.analytics.schemas import VersionMetrics
from hokusai.server.analytics.versions import VersionReader, run_metrics

TRAINING_PREFIXES = ("training_", "train_")
VALIDATION_PREFIXES = ("validation_", "val_", "eval_")


def split_by_prefix(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(training, validation); a prefixed metric wins over an unprefixed one of the same name."""
    training: dict[str, float] = {}
    validation: dict[str, float] = {}
    plain: dict[str, float] = {}
    for key, value in metrics.items():
        if prefix := next((p for p in TRAINING_PREFIXES if key.startswith(p) and len(key) > len(p)), None):
            training[key.removeprefix(prefix)] = value
        elif prefix := next((p for p in VALIDATION_PREFIXES if key.startswith(p) and len(key) > len(p)), None):
            validation[key.removeprefix(prefix)] = value
        else:
            plain[key] = value
    return {**plain, **training}, validation


class PerformanceService:
    def __init__(self, reader: VersionReader, predictions: PredictionStore, window_seconds: float) -> None:
        self._reader = reader
        self._predictions = predictions
        self._window_seconds = window_seconds

    async def metrics(self, name: str, version: str) -> VersionMetrics:
        found = await self._reader.version(name, version)
        facts, production = await asyncio.gather(
            self._reader.facts(found),
            self._predictions.production_metrics(found.name, found.version, self._window_seconds),
        )
        recorded = facts.recorded_metrics()
        training, validation = split_by_prefix(recorded)
        validation.update(split_by_prefix(run_metrics(facts.evaluation))[1])
        return VersionMetrics(
            model=facts.reference,
            training_metrics=training,
            validation_metrics=validation,
            production_metrics=production,
            evaluation_run_id=facts.evaluation.run_id if facts.evaluation else None,
        )
