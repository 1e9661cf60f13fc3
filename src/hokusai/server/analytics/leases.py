"""Who runs an evaluation: an owner (a process's instance id), a heartbeat and a lease, kept in the evaluations table.

Several service processes share one database. Each renews the leases of the evaluations it runs (every third of a
lease); an evaluation whose lease has run out belongs to no live process (it died, or stalled for a whole lease), and
the first process to look claims it: to run it again when what was asked is stored and it has not been started
MAX_ATTEMPTS times, else to mark it failed. An evaluation under a live lease is never touched.

On PostgreSQL the lease times come from the database's clock (so hosts whose clocks differ agree on what has expired)
and a claim locks its rows with FOR UPDATE SKIP LOCKED, so two reclaiming processes never take the same row and
never wait for each other. SQLite is one host: Python's clock, no row locks. On both, each write is conditional (a
claim only if the lease is still expired, every other write only while this process owns the row), so a process
that lost an evaluation to another cannot overwrite it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hokusai.server.analytics.models import EvaluationRow
from hokusai.server.analytics.schemas import EvaluateRequest
from hokusai.server.db import Database, utcnow

ACTIVE = ("queued", "running")
MAX_ATTEMPTS = 3  # an evaluation is started at most this many times: one that kills its process does not kill all
INTERRUPTED = "Interrupted: the process running the evaluation stopped before it finished"
NO_SYNC = {"synchronize_session": False}  # these sessions hold no loaded rows to keep in step


@dataclass(frozen=True)
class Claimed:
    """An abandoned evaluation this process took: `request` to run again (as attempt `attempts`), or None when it
    was marked failed with `error`."""

    evaluation_id: str
    attempts: int
    request: EvaluateRequest | None
    error: str | None = None


class EvaluationLeases:
    def __init__(self, database: Database, owner: str, lease_seconds: float) -> None:
        self.owner = owner
        self.lease_seconds = lease_seconds
        self._database = database
        self._postgres = database.engine.dialect.name == "postgresql"

    def _now(self) -> Any:
        return func.now() if self._postgres else utcnow()

    def lease(self) -> dict[str, Any]:
        """The values that say "this process runs it, until now + a lease"."""
        now = self._now()
        return {
            "owner": self.owner,
            "heartbeat_at": now,
            "lease_expires_at": now + timedelta(seconds=self.lease_seconds),
        }

    def _expired(self) -> ColumnElement[bool]:
        # NULL: a row written before leases existed (migration 0006), or one a stopping process released.
        return and_(
            EvaluationRow.status.in_(ACTIVE),
            or_(EvaluationRow.lease_expires_at.is_(None), EvaluationRow.lease_expires_at < self._now()),
        )

    async def write(self, evaluation_id: str, **values: Any) -> bool:
        """Update an evaluation this process owns; False (nothing written) when another process has taken it."""
        async with self._database.session() as session, session.begin():
            result = await session.execute(
                update(EvaluationRow)
                .where(EvaluationRow.id == evaluation_id, EvaluationRow.owner == self.owner)
                .values(**values),
                execution_options=NO_SYNC,
            )
        return result.rowcount > 0

    async def renew(self, evaluation_ids: Collection[str]) -> set[str]:
        """One UPDATE extends the leases of these evaluations (the ones this process is running or has queued);
        returns those another process has taken meanwhile (this process's lease had run out), to be abandoned."""
        if not evaluation_ids:
            return set()
        ids = list(evaluation_ids)
        async with self._database.session() as session, session.begin():
            renewed = await session.execute(
                update(EvaluationRow)
                .where(
                    EvaluationRow.id.in_(ids),
                    EvaluationRow.owner == self.owner,
                    EvaluationRow.status.in_(ACTIVE),
                )
                .values(**self.lease()),
                execution_options=NO_SYNC,
            )
            if renewed.rowcount == len(ids):
                return set()
            # The rest either just finished (nothing to do) or belong to someone else now.
            taken = await session.scalars(
                select(EvaluationRow.id).where(EvaluationRow.id.in_(ids), EvaluationRow.owner != self.owner)
            )
            return set(taken)

    async def release(self, evaluation_id: str) -> bool:
        """Give an evaluation back at a clean shutdown: queued, no owner, no lease, so the next process to look
        (another one at its next heartbeat, or this one's successor at its start) runs it at once. The attempt
        this process made is not counted: a shutdown is not the evaluation's fault."""
        return await self.write(
            evaluation_id,
            status="queued",
            owner=None,
            heartbeat_at=None,
            lease_expires_at=None,
            attempts=case((EvaluationRow.attempts > 0, EvaluationRow.attempts - 1), else_=0),
        )

    async def claim_abandoned(self, room: int, exclude: Collection[str] = (), batch: int = 100) -> list[Claimed]:
        """Claim evaluations whose lease has expired (`exclude`: this process's own): every one that cannot run again
        (no stored request, or MAX_ATTEMPTS starts) to mark failed, up to `batch`; and up to `room` runnable ones,
        oldest first, to run again. An attempt counts when it is claimed, so a process takes no more than it has room
        to start: the rest wait for room here, or for another process.
        """
        runnable = and_(EvaluationRow.request.is_not(None), EvaluationRow.attempts < MAX_ATTEMPTS)
        claimed: list[Claimed] = []
        async with self._database.session() as session, session.begin():
            phases = [(~runnable, batch)] + ([(runnable, room)] if room > 0 else [])
            for which, limit in phases:
                query = (
                    select(EvaluationRow.id, EvaluationRow.request, EvaluationRow.attempts)
                    .where(self._expired(), which)
                    .order_by(EvaluationRow.created_at)
                    .limit(limit)
                )
                if exclude:
                    query = query.where(EvaluationRow.id.not_in(list(exclude)))
                if self._postgres:
                    # Rows another claimer has locked are skipped, not waited for: it is taking them.
                    query = query.with_for_update(skip_locked=True)
                for evaluation_id, stored, attempts in (await session.execute(query)).all():
                    if (taken := await self._claim(session, evaluation_id, stored, attempts)) is not None:
                        claimed.append(taken)
        return claimed

    async def _claim(self, session: AsyncSession, evaluation_id: str, stored: Any, attempts: int) -> Claimed | None:
        request, error = _runnable(stored, attempts)
        if request is not None:
            values = {"status": "queued", "attempts": attempts + 1, "error": None, **self.lease()}
        else:
            values = {
                "status": "failed",
                "error": error,
                "finished_at": utcnow(),
                "owner": self.owner,  # a late write from the process that had it is now refused
                "heartbeat_at": None,
                "lease_expires_at": None,
            }
        # Still expired: on SQLite (no row locks) another process may have claimed it since the SELECT.
        result = await session.execute(
            update(EvaluationRow).where(EvaluationRow.id == evaluation_id, self._expired()).values(**values),
            execution_options=NO_SYNC,
        )
        if result.rowcount != 1:
            return None
        return Claimed(evaluation_id, values.get("attempts", attempts), request, error)


def _runnable(stored: dict | None, attempts: int) -> tuple[EvaluateRequest | None, str | None]:
    """(the request to run again, None) or (None, why not)."""
    if stored is None:
        # Answered within its request (the caller saw the request fail and has nothing to poll), or written before
        # leases existed.
        return None, INTERRUPTED
    if attempts >= MAX_ATTEMPTS:
        return None, (
            f"Interrupted {attempts} times: the processes running the evaluation stopped before it finished; "
            "it is not run again"
        )
    try:
        return EvaluateRequest.model_validate(stored), None
    except ValidationError:
        return None, f"{INTERRUPTED} (its stored request can no longer be read, so it cannot be run again)"
