"""Model files: a version's artifacts fetched once through the upstream client into HOME/model-cache.

The cache is the only part of HOME that model workers see (through a directory descriptor, see worker.py), so its
files are made readable to them whatever the service's umask; it is bounded on disk, least recently used first.
A version's files can also be fetched ahead of its first call (`prefetch`: when it is registered or enters
Production), in the background, one version at a time; a call that needs files being fetched waits for that fetch
rather than starting another.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import os
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import anyio

from hokusai.server.errors import HokusaiError
from hokusai.server.mlflow.registry_client import RegistryClient, version_number
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.registry.download import ArtifactFile, list_files, save_files, served_artifact_root

logger = logging.getLogger(__name__)

LOCATED_VERSIONS = 1000
PREFETCH_QUEUE = 32  # versions waiting to be fetched ahead; beyond, a request is dropped (its first call fetches)


class ModelFiles:
    """Versions' files on local disk under `cache_dir`, at most `max_bytes` in all; beyond, the directories used
    least recently go (never one that `in_use` names: a model loaded in a worker may still read its files)."""

    def __init__(
        self,
        upstream: MlflowUpstream,
        cache_dir: Path,
        max_bytes: int,
        in_use: Callable[[], set[Path]] = set,
    ) -> None:
        self._upstream = upstream
        self._mlflow = RegistryClient.over(upstream)
        self.cache_dir = cache_dir
        self._max_bytes = max_bytes
        self._in_use = in_use
        # Where versions' files were found. A version whose model a worker holds is served without asking MLflow
        # again (as a loaded model always was); any other is looked up, in case it was deleted or re-created.
        self._located: OrderedDict[tuple[str, str], Path] = OrderedDict()
        self._fetching: dict[Path, asyncio.Future[None]] = {}  # one fetch per directory, awaited by every caller
        self._prefetch_queue: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._prefetcher: asyncio.Task[None] | None = None
        self._closed = False

    async def local_copy(self, name: str, version: str) -> Path:
        """The version's files on local disk, fetched through the upstream client the first time."""
        version = version_number(name, version)
        directory = self._located.get((name, version))
        if directory is not None and directory in self._in_use():
            self._located.move_to_end((name, version))
            return directory
        directory = await self._locate(name, version)
        assert directory is not None  # no size cap: always fetched
        self._located[(name, version)] = directory
        while len(self._located) > LOCATED_VERSIONS:
            self._located.popitem(last=False)
        return directory

    async def _locate(self, name: str, version: str, size_cap: int | None = None) -> Path | None:
        """The version's directory, fetched when missing; None (nothing fetched) when its files hold more than
        `size_cap` bytes."""
        root = served_artifact_root(await self._mlflow.download_uri(name, version))
        directory = self.cache_dir / cache_directory_name(name, version, root)
        if await anyio.Path(directory).exists():
            await anyio.Path(directory).touch()  # its last use, for the disk bound
            return directory
        fetch = self._fetching.get(directory)
        if fetch is None:
            files = await list_files(self._upstream, root)
            if size_cap is not None and sum(item.size for item in files) > size_cap:
                return None
            fetch = self._fetching.get(directory)  # started by another caller while this one listed the files
            if fetch is None:
                fetch = self._fetching[directory] = asyncio.create_task(
                    self._fetch_and_trim(root, files, directory), context=contextvars.Context()
                )
                fetch.add_done_callback(lambda done: self._fetch_done(directory, done))
        # Shielded: a caller that goes away (a client disconnecting) leaves the fetch to the others waiting for it.
        await asyncio.shield(fetch)
        return directory

    def _fetch_done(self, directory: Path, fetch: asyncio.Future[None]) -> None:
        self._fetching.pop(directory, None)
        if not fetch.cancelled():
            fetch.exception()  # retrieved: every caller waiting for it got it raised already

    async def _fetch_and_trim(self, root: str, files: list[ArtifactFile], directory: Path) -> None:
        await self._fetch(root, files, directory)
        keep = {directory} | self._in_use()
        await anyio.to_thread.run_sync(trim_directory, self.cache_dir, self._max_bytes, keep)

    def prefetch(self, name: str, version: str) -> None:
        """Fetch the version's files in the background, before a call needs them: one version at a time, in the
        order asked, never one larger than the whole cache (HOKUSAI_MODEL_CACHE_MAX_BYTES). Never blocks and never
        fails its caller: a version that cannot be fetched now is fetched by its first call, as without this."""
        key = (name, version)
        if self._closed or key in self._prefetch_queue:
            return
        if len(self._prefetch_queue) >= PREFETCH_QUEUE:
            logger.info("Files of %s:%s not fetched ahead: %d versions wait already", name, version, PREFETCH_QUEUE)
            return
        self._prefetch_queue[key] = None
        if self._prefetcher is None or self._prefetcher.done():
            # A context of its own: the fetches outlive the request that asked for them (and its request id).
            self._prefetcher = asyncio.create_task(self._prefetch_queued(), context=contextvars.Context())

    async def _prefetch_queued(self) -> None:
        while self._prefetch_queue:
            name, version = key = next(iter(self._prefetch_queue))
            try:
                if await self._locate(name, version_number(name, version), size_cap=self._max_bytes) is None:
                    logger.info("Files of %s:%s not fetched ahead: larger than the model cache", name, version)
            except HokusaiError as exc:  # MLflow unreachable, the version gone, its files not served: the call says
                logger.info("Files of %s:%s not fetched ahead: %s", name, version, exc)
            except OSError as exc:  # the disk
                logger.warning("Files of %s:%s not fetched ahead: %s", name, version, exc)
            finally:
                self._prefetch_queue.pop(key, None)

    async def prefetched(self) -> None:
        """Returns once every version asked for by `prefetch` has been fetched (or given up)."""
        while self._prefetcher is not None and not self._prefetcher.done():
            await asyncio.shield(self._prefetcher)

    async def aclose(self) -> None:
        """Stops fetching ahead; a fetch cut short leaves only its staging directory, removed on its way out."""
        self._closed = True
        self._prefetch_queue.clear()
        tasks = [task for task in (self._prefetcher, *self._fetching.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch(self, root: str, files: list[ArtifactFile], directory: Path) -> None:
        """Into a staging directory, renamed into place when complete: a half-fetched model is never loaded, and two
        processes sharing HOME cannot mix their files."""
        staging = directory.with_name(f"{directory.name}.{secrets.token_hex(4)}.partial")
        try:
            await anyio.Path(staging).mkdir(parents=True)
            await save_files(self._upstream, root, files, staging)
            await anyio.to_thread.run_sync(readable_to_workers, staging)
            await anyio.Path(staging).rename(directory)
        except OSError:
            if not await anyio.Path(directory).exists():
                raise
        finally:  # left over when another process won the rename, or when the fetch failed
            await anyio.to_thread.run_sync(shutil.rmtree, staging, True)


def cache_directory_name(name: str, version: str, root: str) -> str:
    """The directory of the model cache that holds a version's files. Versions never change their files, so a
    complete download is reused; the artifact root is in the name, so a version deleted and re-created elsewhere
    is fetched again."""
    return hashlib.sha256(f"{name}\0{version}\0{root}".encode()).hexdigest()[:32]


def readable_to_workers(root: Path) -> None:
    """Blocking: directories 0755 and files 0644, so a worker running as another (unprivileged) user can read them
    (and not write them), whatever umask the service has."""
    root.chmod(0o755)
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories:
            os.chmod(os.path.join(directory, name), 0o755)  # noqa: S103 (read-only to others: the point)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)


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
