"""Lineage of a version (parents, training data, experiments) and the improvement history of a whole model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

from sqlalchemy import select

from hokusai.server.analytics.contributors import contributors_in_tags
from hokusai.server.analytics.schemas import (
    DatasetInput,
    ImprovementHistory,
    ImprovementStep,
    VersionLineage,
)
from hokusai.server.analytics.versions import (
    MetricDirection,
    ModelReference,
    VersionFacts,
    VersionReader,
    benchmark_step,
)
from hokusai.server.db import Database
from hokusai.server.errors import InvalidRequest, NotFound
from hokusai.server.mlflow.registry_client import ModelVersion, Run
from hokusai.server.registry.inputs import canonical_version, holdable_name
from hokusai.server.registry.models import ModelIdRow
from hokusai.server.timestamps import from_millis, iso

PARENT_VERSION_TAG = "parent_version"
BASELINE_MODEL_TAG = "baseline_model_id"
BASELINE_VERSION_TAG = "baseline_version"
TRAINING_DATA_TAG = "training_data"


class ModelNotRegistered(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(f"Model not found: {model}")


class LineageService:
    def __init__(self, reader: VersionReader, database: Database, direction: MetricDirection) -> None:
        self._reader = reader
        self._database = database
        self._direction = direction

    async def model_name(self, model_id: str) -> str:
        """A stable model id (`mdl_...`) as the service assigned it, or a model name as it is."""
        if not holdable_name(model_id):  # no row can have it (and PostgreSQL cannot bind a NUL)
            return model_id
        async with self._database.session() as session:
            name = await session.scalar(select(ModelIdRow.name).where(ModelIdRow.model_id == model_id))
        return name or model_id

    async def model_id(self, name: str) -> str | None:
        if not holdable_name(name):
            return None
        async with self._database.session() as session:
            return await session.scalar(select(ModelIdRow.model_id).where(ModelIdRow.name == name))

    async def parent(self, version: ModelVersion, siblings: list[ModelVersion] | None = None) -> tuple[str, str] | None:
        """The version this one improves on: named by its tags, else the previous version of the same model."""
        named = await self._named_parent(version.name, version.tags)
        if named is not None:
            return named
        if siblings is None:
            siblings = await self._reader.all_versions(version.name)
        earlier = [int(v.version) for v in siblings if int(v.version) < int(version.version)]
        return (version.name, str(max(earlier))) if earlier else None

    async def _named_parent(self, name: str, tags: Mapping[str, str]) -> tuple[str, str] | None:
        """A tag that names no version (`parent_version=latest`) is ignored: stored data never fails a read."""
        parent = tags.get(PARENT_VERSION_TAG, "").strip()
        if (number := canonical_version(parent)) is not None:
            return name, number
        if (reference := _version_reference(parent)) is not None:
            return reference
        baseline = tags.get(BASELINE_MODEL_TAG, "").strip()
        baseline_version = canonical_version(tags.get(BASELINE_VERSION_TAG, "").strip())
        if baseline and baseline_version is not None:
            return await self.model_name(baseline), baseline_version
        if (reference := _version_reference(baseline)) is not None:
            return await self.model_name(reference[0]), reference[1]
        return None

    async def version_lineage(self, name: str, version: str) -> VersionLineage:
        found = await self._reader.version(name, version)
        parent, run, model_id = await asyncio.gather(
            self.parent(found),
            self._reader.run(found.run_id),
            self.model_id(found.name),
        )
        datasets = datasets_of(run)
        training_data = [dataset.name for dataset in datasets if dataset.context in (None, "training", "train")]
        if not training_data:
            training_data = training_data_tag(found.tags.get(TRAINING_DATA_TAG, ""))
        experiments = [run.experiment_id] if run else []
        return VersionLineage(
            model=f"{found.name}:{found.version}",
            model_id=model_id,
            run_id=found.run_id,
            parents=[f"{parent[0]}:{parent[1]}"] if parent else [],
            training_data=training_data,
            datasets=datasets,
            experiments=experiments,
            contributors=contributors_in_tags(found.tags),
        )

    async def improvement_history(self, model_id: str) -> ImprovementHistory:
        """Every version with its metrics and its improvement over its parent on the benchmark metric.

        MLflow calls: the versions (1,000 a page), the experiments, the runs and the logged models (500 ids a
        search), the model's evaluations (1,000 a page): they do not grow with each version, only with their
        thousands. A parent in another model is looked up on its own.
        """
        name = await self.model_name(model_id)
        if not holdable_name(name):
            raise ModelNotRegistered(model_id)
        versions = await self._reader.all_versions(name)
        if not versions:
            raise ModelNotRegistered(model_id)
        facts = await self._reader.facts_of_versions(versions)
        # A version that names no benchmark (nor does its parent) is measured on the model's latest named one.
        default_metric = next((m for v in reversed(versions) if (m := facts[v.version].benchmark_metric())), None)
        steps = []
        for each in versions:
            own = facts[each.version]
            parent = await self.parent(each, versions)
            step = benchmark_step(own, await self._facts_of(parent, name, facts), self._direction, default_metric)
            contributors = contributors_in_tags(own.tags)
            steps.append(
                ImprovementStep(
                    version=each.version,
                    metrics=own.metrics(),
                    created_at=iso(from_millis(each.created_ms)),
                    contributor=contributors[0].address if len(contributors) == 1 else None,
                    contributors=contributors,
                    parent=f"{parent[0]}:{parent[1]}" if parent else None,
                    benchmark_metric=step.metric,
                    improvement=step.improvement,
                )
            )
        return ImprovementHistory(
            model_id=await self.model_id(name) or name,
            model_name=name,
            lineage=steps,
            total_versions=len(steps),
            latest_version=steps[-1].version,
        )

    async def _facts_of(
        self, parent: tuple[str, str] | None, name: str, known: dict[str, VersionFacts]
    ) -> VersionFacts | None:
        if parent is None:
            return None
        if parent[0] == name:
            return known.get(parent[1])
        try:
            return await self._reader.facts(await self._reader.version(*parent))
        except NotFound:
            return None


def _version_reference(value: str) -> tuple[str, str] | None:
    """`name:3` as (name, "3"); anything else (a version no model can have included) None."""
    try:
        reference = ModelReference.parse(value)
    except InvalidRequest:
        return None
    number = canonical_version(reference.version) if reference.version else None
    return (reference.name, number) if number is not None else None


def datasets_of(run: Run | None) -> list[DatasetInput]:
    """Datasets logged on the run with mlflow.log_input."""
    return [
        DatasetInput(
            name=dataset.name,
            digest=dataset.digest,
            source_type=dataset.source_type,
            source=dataset.source,
            context=dataset.context,
        )
        for dataset in (run.datasets if run is not None else ())
    ]


def training_data_tag(value: str) -> list[str]:
    """A `training_data` tag: a JSON list of names, or names separated by commas."""
    value = value.strip()
    if not value:
        return []
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if isinstance(parsed, list):
        return [str(item) for item in parsed]
    return [part.strip() for part in value.split(",") if part.strip()]
