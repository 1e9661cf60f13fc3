"""ModelRegistry and AsyncModelRegistry: every /models endpoint, the event log and webhooks (sdk/events.py), as
typed calls.

Each operation is written once, as the `Call` it sends; the sync client returns its result, the async twin an
awaitable of the same. Only paging and downloads, which loop, are written twice.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hokusai.sdk.config import registry_client_made, resolve
from hokusai.sdk.events import Event, EventOperations
from hokusai.sdk.models import (
    BatchResult,
    Comparison,
    ContributorImpact,
    ContributorLeaderboard,
    Evaluation,
    ImprovementHistory,
    Message,
    ModelPage,
    ModelVersion,
    ModelVersionDetail,
    Prediction,
    PredictionHistory,
    ProductionModels,
    Registration,
    VersionLineage,
    VersionMetrics,
)
from hokusai.sdk.transport import AsyncTransport, Call, RetryPolicy, Transport, without_none

Progress = Callable[[int], None]  # called with the bytes received so far


def _version(name: str, version: str | int) -> str:
    return f"/models/{quote(name, safe='')}/{quote(str(version), safe='')}"


class _ModelOperations(EventOperations):
    """The operations of both clients; `_send` returns a result (sync) or an awaitable of one (async)."""

    def list_page(self, name: str | None = None, max_results: int = 100, page_token: str | None = None) -> Any:
        """One page of versions (newest model names first, as MLflow orders them); see list_models for all."""
        params = without_none(
            {"name": name, "max_results": max_results, "page_token": page_token, "include": "aliases"}
        )
        return self._send(Call("GET", "/models/", ModelPage, params=params))

    def get_model(self, name: str, version: str | int) -> Any:
        return self._send(Call("GET", _version(name, version), ModelVersionDetail))

    def update_model(
        self, name: str, version: str | int, description: str | None = None, tags: dict[str, str | None] | None = None
    ) -> Any:
        """Tags are merged; a tag set to None is removed."""
        body = without_none({"description": description, "tags": tags})
        return self._send(Call("PATCH", _version(name, version), ModelVersionDetail, json=body))

    def delete_model(self, name: str, version: str | int) -> Any:
        return self._send(Call("DELETE", _version(name, version), Message, idempotent=False))

    def transition(self, name: str, version: str | int, stage: str, archive_existing: bool = False) -> Any:
        body = {"stage": stage, "archive_existing": archive_existing}
        return self._send(Call("POST", _version(name, version) + "/transition", ModelVersionDetail, json=body))

    def register(
        self,
        model_data: str,
        model_type: str,
        model_name: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """A new version from a model URI. Retried safely: every attempt carries the same Idempotency-Key."""
        body = without_none(
            {"model_data": model_data, "model_type": model_type, "model_name": model_name, "metadata": metadata}
        )
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return self._send(Call("POST", "/models/register", Registration, json=body, headers=headers))

    def batch(self, operations: list[dict[str, Any]], stop_on_error: bool = False) -> Any:
        body = {"operations": operations, "stop_on_error": stop_on_error}
        return self._send(Call("POST", "/models/batch", BatchResult, json=body, idempotent=False))

    def production_models(self) -> Any:
        return self._send(Call("GET", "/models/production", ProductionModels, pick="models"))

    def compare(self, model1: str, model2: str, metric: str | None = None, tolerance: float | None = None) -> Any:
        """`model1`/`model2` as "name:version" or "name@alias"."""
        params = without_none({"model1": model1, "model2": model2, "metric": metric, "tolerance": tolerance})
        return self._send(Call("GET", "/models/compare", Comparison, params=params))

    def evaluate(
        self,
        model_name: str,
        model_version: str | int,
        dataset_path: str,
        metrics: list[str] | None = None,
        target_column: str = "label",
    ) -> Any:
        """The evaluation; a large dataset answers at once with status "queued" (poll `evaluation(id)`)."""
        body = without_none(
            {
                "model_name": model_name,
                "model_version": str(model_version),
                "dataset_path": dataset_path,
                "metrics": metrics,
                "target_column": target_column,
            }
        )
        return self._send(Call("POST", "/models/evaluate", Evaluation, json=body, idempotent=False))

    def evaluation(self, evaluation_id: str) -> Any:
        return self._send(Call("GET", f"/models/evaluations/{quote(evaluation_id, safe='')}", Evaluation))

    def metrics(self, name: str, version: str | int) -> Any:
        return self._send(Call("GET", _version(name, version) + "/metrics", VersionMetrics))

    def lineage(self, name: str, version: str | int) -> Any:
        return self._send(Call("GET", _version(name, version) + "/lineage", VersionLineage))

    def improvement_history(self, model_id: str) -> Any:
        """Every version of a model (by its model id or name) with its improvement over its parent."""
        return self._send(Call("GET", f"/models/{quote(model_id, safe='')}/lineage", ImprovementHistory))

    def predict(self, name: str, version: str | int, inputs: list[dict[str, Any]] | dict[str, list[Any]]) -> Any:
        """Records ([{column: value}, ...]) or columns ({column: [values]})."""
        return self._send(Call("POST", _version(name, version) + "/predict", Prediction, json={"inputs": inputs}))

    def predictions(self, name: str, version: str | int, start: date | None = None, end: date | None = None) -> Any:
        params = without_none({"start": start and start.isoformat(), "end": end and end.isoformat()})
        return self._send(Call("GET", _version(name, version) + "/predictions", PredictionHistory, params=params))

    def contributor_impact(self, address: str, limit: int = 100, offset: int = 0) -> Any:
        params = {"limit": limit, "offset": offset}
        return self._send(
            Call("GET", f"/models/contributors/{quote(address, safe='')}/impact", ContributorImpact, params=params)
        )

    def contributor_leaderboard(self, limit: int = 50, offset: int = 0) -> Any:
        """One page of the contributor addresses ranked by total improvement (ties: address ascending)."""
        params = {"limit": limit, "offset": offset}
        return self._send(Call("GET", "/models/contributors", ContributorLeaderboard, params=params))


def _download_target(dest: str | Path, response_headers: Any, name: str, version: str | int) -> Path:
    """Blocking (a few stat/mkdir calls). A directory (one that exists, or any path ending in '/') receives the
    server's file name (else `<name>-<version>.zip`), created if needed; any other path is the file itself."""
    target = Path(dest)
    if target.is_dir() or str(dest).endswith(("/", os.sep)):
        found = re.search(r'filename="([^"]+)"', response_headers.get("content-disposition", ""))
        filename = found.group(1) if found else f"{name}-{version}.zip"
        target = target / Path(filename).name
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


class _ProgressBar:
    """A terminal progress bar (rich) for `progress=True`; size unknown: the zip is streamed as it is made."""

    def __init__(self, label: str) -> None:
        from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

        self._progress = Progress(*Progress.get_default_columns()[:1], DownloadColumn(), TransferSpeedColumn())
        self._progress.start()
        self._task = self._progress.add_task(label, total=None)

    def __call__(self, received: int) -> None:
        self._progress.update(self._task, completed=received)

    def close(self) -> None:
        self._progress.stop()


def _progress_reporter(progress: bool | Progress, label: str) -> Any:
    if progress is True:
        return _ProgressBar(label)
    return progress or None


class ModelRegistry(_ModelOperations):
    """The /models API. `url` may be the service's URL or its MLflow URL (`.../api/mlflow`, as the reference
    passes it); the key comes from `api_key`, `hokusai.setup()`, HOKUSAI_API_KEY or ~/.hokusai/config."""

    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 3
    ) -> None:
        credentials = resolve(url, api_key)
        registry_client_made(credentials)
        self.url = credentials.url or ""
        self._transport = Transport(self.url, credentials.api_key, timeout, RetryPolicy(max_retries=max_retries))

    def iter_models(self, name: str | None = None, page_size: int = 100) -> Iterator[ModelVersion]:
        page_token = None
        while True:
            page = self.list_page(name, page_size, page_token)
            yield from page.models
            if not (page_token := page.next_page_token):
                return

    def list_models(self, name: str | None = None, page_size: int = 100) -> list[ModelVersion]:
        """Every version (of one model, with `name`), all pages."""
        return list(self.iter_models(name, page_size))

    def iter_events(
        self,
        type: str | list[str] | None = None,
        model: str | None = None,
        since: datetime | str | None = None,
        page_size: int = 100,
        cursor: str | None = None,
    ) -> Iterator[Event]:
        """Every event matching the filters, in log order, page after page (after `cursor`, when given)."""
        while True:
            page = self.events(type, model, since, page_size, cursor)
            yield from page.events  # a page may be empty yet not the last: patterns are matched after the read
            if not (cursor := page.next_cursor):
                return

    def download(
        self, name: str, version: str | int, dest: str | Path = ".", progress: bool | Progress = False
    ) -> Path:
        """The version's artifacts as a zip at `dest` (a file, or a directory for the server's file name)."""
        reporter = _progress_reporter(progress, f"{name}:{version}")
        try:
            with self._transport.client.stream("GET", _version(name, version) + "/download") as response:
                if response.status_code >= 400:
                    response.read()
                    self._transport.raise_for_status(response)
                target = _download_target(dest, response.headers, name, version)
                received = 0
                with open(target, "wb") as out:
                    for chunk in response.iter_bytes(1024 * 1024):
                        out.write(chunk)
                        received += len(chunk)
                        if reporter:
                            reporter(received)
        finally:
            if isinstance(reporter, _ProgressBar):
                reporter.close()
        return target

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> ModelRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncModelRegistry(_ModelOperations):
    """The async twin of ModelRegistry: the same methods, to be awaited."""

    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 3
    ) -> None:
        credentials = resolve(url, api_key)
        registry_client_made(credentials)
        self.url = credentials.url or ""
        self._transport = AsyncTransport(self.url, credentials.api_key, timeout, RetryPolicy(max_retries=max_retries))

    async def iter_models(self, name: str | None = None, page_size: int = 100) -> AsyncIterator[ModelVersion]:
        page_token = None
        while True:
            page = await self.list_page(name, page_size, page_token)
            for model in page.models:
                yield model
            if not (page_token := page.next_page_token):
                return

    async def list_models(self, name: str | None = None, page_size: int = 100) -> list[ModelVersion]:
        return [model async for model in self.iter_models(name, page_size)]

    async def iter_events(
        self,
        type: str | list[str] | None = None,
        model: str | None = None,
        since: datetime | str | None = None,
        page_size: int = 100,
        cursor: str | None = None,
    ) -> AsyncIterator[Event]:
        while True:
            page = await self.events(type, model, since, page_size, cursor)
            for event in page.events:
                yield event
            if not (cursor := page.next_cursor):
                return

    async def download(
        self, name: str, version: str | int, dest: str | Path = ".", progress: bool | Progress = False
    ) -> Path:
        import anyio

        reporter = _progress_reporter(progress, f"{name}:{version}")
        try:
            async with self._transport.client.stream("GET", _version(name, version) + "/download") as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._transport.raise_for_status(response)
                target = await anyio.to_thread.run_sync(_download_target, dest, response.headers, name, version)
                received = 0
                async with await anyio.open_file(target, "wb") as out:  # anyio: httpx's own dependency
                    async for chunk in response.aiter_bytes(1024 * 1024):
                        await out.write(chunk)
                        received += len(chunk)
                        if reporter:
                            reporter(received)
        finally:
            if isinstance(reporter, _ProgressBar):
                reporter.close()
        return target

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncModelRegistry:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
