"""Program declarations and execution records in the service database."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, delete, func, select
from sqlalchemy.exc import IntegrityError

from hokusai.server.db import Database, utcnow
from hokusai.server.dspy.models import DspyExecutionRow, DspyProgramRow
from hokusai.server.dspy.schemas import ProgramDeclaration, ProgramStatistics, Statistics
from hokusai.server.errors import Conflict, NotFound

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


class RecordWriter:
    """Execution records written a moment after the answer, many per transaction (~1 ms less per execution).

    Readers in this process (GET execution, stats) flush first, so they always see their own executions; another
    process sees them within `interval` seconds. A crash loses at most that moment's records.
    """

    def __init__(self, store: ExecutionStore, interval: float = 0.05) -> None:
        self._store = store
        self._interval = interval
        self._pending: list[ExecutionOutcome] = []
        self._lock = asyncio.Lock()
        self._scheduled: asyncio.Task | None = None

    def add(self, outcomes: list[ExecutionOutcome]) -> None:
        self._pending.extend(outcomes)
        if self._scheduled is None or self._scheduled.done():
            self._scheduled = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self._interval)
        try:
            await self.flush()
        except Exception:  # the database is away: the records of this moment are lost, the service goes on
            logger.exception("DSPy execution records could not be written")

    async def flush(self) -> None:
        async with self._lock:
            taken, self._pending = self._pending, []
            if taken:
                await self._store.record(taken)

    async def aclose(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
        await self.flush()


class ExecutionStore:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def record(self, outcomes: list[ExecutionOutcome]) -> None:
        """One transaction for a batch's records (not one per item)."""
        async with self._database.session() as session, session.begin():
            for outcome in outcomes:
                session.add(
                    DspyExecutionRow(
                        id=outcome.execution_id,
                        program_id=outcome.program_id,
                        program_version=outcome.program_version,
                        batch_id=outcome.batch_id,
                        key_id=outcome.key_id,
                        mode=outcome.mode,
                        success=outcome.success,
                        error=outcome.error,
                        error_type=outcome.error_type,
                        duration_ms=outcome.duration_ms,
                        input_bytes=outcome.input_bytes,
                        output_bytes=outcome.output_bytes,
                        inputs=outcome.inputs,
                        outputs=outcome.outputs,
                        usage=outcome.usage,
                        started_at=outcome.started_at,
                    )
                )

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


def _stats(count: int, ok: int | None, average_ms: float | None, p95_ms: float | None) -> ProgramStatistics:
    return ProgramStatistics(
        total_executions=count,
        successful_executions=int(ok or 0),
        success_rate=(int(ok or 0) / count) if count else None,
        average_execution_time=float(average_ms) / 1000 if average_ms is not None else None,
        p95_execution_time=float(p95_ms) / 1000 if p95_ms is not None else None,
    )
