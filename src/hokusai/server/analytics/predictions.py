"""Predictions: model versions run in the isolated worker processes (models/pool.py), each call recorded in the
service database, and the history and production metrics computed from those records.

The version's files are fetched through the one upstream client (models/files.py); the rows go to a worker as the
caller sent them (JSON) and the predictions come back as JSON. Nothing of the model is loaded in this process.
A version registered or moved to Production is expected to be called (`expect`): its files are fetched and a spare
worker started ahead, in the background, so its first call only loads the model.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import anyio
from sqlalchemy import Date, cast, func, select

from hokusai.server.analytics.models import PredictionRow
from hokusai.server.analytics.schemas import (
    DailyCount,
    DateRange,
    PredictionHistory,
    PredictResponse,
    ProductionMetrics,
)
from hokusai.server.db import Database, utcnow
from hokusai.server.errors import HokusaiError, InvalidRequest, Unprocessable
from hokusai.server.mlflow.registry_client import version_number
from hokusai.server.models.files import ModelFiles
from hokusai.server.models.pool import ModelSource, ModelUnusable, ModelWorkerPool


async def model_source(files: ModelFiles, name: str, version: str) -> ModelSource:
    """The version's files in the model cache (fetched the first time), named for the worker pool."""
    number = version_number(name, version)
    return ModelSource(f"{name}:{number}", await files.local_copy(name, number))


def row_count(inputs: list[dict[str, Any]] | dict[str, list[Any]]) -> int:
    """Rows of records or of columns; columns of different lengths are no table (checked here, before any worker)."""
    if isinstance(inputs, list):
        return len(inputs)
    lengths = {len(column) for column in inputs.values()}
    if len(lengths) > 1:
        raise Unprocessable("inputs cannot be read as a table: its columns have different lengths")
    return lengths.pop() if lengths else 0


class PredictionStore:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def record(self, name: str, version: str, rows: int, latency_ms: float, success: bool) -> None:
        async with self._database.session() as session, session.begin():
            session.add(
                PredictionRow(
                    model_name=name,
                    version=version,
                    predicted_at=utcnow(),
                    rows=rows,
                    latency_ms=latency_ms,
                    success=success,
                )
            )

    async def history(self, name: str, version: str, start: date | None, end: date | None) -> PredictionHistory:
        """Counts per UTC day between `start` and `end` (inclusive), one grouped query."""
        async with self._database.session() as session:
            day = _utc_day(PredictionRow.predicted_at, session.bind.dialect.name)
            query = (
                select(
                    day,
                    func.count(),
                    func.sum(PredictionRow.rows).filter(PredictionRow.success.is_(True)),
                    func.count().filter(PredictionRow.success.is_(False)),
                )
                .where(PredictionRow.model_name == name, PredictionRow.version == version)
                .group_by(day)
                .order_by(day)
            )
            if start is not None:
                query = query.where(PredictionRow.predicted_at >= datetime.combine(start, datetime.min.time(), UTC))
            if end is not None:
                next_day = datetime.combine(end + timedelta(days=1), datetime.min.time(), UTC)
                query = query.where(PredictionRow.predicted_at < next_day)
            days = (await session.execute(query)).all()
        daily = [DailyCount(date=str(row[0])[:10], count=int(row[2] or 0)) for row in days]
        return PredictionHistory(
            total_predictions=sum(count.count for count in daily),
            total_requests=sum(int(row[1]) for row in days),
            failed_requests=sum(int(row[3] or 0) for row in days),
            date_range=DateRange(start=daily[0].date, end=daily[-1].date) if daily else None,
            daily_counts=daily,
        )

    async def production_metrics(self, name: str, version: str, window_seconds: float) -> ProductionMetrics:
        since = utcnow() - timedelta(seconds=window_seconds)
        query = select(PredictionRow.latency_ms, PredictionRow.rows, PredictionRow.success).where(
            PredictionRow.model_name == name, PredictionRow.version == version, PredictionRow.predicted_at >= since
        )
        async with self._database.session() as session:
            records = (await session.execute(query)).all()
        latencies = sorted(latency for latency, _, success in records if success)
        failed = sum(1 for *_, success in records if not success)
        p50 = p95 = None
        if latencies:
            p50 = statistics.median(latencies)
            p95 = latencies[0] if len(latencies) == 1 else statistics.quantiles(latencies, n=20, method="inclusive")[18]
        return ProductionMetrics(
            window_seconds=window_seconds,
            request_count=len(records),
            prediction_count=sum(rows for _, rows, success in records if success),
            error_rate=failed / len(records) if records else None,
            latency_ms=p50,
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            throughput_rps=len(records) / window_seconds,
        )


def _utc_day(column: Any, dialect: str) -> Any:
    # PostgreSQL would cut a timestamptz at the session's time zone; days here are UTC days.
    if dialect == "postgresql":
        return cast(func.timezone("UTC", column), Date)
    return func.date(column)


class PredictionService:
    def __init__(
        self, files: ModelFiles, pool: ModelWorkerPool, store: PredictionStore, max_rows: int, prefetch: bool = True
    ) -> None:
        self.files = files
        self.pool = pool
        self.store = store
        self._max_rows = max_rows
        self._prefetch = prefetch

    def expect(self, name: str, version: str) -> None:
        """The version was registered or entered Production: calls may follow. Fetch its files (HOKUSAI_MODEL_PREFETCH)
        and keep spare workers (HOKUSAI_MODEL_SPARE_WORKERS) from now on, both in the background: this returns at
        once and never fails its caller (the registration or transition is done either way)."""
        self.pool.warm()
        if self._prefetch:
            self.files.prefetch(name, version)

    async def predict(
        self, name: str, version: str, inputs: list[dict[str, Any]] | dict[str, list[Any]]
    ) -> PredictResponse:
        """`latency_ms` is what the caller waited for: fetching and loading the model when this call did."""
        started = time.perf_counter()
        source = await model_source(self.files, name, version)
        rows = row_count(inputs)
        if rows == 0:
            raise InvalidRequest("inputs holds no rows")
        if rows > self._max_rows:
            raise Unprocessable(f"inputs holds {rows} rows; at most {self._max_rows} per call")
        payload = await anyio.to_thread.run_sync(_json_bytes, inputs) if rows > 1000 else _json_bytes(inputs)
        model_name, number = source.key.rsplit(":", 1)
        try:
            answer = await self.pool.run(source, "predict", "json", payload)
        except ModelUnusable:
            raise
        except HokusaiError:  # rejected input, out of memory, timed out, crashed: a failed prediction call
            await self.store.record(model_name, number, rows, _ms_since(started), success=False)
            raise
        latency_ms = _ms_since(started)
        await self.store.record(model_name, number, rows, latency_ms, success=True)
        return PredictResponse(
            model=source.key,
            predictions=answer.data,
            rows=rows,
            latency_ms=latency_ms,
            loaded=answer.loaded,
            load_ms=answer.load_ms,
        )


def _json_bytes(inputs: Any) -> bytes:
    # Values came from a JSON body, so they encode; a NaN cannot come from one.
    return json.dumps(inputs, separators=(",", ":")).encode()


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
