"""A model version's artifacts as one zip, streamed: read from MLflow file by file, written as it arrives.

Entries are stored, not deflated (model weights rarely compress, and deflate would put CPU on the event loop);
memory holds at most one chunk of one file, whatever the model's size.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import anyio

from hokusai.server.errors import InvalidRequest
from hokusai.server.mlflow.upstream import MlflowUpstream, UpstreamConnectFailed, UpstreamFailed

ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
CHUNK_BYTES = 1024 * 1024
ZIP64_THRESHOLD = 2**31 - 1


class ArtifactsNotServed(InvalidRequest):
    def __init__(self, uri: str) -> None:
        super().__init__(f"The artifacts of this version ({uri}) are not served by the MLflow server")


@dataclass(frozen=True)
class ArtifactFile:
    path: str  # relative to the version's artifact root
    size: int


@dataclass(frozen=True)
class DownloadPlan:
    filename: str
    root: str  # path under mlflow-artifacts:/
    files: list[ArtifactFile]


def served_artifact_root(artifact_uri: str) -> str:
    """`mlflow-artifacts:/1/models/m-x/artifacts` (or `mlflow-artifacts://host/1/...`) -> `1/models/m-x/artifacts`."""
    if not artifact_uri.startswith("mlflow-artifacts:"):
        raise ArtifactsNotServed(artifact_uri)
    rest = artifact_uri.removeprefix("mlflow-artifacts:")
    if rest.startswith("//"):
        rest = rest[2:].partition("/")[2]
    return rest.strip("/")


def archive_filename(name: str, version: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}-{version}") + ".zip"


async def list_files(upstream: MlflowUpstream, root: str) -> list[ArtifactFile]:
    """Every file under the root (one listing call per directory)."""
    files: list[ArtifactFile] = []
    directories = [""]
    while directories:
        relative = directories.pop()
        listed = await upstream.request("GET", ARTIFACTS_API, params={"path": f"{root}/{relative}".rstrip("/")})
        if listed.status_code >= 400:
            raise UpstreamFailed(listed.status_code, f"listing artifacts of {root}/{relative}")
        for entry in listed.json().get("files", []):
            path = f"{relative}/{entry['path']}".lstrip("/")
            if entry.get("is_dir"):
                directories.append(path)
            else:
                files.append(ArtifactFile(path, int(entry.get("file_size") or 0)))
    return sorted(files, key=lambda f: f.path)


class _Sink:
    """A write-only, unseekable file for ZipFile; what was written is taken out with `drain`."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


async def artifact_chunks(upstream: MlflowUpstream, root: str, path: str) -> AsyncIterator[bytes]:
    """One served artifact file, as it arrives from MLflow."""
    raw_path = f"{ARTIFACTS_API}/{quote(root)}/{quote(path)}".encode()
    response = await upstream.open("GET", raw_path, b"", [])
    try:
        if response.status >= 400:
            raise UpstreamFailed(response.status, f"reading artifact {path}")
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            yield chunk
    except aiohttp.ClientError:
        raise UpstreamConnectFailed(upstream.base_url) from None
    finally:
        response.release()


async def zip_stream(upstream: MlflowUpstream, plan: DownloadPlan) -> AsyncIterator[bytes]:
    sink = _Sink()
    archive = zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True)  # noqa: SIM115
    for item in plan.files:
        with archive.open(item.path, "w", force_zip64=item.size > ZIP64_THRESHOLD) as entry:
            async for chunk in artifact_chunks(upstream, plan.root, item.path):
                entry.write(chunk)
                yield sink.drain()
        yield sink.drain()
    archive.close()
    yield sink.drain()


async def save_files(upstream: MlflowUpstream, root: str, files: list[ArtifactFile], destination: Path) -> None:
    """Artifacts written under `destination`, each through a temporary name so a half-written file never counts."""
    for item in files:
        target = destination / item.path
        partial = target.with_name(target.name + ".partial")
        await anyio.Path(target.parent).mkdir(parents=True, exist_ok=True)
        async with await anyio.open_file(partial, "wb") as output:
            async for chunk in artifact_chunks(upstream, root, item.path):
                await output.write(chunk)
        await anyio.Path(partial).rename(target)
