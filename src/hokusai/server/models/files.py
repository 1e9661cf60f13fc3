"""Model files: a version's artifacts fetched once through the upstream client into HOME/model-cache.

The cache is the only part of HOME that model workers see (through a directory descriptor, see worker.py), so its
files are made readable to them whatever the service's umask; it is bounded on disk, least recently used first.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import anyio

from hokusai.server.mlflow.registry_client import RegistryClient, version_number
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.registry.download import list_files, save_files, served_artifact_root

LOCATED_VERSIONS = 1000


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

    async def local_copy(self, name: str, version: str) -> Path:
        """The version's files on local disk, fetched through the upstream client the first time."""
        version = version_number(name, version)
        directory = self._located.get((name, version))
        if directory is not None and directory in self._in_use():
            self._located.move_to_end((name, version))
            return directory
        directory = await self._locate(name, version)
        self._located[(name, version)] = directory
        while len(self._located) > LOCATED_VERSIONS:
            self._located.popitem(last=False)
        return directory

    async def _locate(self, name: str, version: str) -> Path:
        root = served_artifact_root(await self._mlflow.download_uri(name, version))
        # Versions never change their files, so a complete download is reused (the root names the files).
        directory = self.cache_dir / hashlib.sha256(f"{name}\0{version}\0{root}".encode()).hexdigest()[:32]
        if await anyio.Path(directory).exists():
            await anyio.Path(directory).touch()  # its last use, for the disk bound
        else:
            await self._fetch(root, directory)
            keep = {directory} | self._in_use()
            await anyio.to_thread.run_sync(trim_directory, self.cache_dir, self._max_bytes, keep)
        return directory

    async def _fetch(self, root: str, directory: Path) -> None:
        """Into a staging directory, renamed into place when complete: a half-fetched model is never loaded, and two
        processes sharing HOME cannot mix their files."""
        staging = directory.with_name(f"{directory.name}.{secrets.token_hex(4)}.partial")
        try:
            await anyio.Path(staging).mkdir(parents=True)
            await save_files(self._upstream, root, await list_files(self._upstream, root), staging)
            await anyio.to_thread.run_sync(readable_to_workers, staging)
            await anyio.Path(staging).rename(directory)
        except OSError:
            if not await anyio.Path(directory).exists():
                raise
        finally:  # left over when another process won the rename, or when the fetch failed
            await anyio.to_thread.run_sync(shutil.rmtree, staging, True)


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
