"""Evaluating a model version on a dataset: scikit-learn metrics on the version's own predictions, logged to MLflow
as a run tagged with the version (so compare and metrics see it), recorded in the service database.

The predictions (and class probabilities) come from a model worker process (models/pool.py), the rows sent as Arrow;
only the scoring of the returned arrays runs here.

Datasets are files under HOKUSAI_DATASETS_DIR (CSV, Parquet, JSON lines) or MLflow artifact URIs; nothing else is
read. Up to `sync_max_bytes` the evaluation runs within the request; beyond, the request answers 202 with an id and
the evaluation runs in the background.

Each evaluation is leased to the process running it (leases.py): a heartbeat renews the leases of this process's
evaluations and takes over those of processes that died, so work is resumed by a surviving process, and a process
that starts never touches what another live process is running.

The outcome is announced (evaluation.completed / evaluation.failed) in the transaction that writes it, as the
caller who asked for the evaluation (leases.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
from sqlalchemy import insert, select

from hokusai.server.analytics.leases import INTERRUPTED, REQUESTED_BY, EvaluationLeases, actor_record
from hokusai.server.analytics.models import EvaluationRow
from hokusai.server.analytics.predictions import model_source
from hokusai.server.analytics.schemas import EvaluateRequest, Evaluation
from hokusai.server.analytics.versions import (
    EVALUATED_MODEL_TAG,
    EVALUATED_VERSION_TAG,
    EVALUATION_PREFIX,
    VersionReader,
)
from hokusai.server.db import Database, utcnow
from hokusai.server.errors import HokusaiError, InvalidRequest, NotFound, Unprocessable
from hokusai.server.events.outbox import Actor, EventOutbox
from hokusai.server.instance import instance_id
from hokusai.server.mlflow.registry_client import ModelVersion
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.models.files import ModelFiles
from hokusai.server.models.pool import ModelSource, ModelWorkerPool
from hokusai.server.models.protocol import frame_to_arrow
from hokusai.server.registry.download import ArtifactFile, save_files, served_artifact_root
from hokusai.server.registry.registration import RUN_ARTIFACT
from hokusai.server.timestamps import iso

logger = logging.getLogger(__name__)
DATASET_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PROBABILITY_METRICS = {"roc_auc", "log_loss"}
RUNNING_AT_ONCE = 2  # each holds a dataset and a model in memory


class EvaluationNotFound(NotFound):
    def __init__(self, evaluation_id: str) -> None:
        super().__init__(f"Evaluation not found: {evaluation_id}")


@dataclass(frozen=True)
class DatasetLocation:
    """A dataset the service may read: a local file, or a file served by MLflow (`root`/`path`)."""

    display: str
    kind: str  # csv, parquet, jsonl
    size: int
    local: Path | None = None
    artifact_root: str | None = None
    artifact_path: str | None = None


def dataset_kind(name: str) -> str:
    kind = DATASET_SUFFIXES.get(PurePosixPath(name).suffix.lower())
    if kind is None:
        raise InvalidRequest(f"dataset_path must name a .csv, .parquet or .jsonl file, got {name!r}")
    return kind


def local_dataset(dataset_path: str, root: Path) -> DatasetLocation:
    """A path under the datasets directory (relative to it, or absolute inside it); no `..`, no symlink out."""
    if "\0" in dataset_path or ".." in PurePosixPath(dataset_path).parts:
        raise InvalidRequest("dataset_path may not contain '..'")
    kind = dataset_kind(dataset_path)
    candidate = Path(dataset_path)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise InvalidRequest(f"dataset_path must be under the datasets directory ({root}) or an MLflow artifact URI")
    if not resolved.is_file():
        raise InvalidRequest(f"Dataset not found: {dataset_path}")
    return DatasetLocation(dataset_path, kind, resolved.stat().st_size, local=resolved)


def read_frame(path: Path, kind: str) -> Any:
    import pandas as pd

    try:
        if kind == "csv":
            return pd.read_csv(path)
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True)
    except Exception as exc:  # pandas/pyarrow raise many parser errors; each means an unreadable file
        raise InvalidRequest(f"Dataset cannot be read as {kind}: {str(exc).splitlines()[0][:300]}") from exc


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def read_dataset(path: Path, kind: str) -> tuple[Any, str]:
    """Blocking (worker thread): the table and the file's SHA-256, in one hop."""
    return read_frame(path, kind), file_digest(path)


def split_target(frame: Any, target: str) -> tuple[Any, Any]:
    """Blocking (worker thread): the features and the truth of a dataset."""
    if target not in frame.columns:
        raise InvalidRequest(
            f"target_column {target!r} is not in the dataset (columns: {', '.join(map(str, frame.columns))})"
        )
    if len(frame) == 0:
        raise InvalidRequest("The dataset holds no rows")
    return frame.drop(columns=[target]), frame[target].to_numpy()


def encode_features(features: Any) -> tuple[str, bytes]:
    """Blocking: the rows for a worker, as Arrow (dtypes kept), or as JSON records when a column mixes types Arrow
    cannot hold in one column."""
    import pyarrow as pa

    try:
        return "arrow", frame_to_arrow(features)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return "json", features.to_json(orient="records").encode()


def score(truth: Any, predictions: list[Any], probabilities: list[Any] | None, wanted: list[str]) -> dict[str, float]:
    """Blocking (worker thread): the version's predictions (and class probabilities) scored with scikit-learn."""
    import numpy as np
    from sklearn import metrics as sk

    predicted = np.asarray(predictions)
    if predicted.ndim > 1 and predicted.shape[1] == 1:
        predicted = predicted.ravel()
    proba = np.asarray(probabilities, dtype=float) if probabilities is not None else None
    labels = set(np.unique(truth).tolist())
    average = "binary" if labels <= {0, 1} or labels <= {False, True} else "weighted"
    scorers = {
        "accuracy": lambda: sk.accuracy_score(truth, predicted),
        "precision": lambda: sk.precision_score(truth, predicted, average=average, zero_division=0),
        "recall": lambda: sk.recall_score(truth, predicted, average=average, zero_division=0),
        "f1_score": lambda: sk.f1_score(truth, predicted, average=average, zero_division=0),
        "roc_auc": lambda: sk.roc_auc_score(truth, proba[:, 1] if proba.shape[1] == 2 else proba, multi_class="ovr"),
        "log_loss": lambda: sk.log_loss(truth, proba),
        "mse": lambda: sk.mean_squared_error(truth, predicted),
        "rmse": lambda: math.sqrt(sk.mean_squared_error(truth, predicted)),
        "mae": lambda: sk.mean_absolute_error(truth, predicted),
        "r2": lambda: sk.r2_score(truth, predicted),
    }
    scores = {}
    for metric in wanted:
        try:
            scores[metric] = float(scorers[metric]())
        except (ValueError, TypeError, IndexError) as exc:  # e.g. accuracy of continuous predictions
            raise Unprocessable(
                f"{metric} cannot be computed for these predictions: {str(exc).splitlines()[0]}"
            ) from exc
    return scores


class EvaluationService:
    def __init__(
        self,
        upstream: MlflowUpstream,
        database: Database,
        reader: VersionReader,
        files: ModelFiles,
        pool: ModelWorkerPool,
        datasets_root: Path,
        sync_max_bytes: int,
        lease_seconds: float = 60.0,
        owner: str | None = None,
        outbox: EventOutbox | None = None,
    ) -> None:
        """`outbox`: where each evaluation's outcome is announced (without one, outcomes are only recorded)."""
        self._upstream = upstream
        self._mlflow = reader.mlflow
        self._database = database
        self._reader = reader
        self._files = files
        self._pool = pool
        self._datasets_root = datasets_root
        self._sync_max_bytes = sync_max_bytes
        self._leases = EvaluationLeases(database, owner or instance_id(), lease_seconds, outbox)
        self._in_flight: set[str] = set()  # this process's evaluations not yet finished: the leases it renews
        # Who asked for the evaluations this process was asked for; background ones also keep it in their stored
        # request, for a process that takes one over.
        self._requested_by: dict[str, Actor] = {}
        self._background: dict[str, asyncio.Task] = {}
        self._running = asyncio.Semaphore(RUNNING_AT_ONCE)
        self._heartbeat: asyncio.Task | None = None
        self._wake = asyncio.Event()  # an evaluation finished: room to resume an abandoned one
        self._closing = False

    async def start(self) -> None:
        """Take over what dead processes left (expired leases; never a live process's work), then keep this
        process's leases alive and keep looking."""
        await self._reclaim()
        self._heartbeat = asyncio.create_task(self._beat(), name="evaluation-heartbeat")

    async def aclose(self) -> None:
        """Stop the heartbeat, then cancel the background evaluations: each is released (queued, no lease), so another
        process, or this one's successor, runs it again at once."""
        self._closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        background = dict(self._background)
        for task in background.values():
            task.cancel()
        if background:
            await asyncio.gather(*background.values(), return_exceptions=True)
        # A task cancelled before its first step never ran its own release (the heartbeat's last claim, a 202 of
        # the last instant): still in flight, so released here.
        for evaluation_id in set(background) & self._in_flight:
            self._in_flight.discard(evaluation_id)
            try:
                await self._leases.release(evaluation_id)
            except Exception:  # the database is away: the lease runs out instead, and another process takes it
                logger.exception("Evaluation %s could not be released", evaluation_id)

    async def _beat(self) -> None:
        interval = self._leases.lease_seconds / 3
        while True:
            with contextlib.suppress(TimeoutError):  # a beat is due, or an evaluation finished and left room
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self._renew()
                await self._reclaim()
            except Exception:  # the database is away: the loop must outlive it, or every lease here expires
                logger.exception("Evaluation heartbeat failed; trying again in %.3g s", interval)

    async def _renew(self) -> None:
        for evaluation_id in await self._leases.renew(set(self._in_flight)):
            # This process stalled for longer than a lease and another one runs it now: stop doing the same work.
            logger.warning("Evaluation %s was taken over by another process; stopping it here", evaluation_id)
            task = self._background.get(evaluation_id)
            if task is not None:
                task.cancel()

    async def _reclaim(self) -> None:
        room = RUNNING_AT_ONCE - len(self._in_flight)
        for claimed in await self._leases.claim_abandoned(room, exclude=set(self._in_flight)):
            if claimed.request is None:
                logger.warning("Evaluation %s was abandoned by its process: %s", claimed.evaluation_id, claimed.error)
            else:  # even while closing: aclose releases what the heartbeat's last claim spawned
                logger.info(
                    "Evaluation %s was abandoned by its process; running it again (attempt %d)",
                    claimed.evaluation_id,
                    claimed.attempts,
                )
                self._spawn(claimed.evaluation_id, claimed.request)

    def _spawn(
        self,
        evaluation_id: str,
        request: EvaluateRequest,
        version: ModelVersion | None = None,
        dataset: DatasetLocation | None = None,
    ) -> None:
        self._in_flight.add(evaluation_id)
        task = asyncio.create_task(self._run(evaluation_id, request, version, dataset, background=True))
        self._background[evaluation_id] = task
        task.add_done_callback(lambda _: self._background.pop(evaluation_id, None))

    async def evaluate(self, request: EvaluateRequest, actor: Actor | None = None) -> Evaluation:
        """Checked at once (version, dataset); then run here, or queued when the dataset is large. `actor`: who
        asked, named by the event that announces the outcome (by default the service)."""
        found = await self._reader.version(request.model_name, request.model_version)
        dataset = await self._locate(request.dataset_path)
        evaluation_id = "ev_" + secrets.token_hex(12)
        background = dataset.size > self._sync_max_bytes
        row = {
            "id": evaluation_id,
            "model_name": found.name,
            "version": found.version,
            "dataset_path": request.dataset_path,
            "status": "queued" if background else "running",
            "created_at": utcnow(),
            "attempts": 1,
            **self._leases.lease(),
        }
        if background:
            # Stored so that a process taking over from a dead one can run it again. An evaluation answered within
            # its request is not: its caller saw the request fail and has no id to poll, so running it again
            # would only add an MLflow run nobody asked for.
            row["request"] = request.model_dump(mode="json")
            if actor is not None:
                row["request"][REQUESTED_BY] = actor_record(actor)
        async with self._database.session() as session, session.begin():
            await session.execute(insert(EvaluationRow).values(**row))
        if actor is not None:
            self._requested_by[evaluation_id] = actor
        if background:
            self._spawn(evaluation_id, request, found, dataset)
        else:
            self._in_flight.add(evaluation_id)
            await self._run(evaluation_id, request, found, dataset, reraise=True)
        return await self.get(evaluation_id)

    async def get(self, evaluation_id: str) -> Evaluation:
        async with self._database.session() as session:
            row = await session.scalar(select(EvaluationRow).where(EvaluationRow.id == evaluation_id))
        if row is None:
            raise EvaluationNotFound(evaluation_id)
        result = row.result or {}
        return Evaluation(
            evaluation_id=row.id,
            status=row.status,
            model_name=row.model_name,
            model_version=row.version,
            dataset_path=row.dataset_path,
            metrics=result.get("metrics"),
            sample_count=result.get("sample_count"),
            run_id=result.get("run_id"),
            duration_seconds=result.get("duration_seconds"),
            error=row.error,
            created_at=iso(row.created_at),
            finished_at=iso(row.finished_at) if row.finished_at else None,
        )

    async def _locate(self, dataset_path: str) -> DatasetLocation:
        path = dataset_path.strip()
        if path.startswith(("runs:/", "mlflow-artifacts:")):
            return await self._artifact_dataset(path)
        if "://" in path or path.startswith(("s3:", "gs:", "file:", "models:")):
            raise InvalidRequest("dataset_path must be a file under the datasets directory or an MLflow artifact URI")
        return await anyio.to_thread.run_sync(local_dataset, path, self._datasets_root)

    async def _artifact_dataset(self, uri: str) -> DatasetLocation:
        if match := RUN_ARTIFACT.match(uri):
            run = await self._reader.run(match["run_id"])
            if run is None:
                raise InvalidRequest(f"Dataset not found: run {match['run_id']} does not exist")
            root, path = served_artifact_root(run.artifact_uri), (match["path"] or "").strip("/")
        else:
            root, path = "", served_artifact_root(uri)
        if not path or ".." in PurePosixPath(path).parts:
            raise InvalidRequest(f"dataset_path must name a file: {uri}")
        kind = dataset_kind(path)
        parent, _, filename = f"{root}/{path}".strip("/").rpartition("/")
        listed = await self._upstream.request("GET", "/api/2.0/mlflow-artifacts/artifacts", params={"path": parent})
        entries = listed.json().get("files", []) if listed.status_code < 400 and listed.body else []
        entry = next((e for e in entries if e.get("path") == filename and not e.get("is_dir")), None)
        if entry is None:
            raise InvalidRequest(f"Dataset not found: {uri}")
        return DatasetLocation(
            uri, kind, int(entry.get("file_size") or 0), artifact_root=parent, artifact_path=filename
        )

    async def _run(
        self,
        evaluation_id: str,
        request: EvaluateRequest,
        version: ModelVersion | None,
        dataset: DatasetLocation | None,
        reraise: bool = False,
        background: bool = False,
    ) -> None:
        """Run one evaluation this process owns (its version and dataset looked up again when it is resumed) and
        record the outcome; every write is refused once another process has taken the evaluation over."""
        try:
            result = await self._attempt(evaluation_id, request, version, dataset)
            if result is not None:
                await self._finish(evaluation_id, status="succeeded", result=result, finished_at=utcnow())
        except asyncio.CancelledError:
            await asyncio.shield(self._interrupted(evaluation_id, background))
            raise
        except HokusaiError as exc:
            await self._finish(evaluation_id, status="failed", error=exc.detail[:2000], finished_at=utcnow())
            if reraise:
                raise
            return
        except Exception:
            logger.exception("Evaluation %s failed", evaluation_id)
            await self._finish(evaluation_id, status="failed", error="Internal error", finished_at=utcnow())
            if reraise:
                raise
            return
        finally:
            self._in_flight.discard(evaluation_id)
            self._requested_by.pop(evaluation_id, None)
            self._wake.set()

    async def _attempt(
        self,
        evaluation_id: str,
        request: EvaluateRequest,
        version: ModelVersion | None,
        dataset: DatasetLocation | None,
    ) -> dict | None:
        """The result, or None when another process took the evaluation over before it started here."""
        if version is None:
            version = await self._reader.version(request.model_name, request.model_version)
        if dataset is None:
            dataset = await self._locate(request.dataset_path)
        async with self._running:
            if not await self._set(evaluation_id, status="running"):
                return None
            return await self._measure(version, dataset, request)

    async def _interrupted(self, evaluation_id: str, background: bool) -> None:
        if self._closing and background:
            await self._leases.release(evaluation_id)
        else:  # a request-bound evaluation whose caller went away, or one another process has taken over
            await self._finish(evaluation_id, status="failed", error=INTERRUPTED, finished_at=utcnow())

    async def _set(self, evaluation_id: str, **values: Any) -> bool:
        return await self._leases.write(evaluation_id, **values)

    async def _finish(self, evaluation_id: str, **values: Any) -> bool:
        """The outcome written and announced, unless another process has taken the evaluation over."""
        return await self._leases.finish(evaluation_id, self._requested_by.get(evaluation_id), **values)

    async def _measure(self, version: ModelVersion, dataset: DatasetLocation, request: EvaluateRequest) -> dict:
        started = time.perf_counter()
        source = await model_source(self._files, version.name, version.version)
        if dataset.local is not None:
            frame, digest = await anyio.to_thread.run_sync(read_dataset, dataset.local, dataset.kind)
        else:
            scratch = Path(await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="hokusai-dataset-")))
            try:
                file = ArtifactFile(dataset.artifact_path or "", dataset.size)
                await save_files(self._upstream, dataset.artifact_root or "", [file], scratch)
                frame, digest = await anyio.to_thread.run_sync(read_dataset, scratch / file.path, dataset.kind)
            finally:  # a large dataset's removal is file I/O too: off the event loop
                await anyio.to_thread.run_sync(shutil.rmtree, scratch, True)
        scores = await self._score(source, frame, request)
        duration = time.perf_counter() - started
        run_id = await self._log_run(version, dataset, digest, len(frame), request, scores)
        return {
            "metrics": scores,
            "sample_count": len(frame),
            "run_id": run_id,
            "duration_seconds": round(duration, 3),
        }

    async def _score(self, source: ModelSource, frame: Any, request: EvaluateRequest) -> dict[str, float]:
        features, truth = await anyio.to_thread.run_sync(split_target, frame, request.target_column)
        data_format, rows = await anyio.to_thread.run_sync(encode_features, features)
        predictions = (await self._pool.run(source, "predict", data_format, rows)).data
        probabilities = None
        if PROBABILITY_METRICS & set(request.metrics):
            probabilities = (await self._pool.run(source, "predict_proba", data_format, rows)).data
        return await anyio.to_thread.run_sync(score, truth, predictions, probabilities, request.metrics)

    async def _log_run(
        self,
        version: ModelVersion,
        dataset: DatasetLocation,
        digest: str,
        rows: int,
        request: EvaluateRequest,
        scores: dict[str, float],
    ) -> str:
        """An MLflow run holding the scores (as eval_*), the dataset as an input, tagged with the version."""
        experiment_id = await self._reader.evaluation_experiment_id(create=True)
        now = int(time.time() * 1000)
        run_id = await self._mlflow.create_run(
            experiment_id,
            now,
            f"evaluate {version.name}:{version.version}",
            {EVALUATED_MODEL_TAG: version.name, EVALUATED_VERSION_TAG: version.version},
        )
        await self._mlflow.log_batch(
            run_id,
            {EVALUATION_PREFIX + name: value for name, value in scores.items()},
            {"dataset_path": request.dataset_path, "target_column": request.target_column, "sample_count": str(rows)},
            timestamp=now,
        )
        await self._mlflow.log_input(
            run_id,
            {
                "name": PurePosixPath(request.dataset_path).stem,
                "digest": digest[:16],
                "source_type": "local" if dataset.local else "mlflow-artifacts",
                "source": json.dumps({"uri": request.dataset_path}),
                "profile": json.dumps({"num_rows": rows}),
            },
            tags={"mlflow.data.context": "evaluation"},
        )
        await self._mlflow.finish_run(run_id, int(time.time() * 1000))
        return run_id
