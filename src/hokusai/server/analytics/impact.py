"""Contributor impact: each contribution recorded with the improvement its version brought over its parent."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hokusai.server.analytics.contributors import ContributionStore, checksum_address, contributors_in_tags
from hokusai.server.analytics.lineage import LineageService
from hokusai.server.analytics.models import ContributionRow
from hokusai.server.analytics.schemas import ContributorImpact
from hokusai.server.analytics.versions import MetricDirection, VersionReader, benchmark_step
from hokusai.server.errors import NotFound

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebuildReport:
    versions_seen: int
    versions_with_contributors: int
    contributions: int


class ImpactService:
    def __init__(
        self, reader: VersionReader, lineage: LineageService, store: ContributionStore, direction: MetricDirection
    ) -> None:
        self._reader = reader
        self._lineage = lineage
        self._store = store
        self._direction = direction

    async def impact(self, address: str, limit: int, offset: int) -> ContributorImpact:
        return await self._store.impact(checksum_address(address), limit, offset)

    async def record_version(self, name: str, version: str) -> int:
        """(Re)record the contributions of one version; how many there are."""
        found = await self._reader.version(name, version)
        facts = await self._reader.facts(found)
        shares = contributors_in_tags(facts.tags)
        if not shares:
            await self._store.replace(facts.name, facts.version, [])
            return 0
        parent = await self._lineage.parent(found)
        parent_facts = None
        if parent is not None:
            try:
                parent_facts = await self._reader.facts(await self._reader.version(*parent))
            except NotFound as exc:  # a vanished parent leaves the contribution without a baseline, not unrecorded
                logger.warning("Parent %s:%s of %s unreadable: %s", *parent, facts.reference, exc)
        # The same measure as compare and the improvement history; no value to compare scores 0.
        step = benchmark_step(facts, parent_facts, self._direction)
        improvement = step.improvement or 0.0
        model_id = await self._lineage.model_id(facts.name)
        rows = [
            ContributionRow(
                address=share.address,
                model_name=facts.name,
                version=facts.version,
                model_id=model_id,
                weight=share.weight,
                benchmark_metric=step.metric,
                benchmark_value=step.value,
                parent=f"{parent[0]}:{parent[1]}" if parent else None,
                parent_value=step.parent_value,
                improvement_score=improvement * share.weight,
                contributed_at=facts.created_at,
            )
            for share in shares
        ]
        await self._store.replace(facts.name, facts.version, rows)
        return len(rows)

    async def rebuild(self) -> RebuildReport:
        """Every version in MLflow read again (a page of 1,000 at a time) and its contributions recorded anew."""
        seen = named = recorded = 0
        async for version in self._reader.every_version():
            seen += 1
            if contributors_in_tags(version.tags):
                named += 1
                recorded += await self.record_version(version.name, version.version)
        return RebuildReport(seen, named, recorded)
