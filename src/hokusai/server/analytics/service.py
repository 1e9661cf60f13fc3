"""ModelAnalytics: the services behind compare, evaluate, metrics, predictions, lineage and contributor impact."""

from __future__ import annotations

from dataclasses import dataclass

from hokusai.server.analytics.comparison import ComparisonService
from hokusai.server.analytics.contributors import ContributionStore
from hokusai.server.analytics.evaluation import EvaluationService
from hokusai.server.analytics.impact import ImpactService
from hokusai.server.analytics.lineage import LineageService
from hokusai.server.analytics.performance import PerformanceService
from hokusai.server.analytics.predictions import PredictionService, PredictionStore
from hokusai.server.analytics.versions import MetricDirection, VersionReader
from hokusai.server.config import Settings
from hokusai.server.db import Database
from hokusai.server.events.outbox import EventOutbox
from hokusai.server.mlflow.registry_client import RegistryClient
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.models.files import ModelFiles
from hokusai.server.models.pool import ModelWorkerPool, WorkerLimits


@dataclass
class ModelAnalytics:
    comparisons: ComparisonService
    evaluations: EvaluationService
    performance: PerformanceService
    predictions: PredictionService
    lineage: LineageService
    impact: ImpactService
    model_files: ModelFiles
    model_workers: ModelWorkerPool

    @classmethod
    def build(
        cls, settings: Settings, upstream: MlflowUpstream, database: Database, outbox: EventOutbox
    ) -> ModelAnalytics:
        """The analytics over one MLflow and one database; `outbox` takes the events its records announce
        (contribution.recorded, model_version.improved, evaluation.completed/failed), each in the record's
        transaction."""
        reader = VersionReader(RegistryClient.over(upstream), settings.evaluation_experiment)
        direction = MetricDirection(settings.lower_is_better)
        lineage = LineageService(reader, database, direction)
        cache_dir = settings.home / "model-cache"
        workers = ModelWorkerPool(
            settings.model_workers,
            cache_dir,
            settings.home,
            WorkerLimits(
                memory_bytes=settings.model_worker_memory_bytes,
                call_timeout=settings.model_call_timeout,
                load_timeout=settings.model_load_timeout,
                user=settings.model_worker_user,
                network=settings.model_worker_network,
            ),
            spare_workers=settings.model_spare_workers,
        )
        files = ModelFiles(upstream, cache_dir, settings.model_cache_max_bytes, in_use=workers.loaded_directories)
        prediction_store = PredictionStore(database)
        return cls(
            comparisons=ComparisonService(reader, direction, settings.compare_tolerance),
            evaluations=EvaluationService(
                upstream,
                database,
                reader,
                files,
                workers,
                settings.datasets_root,
                settings.evaluation_sync_max_bytes,
                lease_seconds=settings.evaluation_lease_seconds,
                outbox=outbox,
            ),
            performance=PerformanceService(reader, prediction_store, settings.production_metrics_window),
            predictions=PredictionService(
                files, workers, prediction_store, settings.prediction_max_rows, prefetch=settings.model_prefetch
            ),
            lineage=lineage,
            impact=ImpactService(
                reader, lineage, ContributionStore(database, outbox), direction, settings.improvement_threshold
            ),
            model_files=files,
            model_workers=workers,
        )

    async def start(self) -> None:
        await self.model_workers.start()
        await self.evaluations.start()

    async def aclose(self) -> None:
        await self.evaluations.aclose()
        await self.model_files.aclose()
        await self.model_workers.aclose()
