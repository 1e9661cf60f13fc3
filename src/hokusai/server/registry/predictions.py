"""Predictions: model versions loaded with mlflow.pyfunc (bounded LRU), each call recorded in the service database,
and the history and production metrics computed from those records.

The version's artifacts are fetched through the one upstream client (so the gateway's credentials, breaker and
timeouts apply), into HOME/model-cache; loading and predicting run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import shutil
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import Date, cast, func, select

from hokusai.server.db import Database, utcnow
from hokusai.server.errors import InvalidRequest, Unprocessable
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.registry.download import list_files, save_files, served_artifact_root
from hokusai.server.registry.mlflow_api import MlflowApi
from hokusai.server.registry.models import PredictionRow
from hokusai.server.registry.schemas import (
    DailyCount,
    DateRange,
    PredictionHistory,
    PredictResponse,
    ProductionMetrics,
)
from hokusai.server.registry.service import ModelNotFound, version_number


class ModelUnusable(Unprocessable):
    pass


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    pyfunc: Any  # mlflow.pyfunc.PyFuncModel
    directory: Path


class ModelLoader:
    """Loaded versions, the least recently used dropped beyond `capacity`; one load per version at a time.

    Their files stay on disk under `cache_dir` up to `max_bytes` in all; beyond, the directories used least recently
    go (never one whose model is loaded).
    """

    def __init__(self, upstream: MlflowUpstream, cache_dir: Path, capacity: int, max_bytes: int) -> None:
        self._upstream = upstream
        self._api = MlflowApi(upstream)
        self._cache_dir = cache_dir
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._loaded: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._loading: dict[tuple[str, str], asyncio.Lock] = {}

    async def load(self, name: str, version: str) -> LoadedModel:
        key = (name, version_number(name, version))
        if (loaded := self._loaded.get(key)) is not None:
            self._loaded.move_to_end(key)
            return loaded
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            if (loaded := self._loaded.get(key)) is None:
                loaded = await self._load(*key)
                self._loaded[key] = loaded
                while len(self._loaded) > self._capacity:
                    self._loaded.popitem(last=False)
        self._loading.pop(key, None)
        self._loaded.move_to_end(key)
        return loaded

    async def _load(self, name: str, version: str) -> LoadedModel:
        directory = await self.local_copy(name, version)
        try:
            pyfunc = await anyio.to_thread.run_sync(_load_pyfunc, directory)
        except Exception as exc:  # whatever the flavor raises: the model cannot serve, the service can
            raise ModelUnusable(f"Model {name}:{version} could not be loaded: {_first_line(exc)}") from exc
        return LoadedModel(name, version, pyfunc, directory)

    async def local_copy(self, name: str, version: str) -> Path:
        """The version's files on local disk, fetched through the upstream client the first time."""
        version = version_number(name, version)
        located = await self._api(
            "GET",
            "/model-versions/get-download-uri",
            params={"name": name, "version": version},
            not_found=ModelNotFound(name, version),
        )
        root = served_artifact_root(located["artifact_uri"])
        # Versions never change their files, so a complete download is reused (the root names the files).
        directory = self._cache_dir / hashlib.sha256(f"{name}\0{version}\0{root}".encode()).hexdigest()[:32]
        if await anyio.Path(directory).exists():
            await anyio.Path(directory).touch()  # its last use, for the disk bound
        else:
            await self._fetch(root, directory)
            keep = {directory} | {loaded.directory for loaded in self._loaded.values()}
            await anyio.to_thread.run_sync(trim_directory, self._cache_dir, self._max_bytes, keep)
        return directory

    async def _fetch(self, root: str, directory: Path) -> None:
        """Into a staging directory, renamed into place when complete: a half-fetched model is never loaded, and two
        processes sharing HOME cannot mix their files."""
        staging = directory.with_name(f"{directory.name}.{secrets.token_hex(4)}.partial")
        try:
            await anyio.Path(staging).mkdir(parents=True)
            await save_files(self._upstream, root, await list_files(self._upstream, root), staging)
            await anyio.Path(staging).rename(directory)
        except OSError:
            if not await anyio.Path(directory).exists():
                raise
        finally:  # left over when another process won the rename, or when the fetch failed
            await anyio.to_thread.run_sync(shutil.rmtree, staging, True)


def trim_directory(root: Path, max_bytes: int, keep: set[Path]) -> list[Path]:
    """Blocking: remove the least recently used subdirectories of `root` (not those in `keep`, not a fetch in
    progress) until the whole holds at most `max_bytes`; what was removed."""
    entries = []
    for child in root.iterdir():
        if child.is_dir() and not child.name.endswith(".partial"):
            size = sum(path.stat().st_size for path in child.rglob("*") if path.is_file())
            entries.append((child.stat().st_mtime, child, size))
    total = sum(size for _, _, size in entries)
    removed = []
    for _, child, size in sorted(entries):
        if total <= max_bytes:
            break
        if child in keep:
            continue
        shutil.rmtree(child, ignore_errors=True)
        total -= size
        removed.append(child)
    return removed


def _load_pyfunc(directory: Path) -> Any:
    import mlflow.pyfunc  # heavy (~1 s): imported on the first prediction, not at start-up

    return mlflow.pyfunc.load_model(str(directory))


def input_frame(inputs: list[dict[str, Any]] | dict[str, list[Any]]) -> Any:
    import pandas as pd

    try:
        return pd.DataFrame(inputs)
    except ValueError as exc:  # columns of different lengths, mixed shapes
        raise Unprocessable(f"inputs cannot be read as a table: {exc}") from None


def predict_rows(model: LoadedModel, frame: Any) -> list[Any]:
    """Blocking: run in a worker thread. The model's own complaint about the input is a 422."""
    try:
        output = model.pyfunc.predict(frame)
    except Exception as exc:  # schema enforcement and flavors raise many kinds; each is the caller's input problem
        raise Unprocessable(f"Model {model.name}:{model.version} rejected the input: {_first_line(exc)}") from exc
    return jsonable_predictions(output)


def jsonable_predictions(output: Any) -> list[Any]:
    import numpy as np
    import pandas as pd

    if isinstance(output, pd.DataFrame):
        rows = output.to_dict(orient="records")
    elif isinstance(output, pd.Series | np.ndarray):
        rows = output.tolist()
    elif isinstance(output, list):
        rows = output
    else:
        rows = [output]
    return [_finite(row) for row in rows]


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null. NumPy scalars become Python ones."""
    if hasattr(value, "item") and not isinstance(value, list | dict):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


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
    def __init__(self, loader: ModelLoader, store: PredictionStore, max_rows: int) -> None:
        self.loader = loader
        self.store = store
        self._max_rows = max_rows

    async def predict(
        self, name: str, version: str, inputs: list[dict[str, Any]] | dict[str, list[Any]]
    ) -> PredictResponse:
        model = await self.loader.load(name, version)
        frame = await anyio.to_thread.run_sync(input_frame, inputs)
        rows = len(frame)
        if rows == 0:
            raise InvalidRequest("inputs holds no rows")
        if rows > self._max_rows:
            raise Unprocessable(f"inputs holds {rows} rows; at most {self._max_rows} per call")
        started = time.perf_counter()
        try:
            predictions = await anyio.to_thread.run_sync(predict_rows, model, frame)
        except Unprocessable:
            await self.store.record(model.name, model.version, rows, _ms_since(started), success=False)
            raise
        latency_ms = _ms_since(started)
        await self.store.record(model.name, model.version, rows, latency_ms, success=True)
        return PredictResponse(
            model=f"{model.name}:{model.version}", predictions=predictions, rows=rows, latency_ms=latency_ms
        )


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
