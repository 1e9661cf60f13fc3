"""Data contributors: Ethereum addresses (EIP-55), who contributed to a version, and what it improved.

A contribution is a model version naming its contributors: a `contributor_address` tag (weight 1), or a
`contributors` tag holding a JSON list of `{"address": ..., "weight": ...}` whose weights sum to 1. The service
records each contribution in its database, with the improvement it brought, when such a version is registered
through it (and `hokusai contributions rebuild` backfills versions made elsewhere), so the impact of an address is
an indexed lookup, never a scan of MLflow.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from Crypto.Hash import keccak
from sqlalchemy import case, delete, func, select, text

from hokusai.server.analytics.models import ContributionRow
from hokusai.server.analytics.schemas import (
    Contribution,
    ContributorImpact,
    ContributorLeaderboard,
    ContributorShare,
    RankedContributor,
)
from hokusai.server.db import Database, utcnow
from hokusai.server.errors import InvalidRequest
from hokusai.server.events.outbox import EventOutbox, NewEvent
from hokusai.server.timestamps import as_utc, iso

CONTRIBUTOR_TAG = "contributor_address"
CONTRIBUTORS_TAG = "contributors"
ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
WEIGHT_TOLERANCE = 1e-6
# What a contribution adds to its address's total improvement: its score when positive (a regression is never
# impact). The impact and the leaderboard both sum this, so their totals agree.
POSITIVE_SCORE = case((ContributionRow.improvement_score > 0, ContributionRow.improvement_score), else_=0.0)


class InvalidAddress(InvalidRequest):
    def __init__(self, address: str, problem: str) -> None:
        super().__init__(f"Invalid Ethereum address {address!r}: {problem}")


def checksum_address(address: str) -> str:
    """The EIP-55 form of an address. Mixed case must already be that form (it is a checksum); all-lowercase or
    all-uppercase hex carries no checksum and is accepted as it is."""
    if not isinstance(address, str) or not ADDRESS.fullmatch(address):
        raise InvalidAddress(str(address), "expected 0x followed by 40 hexadecimal digits")
    digits = address[2:]
    lower = digits.lower()
    # Keccak-256 as Ethereum uses it (the original padding), which is not the NIST SHA3-256 of hashlib.
    digest = keccak.new(digest_bits=256, data=lower.encode("ascii")).hexdigest()
    checksummed = "0x" + "".join(c.upper() if int(h, 16) >= 8 else c for c, h in zip(lower, digest[:40], strict=True))
    if digits not in (lower, digits.upper()) and address != checksummed:
        raise InvalidAddress(address, "mixed-case address fails its EIP-55 checksum")
    return checksummed


def contributor_shares(tags: Mapping[str, Any]) -> list[ContributorShare]:
    """The contributors a version's tags (or register metadata) name, checksummed; InvalidRequest when malformed."""
    listed = tags.get(CONTRIBUTORS_TAG)
    if listed not in (None, "", []):
        if isinstance(listed, str):
            try:
                listed = json.loads(listed)
            except ValueError:
                raise InvalidRequest("contributors must be a JSON list of {address, weight}") from None
        return _weighted(listed)
    single = tags.get(CONTRIBUTOR_TAG)
    if single in (None, ""):
        return []
    return [ContributorShare(address=checksum_address(single), weight=1.0)]


def _weighted(listed: Any) -> list[ContributorShare]:
    if not isinstance(listed, list) or not all(isinstance(item, dict) for item in listed):
        raise InvalidRequest("contributors must be a list of {address, weight}")
    shares: dict[str, float] = {}
    for item in listed:
        weight = item.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= 1:
            raise InvalidRequest(f"contributor weight must be a number in (0, 1], got {weight!r}")
        address = checksum_address(item.get("address"))
        if address in shares:
            raise InvalidRequest(f"contributor {address} is listed twice")
        shares[address] = float(weight)
    if not math.isclose(sum(shares.values()), 1.0, abs_tol=WEIGHT_TOLERANCE):
        raise InvalidRequest(f"contributor weights must sum to 1, they sum to {sum(shares.values()):g}")
    return [ContributorShare(address=address, weight=weight) for address, weight in shares.items()]


def contributors_in_tags(tags: Mapping[str, str]) -> list[ContributorShare]:
    """Like contributor_shares, for tags already stored in MLflow: a malformed entry names nobody."""
    try:
        return contributor_shares(tags)
    except InvalidRequest:
        return []


def normalized_contributor_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Register metadata with its contributors validated and written in checksum form (400 when malformed)."""
    shares = contributor_shares(metadata)
    if not shares:
        return metadata
    normalized = dict(metadata)
    if metadata.get(CONTRIBUTORS_TAG) not in (None, "", []):
        normalized[CONTRIBUTORS_TAG] = [share.model_dump() for share in shares]
    else:
        normalized[CONTRIBUTOR_TAG] = shares[0].address
    return normalized


@dataclass(frozen=True)
class RecordedContribution:
    """What one contribution row says, apart from when it was written: two records of a version that agree on these
    are the same record (a rebuild that changes nothing)."""

    address: str
    weight: float
    benchmark_metric: str | None
    benchmark_value: float | None
    parent: str | None
    parent_value: float | None

    @classmethod
    def of(cls, row: ContributionRow) -> RecordedContribution:
        return cls(row.address, row.weight, row.benchmark_metric, row.benchmark_value, row.parent, row.parent_value)


RECORDED_COLUMNS = (
    ContributionRow.address,
    ContributionRow.weight,
    ContributionRow.benchmark_metric,
    ContributionRow.benchmark_value,
    ContributionRow.parent,
    ContributionRow.parent_value,
)
# The events a new record of a version makes, given what was recorded for it before (empty: nothing was).
Announce = Callable[[list[RecordedContribution]], Sequence[NewEvent]]


def _same_number(first: float | None, second: float | None) -> bool:
    if first is None or second is None:
        return first is second
    return math.isclose(first, second, rel_tol=1e-12, abs_tol=1e-15)  # a float read back from either database


def same_record(first: Sequence[RecordedContribution], second: Sequence[RecordedContribution]) -> bool:
    """Whether two records of one version say the same (order aside)."""
    if len(first) != len(second):
        return False
    pairs = zip(sorted(first, key=lambda c: c.address), sorted(second, key=lambda c: c.address), strict=True)
    return all(
        a.address == b.address
        and a.benchmark_metric == b.benchmark_metric
        and a.parent == b.parent
        and _same_number(a.weight, b.weight)
        and _same_number(a.benchmark_value, b.benchmark_value)
        and _same_number(a.parent_value, b.parent_value)
        for a, b in pairs
    )


class ContributionStore:
    def __init__(self, database: Database, outbox: EventOutbox | None = None) -> None:
        """`outbox`: where the events of a record go (a store without one records without announcing)."""
        self._database = database
        self._outbox = outbox
        self._postgres = database.engine.dialect.name == "postgresql"

    async def replace(
        self, name: str, version: str, rows: list[ContributionRow], announce: Announce | None = None
    ) -> list[RecordedContribution]:
        """The contributions of one version, replacing what was recorded for it before (rebuild is repeatable);
        returns what was recorded before. With `announce`, the events it makes of the previous record are appended
        to the outbox in the same transaction, so a record and its announcement commit together or not at all."""
        appended = False
        async with self._database.session() as session, session.begin():
            if self._postgres:
                # Two recordings of one version at once (a registration and a rebuild) take turns, so exactly one
                # of them finds the version unrecorded. SQLite has one writer: the DELETE below takes its lock.
                await session.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"contributions:{name}:{version}"}
                )
            deleted = await session.execute(
                delete(ContributionRow)
                .where(ContributionRow.model_name == name, ContributionRow.version == version)
                .returning(*RECORDED_COLUMNS),
                execution_options={"synchronize_session": False},
            )
            previous = [RecordedContribution(*values) for values in deleted.all()]
            now = utcnow()
            for row in rows:
                row.recorded_at = now
                session.add(row)
            if announce is not None and (events := announce(previous)):
                if self._outbox is None:
                    raise RuntimeError("ContributionStore was built without an outbox: it cannot announce")
                await self._outbox.append(session, events)
                appended = True
        if appended:
            self._outbox.appended()
        return previous

    async def impact(self, address: str, limit: int, offset: int) -> ContributorImpact:
        """Totals over every contribution of the address, and one page of them (newest first); indexed by address."""
        totals_query = select(
            func.count(),
            func.coalesce(func.sum(POSITIVE_SCORE), 0.0),
            func.min(ContributionRow.contributed_at),
            func.max(ContributionRow.contributed_at),
        ).where(ContributionRow.address == address)
        per_model = (
            select(ContributionRow.model_name)
            .where(ContributionRow.address == address)
            .group_by(ContributionRow.model_name)
            .having(func.sum(ContributionRow.improvement_score) > 0)
            .subquery()
        )
        page_query = (
            select(ContributionRow)
            .where(ContributionRow.address == address)
            .order_by(ContributionRow.contributed_at.desc(), ContributionRow.id.desc())
            .limit(limit)
            .offset(offset)
        )
        async with self._database.session() as session:
            count, total, first, last = (await session.execute(totals_query)).one()
            improved = await session.scalar(select(func.count()).select_from(per_model))
            page = (await session.scalars(page_query)).all()
        return ContributorImpact(
            address=address,
            total_models_improved=improved or 0,
            total_improvement_score=float(total or 0.0),
            total_contributions=count,
            contributions=[
                Contribution(
                    model_id=row.model_id or row.model_name,
                    model_name=row.model_name,
                    version=row.version,
                    weight=row.weight,
                    benchmark_metric=row.benchmark_metric,
                    benchmark_value=row.benchmark_value,
                    parent=row.parent,
                    parent_value=row.parent_value,
                    improvement_score=row.improvement_score,
                    contributed_at=iso(row.contributed_at),
                )
                for row in page
            ],
            first_contribution=iso(as_utc(first)) if first else None,
            last_contribution=iso(as_utc(last)) if last else None,
            limit=limit,
            offset=offset,
        )

    async def leaderboard(self, limit: int, offset: int) -> ContributorLeaderboard:
        """One page of the addresses ranked by total improvement (as `impact` computes it), ties by address
        ascending, and how many addresses there are.

        One query for the page, one for the count. Ranking needs every contribution, so no index spares the grouped
        scan; the models improved are then read by address (indexed) for the page's addresses only."""
        total_score = func.coalesce(func.sum(POSITIVE_SCORE), 0.0)
        # Ties by the address's hex value: its lowercase form is as unique as the checksum form, and compares the
        # same under SQLite's binary collation and any PostgreSQL collation (the mixed-case form would not).
        rank = func.row_number().over(order_by=(total_score.desc(), func.lower(ContributionRow.address))).label("rank")
        page = (
            select(
                ContributionRow.address,
                rank,
                func.count().label("total_contributions"),
                total_score.label("total_improvement_score"),
                func.min(ContributionRow.contributed_at).label("first_contribution"),
                func.max(ContributionRow.contributed_at).label("last_contribution"),
            )
            .group_by(ContributionRow.address)
            .order_by(rank)
            .limit(limit)
            .offset(offset)
            .cte("leaderboard_page")
        )
        # Same definition as impact's total_models_improved: the models where the address's summed score is > 0.
        improved = (
            select(ContributionRow.address, ContributionRow.model_name)
            .where(ContributionRow.address.in_(select(page.c.address)))
            .group_by(ContributionRow.address, ContributionRow.model_name)
            .having(func.sum(ContributionRow.improvement_score) > 0)
            .subquery("improved")
        )
        page_query = (
            select(page, improved.c.model_name)
            .outerjoin(improved, improved.c.address == page.c.address)
            .order_by(page.c.rank)
        )
        async with self._database.session() as session:
            rows = (await session.execute(page_query)).all()
            total = await session.scalar(select(func.count(func.distinct(ContributionRow.address))))
        ranked: dict[str, RankedContributor] = {}
        for row in rows:
            entry = ranked.get(row.address)
            if entry is None:
                entry = ranked[row.address] = RankedContributor(
                    rank=row.rank,
                    address=row.address,
                    total_improvement_score=float(row.total_improvement_score),
                    total_contributions=row.total_contributions,
                    total_models_improved=0,
                    models_improved=[],
                    first_contribution=iso(as_utc(row.first_contribution)),
                    last_contribution=iso(as_utc(row.last_contribution)),
                )
            if row.model_name is not None:
                entry.models_improved.append(row.model_name)
        for entry in ranked.values():
            entry.models_improved.sort()  # in Python: code point order, whichever database's collation
            entry.total_models_improved = len(entry.models_improved)
        return ContributorLeaderboard(contributors=list(ranked.values()), total=total or 0, limit=limit, offset=offset)
