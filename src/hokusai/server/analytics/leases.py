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

An evaluation's outcome (succeeded or failed, by its runner or by a process that gives up on it) is announced in the
transaction that writes it, and only when the write took effect: two processes never both announce one evaluation.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, get_args

from pydantic import ValidationError
from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hokusai.server.analytics.models import EvaluationRow
from hokusai.server.analytics.schemas import EvaluateRequest
from hokusai.server.db import Database, utcnow
from hokusai.server.events.outbox import SERVICE_ACTOR, Actor, ActorKind, EventOutbox, NewEvent
from hokusai.server.events.types import EVALUATION_COMPLETED, EVALUATION_FAILED
from hokusai.server.registry.models import ModelIdRow
from hokusai.server.timestamps import as_utc

ACTIVE = ("queued", "running")
FINISHED = {"succeeded": EVALUATION_COMPLETED, "failed": EVALUATION_FAILED}
# Who asked for a background evaluation, kept beside what was asked in its stored request (EvaluateRequest ignores
# the key), so the process that finishes it, whichever it is, announces the right actor.
REQUESTED_BY = "requested_by"
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


@dataclass(frozen=True)
class FinishedEvaluation:
    """An evaluation as its outcome was written: what its event says."""

    evaluation_id: str
    model_name: str
    version: str
    dataset_path: str
    status: str
    result: Mapping[str, Any] | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    request: Mapping[str, Any] | None


FINISHED_COLUMNS = (
    EvaluationRow.id,
    EvaluationRow.model_name,
    EvaluationRow.version,
    EvaluationRow.dataset_path,
    EvaluationRow.status,
    EvaluationRow.result,
    EvaluationRow.error,
    EvaluationRow.created_at,
    EvaluationRow.finished_at,
    EvaluationRow.request,
)


def actor_record(actor: Actor) -> dict[str, str | None]:
    return {"kind": actor.kind, "name": actor.name, "key_id": actor.key_id}


def stored_actor(request: Mapping[str, Any] | None) -> Actor | None:
    """Who asked, as the stored request keeps it (background evaluations); None when it does not."""
    kept = request.get(REQUESTED_BY) if request else None
    if not isinstance(kept, dict) or kept.get("kind") not in get_args(ActorKind):
        return None
    name, key_id = kept.get("name"), kept.get("key_id")
    if not isinstance(name, str) or not (key_id is None or isinstance(key_id, str)):
        return None
    return Actor(kept["kind"], name, key_id)


def evaluation_event(finished: FinishedEvaluation, actor: Actor, model_id: str | None) -> NewEvent:
    """evaluation.completed (the metrics) or evaluation.failed (the error) for an evaluation's written outcome."""
    payload: dict[str, Any] = {
        "evaluation_id": finished.evaluation_id,
        "status": finished.status,
        "dataset": finished.dataset_path,
    }
    if finished.status == "succeeded":
        result = finished.result or {}
        payload.update(
            metrics=result.get("metrics"),
            sample_count=result.get("sample_count"),
            run_id=result.get("run_id"),
            duration_seconds=result.get("duration_seconds"),  # the measurement, as GET /models/evaluations shows
        )
    else:
        payload["error"] = finished.error
    if finished.finished_at is not None:  # from the request to the outcome, queueing and retries included
        elapsed = as_utc(finished.finished_at) - as_utc(finished.created_at)
        payload["elapsed_seconds"] = round(elapsed.total_seconds(), 3)
    return NewEvent(FINISHED[finished.status], actor, finished.model_name, finished.version, model_id, payload)


class EvaluationLeases:
    def __init__(self, database: Database, owner: str, lease_seconds: float, outbox: EventOutbox | None = None) -> None:
        """`outbox`: where outcomes are announced (without one, they are written unannounced)."""
        self.owner = owner
        self.lease_seconds = lease_seconds
        self._database = database
        self._outbox = outbox
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

    async def finish(self, evaluation_id: str, actor: Actor | None, **values: Any) -> bool:
        """Write the outcome (`status` succeeded or failed) of an evaluation this process owns and, in the same
        transaction, announce it as `actor` (else who the stored request names, else the service); False (nothing
        written, nothing announced) when another process has taken it."""
        if values.get("status") not in FINISHED:
            raise ValueError(f"an outcome is succeeded or failed, not {values.get('status')!r}")
        async with self._database.session() as session, session.begin():
            written = await session.execute(
                update(EvaluationRow)
                .where(EvaluationRow.id == evaluation_id, EvaluationRow.owner == self.owner)
                .values(**values)
                .returning(*FINISHED_COLUMNS),
                execution_options=NO_SYNC,
            )
            finished = written.one_or_none()
            if finished is None:
                return False
            appended = await self._announce(session, FinishedEvaluation(*finished), actor)
        if appended:
            self._outbox.appended()
        return True

    async def _announce(self, session: AsyncSession, finished: FinishedEvaluation, actor: Actor | None) -> bool:
        """Append the outcome's event within the caller's transaction; whether there was an outbox to append to."""
        if self._outbox is None:
            return False
        model_id = await session.scalar(select(ModelIdRow.model_id).where(ModelIdRow.name == finished.model_name))
        who = actor or stored_actor(finished.request) or SERVICE_ACTOR
        await self._outbox.append(session, [evaluation_event(finished, who, model_id)])
        return True

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
            # An evaluation marked failed here is announced in this transaction, by the process that gave up on it.
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
        if any(taken.request is None for taken in claimed) and self._outbox is not None:
            self._outbox.appended()
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
            update(EvaluationRow)
            .where(EvaluationRow.id == evaluation_id, self._expired())
            .values(**values)
            .returning(*FINISHED_COLUMNS),
            execution_options=NO_SYNC,
        )
        written = result.one_or_none()
        if written is None:
            return None
        if request is None:  # given up on: its outcome is written, and announced with it
            await self._announce(session, FinishedEvaluation(*written), None)
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
