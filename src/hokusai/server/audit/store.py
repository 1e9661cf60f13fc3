"""The audit log's store and its writer: rows are buffered and written in batches, one INSERT per batch.

The row of a write the service acknowledged (a 2xx) is committed before the end of the response leaves
(`record_durably`, a group commit: requests finishing together share one commit), so a process killed after a 2xx
has its audit row. Refusals and failures (`record`) are written within a second; a crash may lose that second,
a clean shutdown does not (`aclose` flushes).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy import and_, delete, insert, or_, select

from hokusai.server.audit.models import AuditRow
from hokusai.server.db import Database, utcnow
from hokusai.server.errors import InvalidRequest

logger = logging.getLogger(__name__)
T = TypeVar("T")

FLUSH_INTERVAL_SECONDS = 1.0
DURABLE_WAIT_SECONDS = 5.0  # a response waits this long at most for its row (the database may be away)
FLUSH_BATCH = 200
RETENTION_INTERVAL_SECONDS = 3600.0


@dataclass(frozen=True)
class AuditEntry:
    key_id: str | None
    actor: str
    address: str | None
    method: str
    route: str
    targets: dict[str, str]
    status: int
    at: datetime = field(default_factory=utcnow)
    id: int | None = None


@dataclass(frozen=True)
class AuditFilter:
    key_id: str | None = None
    method: str | None = None
    route: str | None = None
    status: int | None = None
    since: datetime | None = None
    until: datetime | None = None


def encode_cursor(entry: AuditEntry) -> str:
    return base64.urlsafe_b64encode(f"{entry.at.isoformat()}|{entry.id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        at, _, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(at), int(row_id)
    except ValueError as error:
        raise InvalidRequest("Invalid cursor") from error


def _aware(moment: datetime | None) -> datetime | None:
    """A filter time without a zone is taken as UTC (the column refuses naive datetimes)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        key_id=row.key_id,
        actor=row.actor,
        address=row.address,
        method=row.method,
        route=row.route,
        targets=dict(row.targets or {}),
        status=row.status,
        at=row.at,
        id=row.id,
    )


def _values(entry: AuditEntry) -> dict:
    return {
        "at": entry.at,
        "key_id": entry.key_id,
        "actor": entry.actor[:200],
        "address": entry.address[:64] if entry.address else None,
        "method": entry.method[:16],
        "route": entry.route[:500],
        "targets": {name: str(value)[:500] for name, value in entry.targets.items()},
        "status": entry.status,
    }


class AuditStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def add_many(self, entries: list[AuditEntry]) -> None:
        if not entries:
            return
        async with self.database.session() as session:
            await session.execute(insert(AuditRow), [_values(entry) for entry in entries])
            await session.commit()

    async def list(
        self, filters: AuditFilter, limit: int, cursor: str | None = None
    ) -> tuple[list[AuditEntry], str | None]:
        """Newest first; the cursor is the (time, id) of the last row of the previous page."""
        query = select(AuditRow)
        if filters.key_id is not None:
            query = query.where(AuditRow.key_id == filters.key_id)
        if filters.method is not None:
            query = query.where(AuditRow.method == filters.method.upper())
        if filters.route is not None:
            query = query.where(AuditRow.route == filters.route)
        if filters.status is not None:
            query = query.where(AuditRow.status == filters.status)
        if filters.since is not None:
            query = query.where(AuditRow.at >= _aware(filters.since))
        if filters.until is not None:
            query = query.where(AuditRow.at < _aware(filters.until))
        if cursor is not None:
            at, row_id = decode_cursor(cursor)
            at = _aware(at)
            query = query.where(or_(AuditRow.at < at, and_(AuditRow.at == at, AuditRow.id < row_id)))
        query = query.order_by(AuditRow.at.desc(), AuditRow.id.desc()).limit(limit + 1)
        async with self.database.session() as session:
            rows = (await session.scalars(query)).all()
        entries = [_entry(row) for row in rows[:limit]]
        next_cursor = encode_cursor(entries[-1]) if len(rows) > limit else None
        return entries, next_cursor

    async def delete_older_than(self, cutoff: datetime) -> int:
        """Idempotent, so every process may run it."""
        async with self.database.session() as session:
            result = await session.execute(delete(AuditRow).where(AuditRow.at < cutoff))
            await session.commit()
            return result.rowcount or 0


# Rows kept in memory while the database cannot be written (~200 bytes each); beyond, the oldest are dropped.
MAX_PENDING = 100_000


class AuditLog:
    """Buffers entries (`record` never waits on the database) and writes them every second, in one statement."""

    def __init__(self, store: AuditStore, retention_days: int) -> None:
        self.store = store
        self.retention = timedelta(days=retention_days)
        self._pending: list[AuditEntry] = []
        self._dropped = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._flush_now = asyncio.Event()

    async def record_durably(self, entry: AuditEntry) -> None:
        """Record and wait until the row is committed (with whatever else is pending: one commit for all); after
        DURABLE_WAIT_SECONDS the row stays pending and the caller goes on."""
        waiter = asyncio.get_running_loop().create_future()
        self.record(entry)
        self._waiters.append(waiter)
        self._flush_now.set()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), DURABLE_WAIT_SECONDS)
        except TimeoutError:
            logger.warning("Audit row not committed within %g s: it stays pending", DURABLE_WAIT_SECONDS)

    def record(self, entry: AuditEntry) -> None:
        if len(self._pending) >= MAX_PENDING:  # the database has been away for long: memory stays bounded
            del self._pending[: len(self._pending) - MAX_PENDING + 1]
            self._dropped += 1
            if self._dropped % 1000 == 1:
                logger.warning("Audit log: %d rows dropped while the database could not be written", self._dropped)
        self._pending.append(entry)

    async def flush(self) -> None:
        async with self._lock:
            waiters, self._waiters = self._waiters, []  # each one's row is pending now: written below
            while self._pending:
                batch, self._pending = self._pending[:FLUSH_BATCH], self._pending[FLUSH_BATCH:]
                try:
                    await self.store.add_many(batch)
                except Exception:
                    self._pending = batch + self._pending  # kept for the next attempt
                    self._waiters = waiters + self._waiters
                    logger.exception("Could not write %d audit rows", len(batch))
                    raise
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def apply_retention(self) -> int:
        return await self.store.delete_older_than(utcnow() - self.retention)

    async def start(self) -> None:
        await self.apply_retention()
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_retention = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), FLUSH_INTERVAL_SECONDS)
            self._flush_now.clear()
            try:
                await self.flush()
                if loop.time() - last_retention >= RETENTION_INTERVAL_SECONDS:
                    last_retention = loop.time()
                    await self.apply_retention()
            except Exception:  # logged in flush or here; the writer keeps going (the rows stay pending)
                logger.exception("Audit writer iteration failed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception:  # the database is away at shutdown: logged in flush; the stop goes on
            logger.warning("Audit log: %d rows not written at shutdown", len(self._pending))


def cli_actor() -> str:
    """The actor of a server command run on this machine: `cli:<os user>`."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (a container's arbitrary uid)
        return "cli:unknown"


async def record_command(
    database: Database, command: str, work: Awaitable[T], targets: Callable[[T], dict[str, str]] | None = None
) -> T:
    """Run `work` (a server command writing to the database directly) and write its audit row at once: the status
    is 200, or the status of the HokusaiError it raised (re-raised)."""
    from hokusai.server.errors import HokusaiError

    store = AuditStore(database)
    entry = {"key_id": None, "actor": cli_actor(), "address": None, "method": "CLI", "route": command}
    try:
        result = await work
    except HokusaiError as error:
        await store.add_many([AuditEntry(**entry, targets={}, status=error.status_code)])
        raise
    await store.add_many([AuditEntry(**entry, targets=targets(result) if targets else {}, status=200)])
    return result
