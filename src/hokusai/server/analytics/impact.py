"""Contributor impact: each contribution recorded with the improvement its version brought over its parent.

Recording a version's contributions announces it, in the same transaction as the record: `contribution.recorded`
when the record is new or says something else than the one it replaces (a rebuild that changes nothing announces
nothing), and `model_version.improved` when the version beats its parent by the threshold (improvement.py) and the
record it replaces did not already say so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hokusai.server.analytics.contributors import (
    ContributionStore,
    RecordedContribution,
    checksum_address,
    contributors_in_tags,
    same_record,
)
from hokusai.server.analytics.improvement import ImprovementCheck, check_improvement
from hokusai.server.analytics.lineage import LineageService
from hokusai.server.analytics.models import ContributionRow
from hokusai.server.analytics.schemas import ContributorImpact, ContributorLeaderboard
from hokusai.server.analytics.versions import MetricDirection, VersionReader, benchmark_step
from hokusai.server.errors import NotFound
from hokusai.server.events.outbox import SERVICE_ACTOR, Actor, NewEvent
from hokusai.server.events.types import CONTRIBUTION_RECORDED, VERSION_IMPROVED

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionSubject:
    model_name: str
    version: str
    model_id: str | None


def record_check(
    record: Sequence[RecordedContribution], direction: MetricDirection, threshold: float
) -> ImprovementCheck | None:
    """The improvement a version's record states (every row of a version carries the same benchmark figures)."""
    if not record or record[0].benchmark_metric is None:
        return None
    first = record[0]
    metric = first.benchmark_metric
    return check_improvement(
        metric, first.benchmark_value, first.parent_value, direction.lower_is_better(metric), threshold
    )


def contribution_events(
    subject: VersionSubject,
    actor: Actor,
    record: Sequence[RecordedContribution],
    previous: Sequence[RecordedContribution],
    direction: MetricDirection,
    threshold: float,
) -> list[NewEvent]:
    """What recording `record` in place of `previous` announces: nothing when it names nobody or changes nothing;
    else contribution.recorded, and model_version.improved when the version now beats its parent by the threshold
    and the previous record did not (a version is announced improved once, not at every rebuild)."""
    if not record or same_record(record, previous):
        return []
    check = record_check(record, direction, threshold)
    first = record[0]
    improvement = None
    if first.benchmark_metric and first.benchmark_value is not None and first.parent_value is not None:
        improvement = direction.improvement(first.benchmark_metric, first.parent_value, first.benchmark_value)
    recorded: dict[str, Any] = {
        "contributors": [
            {
                "address": one.address,
                "weight": one.weight,
                "improvement_score": (improvement or 0.0) * one.weight,
            }
            for one in record
        ],
        "benchmark_metric": first.benchmark_metric,
        "benchmark_value": first.benchmark_value,
        "parent": first.parent,
        "parent_value": first.parent_value,
        "improvement": improvement,
        "first_record": not previous,
    }
    events = [NewEvent(CONTRIBUTION_RECORDED, actor, subject.model_name, subject.version, subject.model_id, recorded)]
    before = record_check(previous, direction, threshold)
    if check is not None and check.improved and first.parent and not (before is not None and before.improved):
        events.append(
            NewEvent(
                VERSION_IMPROVED,
                actor,
                subject.model_name,
                subject.version,
                subject.model_id,
                improved_payload(check, first.parent, record),
            )
        )
    return events


def improved_payload(check: ImprovementCheck, parent: str, record: Sequence[RecordedContribution]) -> dict[str, Any]:
    return {
        "metric": check.metric,
        "value": check.value,
        "parent": parent,
        "parent_value": check.parent_value,
        "delta": check.delta,
        "improvement": check.improvement,
        "relative": check.relative,
        "threshold": check.threshold,
        "rule": check.rule,
        "direction": check.direction,
        "contributors": [{"address": one.address, "weight": one.weight} for one in record],
    }


@dataclass(frozen=True)
class RebuildReport:
    versions_seen: int
    versions_with_contributors: int
    contributions: int


class ImpactService:
    def __init__(
        self,
        reader: VersionReader,
        lineage: LineageService,
        store: ContributionStore,
        direction: MetricDirection,
        improvement_threshold: float,
    ) -> None:
        self._reader = reader
        self._lineage = lineage
        self._store = store
        self._direction = direction
        self._threshold = improvement_threshold

    async def impact(self, address: str, limit: int, offset: int) -> ContributorImpact:
        return await self._store.impact(checksum_address(address), limit, offset)

    async def leaderboard(self, limit: int, offset: int) -> ContributorLeaderboard:
        """The addresses ranked by total improvement, one page of them (their figures are their impact's)."""
        return await self._store.leaderboard(limit, offset)

    async def record_version(self, name: str, version: str, actor: Actor | None = None) -> int:
        """(Re)record the contributions of one version, announced as `actor` (who registered it; by default the
        service); how many there are."""
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
        subject = VersionSubject(facts.name, facts.version, model_id)
        record = [RecordedContribution.of(row) for row in rows]

        def announce(previous: list[RecordedContribution]) -> list[NewEvent]:
            return contribution_events(
                subject, actor or SERVICE_ACTOR, record, previous, self._direction, self._threshold
            )

        await self._store.replace(facts.name, facts.version, rows, announce)
        return len(rows)

    async def rebuild(self, actor: Actor | None = None) -> RebuildReport:
        """Every version in MLflow read again (a page of 1,000 at a time) and its contributions recorded anew; what
        changed is announced as `actor` (the server command's user)."""
        seen = named = recorded = 0
        async for version in self._reader.every_version():
            seen += 1
            if contributors_in_tags(version.tags):
                named += 1
                recorded += await self.record_version(version.name, version.version, actor)
        return RebuildReport(seen, named, recorded)
