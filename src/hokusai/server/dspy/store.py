"""Program declarations and execution records in the service database."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import URL, Connection, case, create_engine, delete, event, func, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import NullPool

from hokusai.server.db import Database, engine_options, sqlite_pragmas, utcnow
from hokusai.server.dspy.models import DspyExecutionRow, DspyProgramRow
from hokusai.server.dspy.schemas import ProgramDeclaration, ProgramStatistics, Statistics
from hokusai.server.errors import Conflict, NotFound, ServiceUnavailable

logger = logging.getLogger(__name__)


class ProgramNotFound(NotFound):
    def __init__(self, program_id: str, version: str | None = None) -> None:
        shown = f"{program_id} version {version}" if version else program_id
        super().__init__(f"DSPy program not found: {shown}")


def _version_order(version: str) -> tuple:
    """1.10.0 after 1.9.0: numeric parts compare as numbers."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in version.replace("-", ".").split(".")
    )


class ProgramStore:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def create(
        self, declaration: ProgramDeclaration, key_id: str | None, signatures: list[str]
    ) -> DspyProgramRow:
        now = utcnow()
        row = DspyProgramRow(
            program_id=declaration.program_id,
            version=declaration.version,
            name=declaration.name,
            description=declaration.description,
            module="pickled" if declaration.source else declaration.module,
            source=declaration.source,
            signatures=signatures,
            instructions=declaration.instructions,
            demos=declaration.demos,
            lm=declaration.lm.model_dump() if declaration.lm else None,
            created_by=key_id,
            created_at=now,
            updated_at=now,
        )
        try:
            async with self._database.session() as session, session.begin():
                session.add(row)
        except IntegrityError:
            raise Conflict(
                f"DSPy program {declaration.program_id} version {declaration.version} exists: "
                "update it with PUT, or register another version"
            ) from None
        return row

    async def update(self, declaration: ProgramDeclaration, signatures: list[str]) -> DspyProgramRow:
        async with self._database.session() as session, session.begin():
            row = await session.get(DspyProgramRow, (declaration.program_id, declaration.version))
            if row is None:
                raise ProgramNotFound(declaration.program_id, declaration.version)
            row.name = declaration.name
            row.description = declaration.description
            row.module = "pickled" if declaration.source else declaration.module
            row.source = declaration.source
            row.signatures = signatures
            row.instructions = declaration.instructions
            row.demos = declaration.demos
            row.lm = declaration.lm.model_dump() if declaration.lm else None
            row.updated_at = utcnow()
        return row

    async def get(self, program_id: str, version: str | None = None) -> DspyProgramRow:
        """One version, or the latest one (highest version number) when `version` is None."""
        async with self._database.session() as session:
            if version is not None:
                row = await session.get(DspyProgramRow, (program_id, version))
            else:
                rows = (
                    await session.scalars(select(DspyProgramRow).where(DspyProgramRow.program_id == program_id))
                ).all()
                row = max(rows, key=lambda r: _version_order(r.version)) if rows else None
        if row is None:
            raise ProgramNotFound(program_id, version)
        return row

    async def list(self) -> list[DspyProgramRow]:
        async with self._database.session() as session:
            rows = (await session.scalars(select(DspyProgramRow))).all()
        return sorted(rows, key=lambda r: (r.program_id, _version_order(r.version)))

    async def delete(self, program_id: str, version: str | None) -> int:
        """Delete one version, or every version when `version` is None; how many were deleted."""
        query = delete(DspyProgramRow).where(DspyProgramRow.program_id == program_id)
        if version is not None:
            query = query.where(DspyProgramRow.version == version)
        async with self._database.session() as session, session.begin():
            deleted = (await session.execute(query)).rowcount
        if not deleted:
            raise ProgramNotFound(program_id, version)
        return deleted


@dataclass
class ExecutionOutcome:
    execution_id: str
    program_id: str
    program_version: str
    batch_id: str | None
    key_id: str | None
    mode: str
    success: bool
    error: str | None
    error_type: str | None
    duration_ms: float
    input_bytes: int
    output_bytes: int
    inputs: dict | None
    outputs: dict | None
    usage: dict | None
    started_at: datetime


class RecordNotSaved(ServiceUnavailable):
    """An execution ran but its record could not be committed: its answer is withheld, never sent unrecorded."""

    def __init__(self) -> None:
        super().__init__("The execution ran, but its record could not be saved: its result is withheld; try again")


@dataclass
class _Waiting:
    outcomes: list[ExecutionOutcome]
    saved: asyncio.Future[None]


class RecordWriter:
    """Execution records committed before their answers leave, many executions per commit (group commit).

    One task per process writes, on a database connection of its own (no pool checkout or ping per commit). A
    request hands over its records and waits for the commit that holds them; the records of every request that
    finishes while a commit is in flight go together in the next transaction, so a lone execution pays one commit
    and a busy process one commit per group. At most `capacity` requests wait at once; the next ones wait for room:
    nothing is dropped. A failed transaction is retried once, each request's records alone on a fresh connection, so
    a record the database refuses fails only its own request (RecordNotSaved, 503). `aclose` writes everything handed
    over before it returns; a write after it commits on its own.
    """

    def __init__(self, store: ExecutionStore, capacity: int = 1024, group_limit: int = 1000) -> None:
        """`group_limit`: records per transaction (a batch's records always go in one, however many)."""
        self._store = store
        self._room = asyncio.Semaphore(capacity)
        self._group_limit = group_limit
        self._waiting: deque[_Waiting] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._connection: RecordConnection | None = None
        self._closed = False
        self._writes = 0  # write() calls under way, which aclose waits for
        self._idle = asyncio.Event()

    @property
    def queued(self) -> int:
        """Requests whose records wait for the next commit (not counting the commit in flight)."""
        return len(self._waiting)

    async def write(self, outcomes: list[ExecutionOutcome]) -> None:
        """Return once `outcomes` are committed (one transaction); RecordNotSaved if they could not be."""
        if not outcomes:
            return
        self._writes += 1
        self._idle.clear()
        try:
            async with self._room:
                if self._closed:
                    await self._save_alone(outcomes)
                    return
                waiting = _Waiting(outcomes, asyncio.get_running_loop().create_future())
                self._waiting.append(waiting)
                self._wakeup.set()
                if self._task is None or self._task.done():
                    self._start()
                # Shielded: a request cancelled while it waits leaves its records to be written all the same.
                await asyncio.shield(waiting.saved)
        finally:
            self._writes -= 1
            if not self._writes:
                self._idle.set()

    def _start(self) -> None:
        # A context of its own: not that of the request that happened to start it (its request id, in the logs).
        self._task = asyncio.create_task(self._run(), name="dspy-record-writer", context=contextvars.Context())

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._waiting:
                group, count = [], 0
                while self._waiting and (not group or count + len(self._waiting[0].outcomes) <= self._group_limit):
                    count += len(self._waiting[0].outcomes)
                    group.append(self._waiting.popleft())
                try:
                    await self._commit(group)
                except BaseException:  # cancelled, or a bug: no request may wait forever for this group
                    _settle(group, RecordNotSaved)
                    raise
            if self._closed:
                return

    async def _commit(self, group: list[_Waiting]) -> None:
        try:
            await self._store.record([outcome for waiting in group for outcome in waiting.outcomes], await self._open())
        except Exception:  # whatever the cause (a broken connection, a row refused): retried below, request by request
            logger.warning("DSPy execution records could not be committed; retrying each request's", exc_info=True)
            await self._discard()
        else:
            _settle(group, None)
            return
        for index, waiting in enumerate(group):
            try:
                connection = await self._open()
            except Exception:  # the database is away: the rest of the group fails now, not after a timeout each
                logger.exception("No connection to write DSPy execution records: %d requests fail", len(group) - index)
                _settle(group[index:], RecordNotSaved)
                return
            try:
                await self._store.record(waiting.outcomes, connection)
            except Exception:
                logger.exception(
                    "DSPy execution record(s) %s could not be saved: the request fails",
                    ", ".join(outcome.execution_id for outcome in waiting.outcomes),
                )
                await self._discard()
                _settle([waiting], RecordNotSaved)
            else:
                _settle([waiting], None)

    async def _save_alone(self, outcomes: list[ExecutionOutcome]) -> None:
        try:
            await self._store.record(outcomes)
        except Exception:
            logger.exception("DSPy execution records could not be saved: the request fails")
            raise RecordNotSaved() from None

    async def _open(self) -> RecordConnection:
        if self._connection is None:
            self._connection = await self._store.connect()
        return self._connection

    async def _discard(self) -> None:
        """Drop the writer's connection (it may be broken); the next commit opens another."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close(broken=True)

    async def aclose(self) -> None:
        """Write everything handed over, then release the connection."""
        self._closed = True
        self._wakeup.set()
        if self._waiting and (self._task is None or self._task.done()):
            self._start()
        if self._task is not None and not self._task.done():
            await self._task
        if self._writes:
            await self._idle.wait()
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()


def _settle(group: list[_Waiting], error: type[Exception] | None) -> None:
    for waiting in group:
        if not waiting.saved.done():
            if error is None:
                waiting.saved.set_result(None)
            else:
                waiting.saved.set_exception(error())


class RecordConnection(ABC):
    """The record writer's own connection: one transaction per `insert`."""

    @abstractmethod
    async def insert(self, rows: list[dict]) -> None: ...

    @abstractmethod
    async def close(self, broken: bool = False) -> None:
        """Release it; `broken`: after a failure, when it may be unusable (it is not given back to a pool)."""


class AsyncRecordConnection(RecordConnection):
    """PostgreSQL: the async driver, whose transaction is two round trips on the event loop."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def insert(self, rows: list[dict]) -> None:
        async with self._connection.begin():
            await self._connection.execute(insert(DspyExecutionRow), rows)

    async def close(self, broken: bool = False) -> None:
        try:
            if broken:
                await self._connection.invalidate()
            await self._connection.close()
        except SQLAlchemyError:  # already broken: nothing of it is left to release
            logger.debug("Closing the DSPy record connection", exc_info=True)


class SqliteRecordConnection(RecordConnection):
    """SQLite: the standard driver in a thread of its own, so that a commit is one hop between threads. aiosqlite
    makes four (cursor, execute, close, commit): 0.3-0.5 ms more per commit, measured on a busy 2-core machine."""

    def __init__(self, url: URL) -> None:
        self._engine = create_engine(url, poolclass=NullPool, **engine_options(url.render_as_string(False)))
        event.listen(self._engine, "connect", sqlite_pragmas)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="dspy-records")
        self._connection: Connection | None = None

    async def insert(self, rows: list[dict]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._insert, rows)

    def _insert(self, rows: list[dict]) -> None:
        if self._connection is None:
            self._connection = self._engine.connect()
        with self._connection.begin():
            self._connection.execute(insert(DspyExecutionRow), rows)

    async def close(self, broken: bool = False) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=False)

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        try:
            if connection is not None:
                connection.close()
        except SQLAlchemyError:  # already broken: nothing of it is left to release
            logger.debug("Closing the DSPy record connection", exc_info=True)
        self._engine.dispose()


class ExecutionStore:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def connect(self) -> RecordConnection:
        """A connection of the caller's own (the record writer keeps one)."""
        url = self._database.engine.url
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            return SqliteRecordConnection(url.set(drivername="sqlite"))
        return AsyncRecordConnection(await self._database.engine.connect())

    async def record(self, outcomes: list[ExecutionOutcome], connection: RecordConnection | None = None) -> None:
        """One transaction for these records (not one per item), on `connection` or on a pooled one."""
        rows = [_execution_row(outcome) for outcome in outcomes]
        if connection is not None:
            await connection.insert(rows)
            return
        async with self._database.engine.begin() as pooled:
            await pooled.execute(insert(DspyExecutionRow), rows)

    async def get(self, execution_id: str) -> DspyExecutionRow | None:
        async with self._database.session() as session:
            return await session.get(DspyExecutionRow, execution_id)

    async def statistics(self) -> Statistics:
        """Totals, success rate, average and p95 time, overall and per program, from the records."""
        succeeded = func.sum(case((DspyExecutionRow.success.is_(True), 1), else_=0))
        query = select(
            DspyExecutionRow.program_id, func.count(), succeeded, func.avg(DspyExecutionRow.duration_ms)
        ).group_by(DspyExecutionRow.program_id)
        async with self._database.session() as session:
            groups = (await session.execute(query)).all()
            per_program = {}
            for program_id, count, ok, average in groups:
                p95 = await self._p95(session, DspyExecutionRow.program_id == program_id, count)
                per_program[program_id] = _stats(count, ok, average, p95)
            total = sum(count for _, count, _, _ in groups)
            ok_total = sum(int(ok or 0) for _, _, ok, _ in groups)
            average_total = (
                sum(float(average or 0) * count for _, count, _, average in groups) / total if total else None
            )
            p95_total = await self._p95(session, None, total)
        overall = _stats(total, ok_total, average_total, p95_total)
        return Statistics(**overall.model_dump(), per_program=per_program)

    @staticmethod
    async def _p95(session, condition, count: int) -> float | None:
        """The 95th percentile (nearest rank) by an ordered, offset read: the same SQL on SQLite and PostgreSQL."""
        if not count:
            return None
        rank = max(0, -(-95 * count // 100) - 1)
        query = select(DspyExecutionRow.duration_ms).order_by(DspyExecutionRow.duration_ms).offset(rank).limit(1)
        if condition is not None:
            query = query.where(condition)
        return await session.scalar(query)


def _execution_row(outcome: ExecutionOutcome) -> dict:
    row = dict(vars(outcome))
    row["id"] = row.pop("execution_id")
    if outcome.error is not None:  # a language model's error text may hold NUL, which PostgreSQL's text refuses
        row["error"] = outcome.error.replace("\x00", "\\x00")
    return row


def _stats(count: int, ok: int | None, average_ms: float | None, p95_ms: float | None) -> ProgramStatistics:
    return ProgramStatistics(
        total_executions=count,
        successful_executions=int(ok or 0),
        success_rate=(int(ok or 0) / count) if count else None,
        average_execution_time=float(average_ms) / 1000 if average_ms is not None else None,
        p95_execution_time=float(p95_ms) / 1000 if p95_ms is not None else None,
    )
