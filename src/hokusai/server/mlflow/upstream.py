"""MlflowUpstream: the only code that talks to the MLflow server.

One pooled client session for the life of the app, every call guarded by the circuit breaker and bounded by the
timeout, and transport failures turned into the reference's 502/503/504 errors.

The client is aiohttp rather than httpx: measured on this 2-core machine (`bench/gateway.py`, and side by side
against the same MLflow), an httpx.AsyncClient round trip costs ~3 ms more than aiohttp's (httpcore's async
path), which alone put the gateway's small-call ratio at ~1.3 against a target of 1.10. Only this module knows.
"""

from __future__ import annotations

import json as jsonlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from hokusai.server.errors import HokusaiError, ServiceUnavailable
from hokusai.server.mlflow.breaker import CircuitBreaker, Permit

# A proxied request carries exactly the headers the client sent (minus the ones the gateway strips).
NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# How long an idle upstream connection is kept for reuse: less than the server's own idle timeout (uvicorn's
# default, which `mlflow server` and the embedded MLflow run, is 5 s). With aiohttp's default of 15 s, a call made
# just as MLflow closed an idle connection went out on it: a GET is retried, but a POST failed with "server
# disconnected" (a 502 to the client, and a failure counted by the breaker).
UPSTREAM_IDLE_SECONDS = 4.0


class UpstreamUnavailable(ServiceUnavailable):
    """MLflow could not be reached or answered with a server error (health checks)."""


class UpstreamConnectFailed(HokusaiError):
    status_code = 502

    def __init__(self, base_url: str) -> None:
        super().__init__(f"Failed to connect to MLflow server at {base_url}")


class UpstreamTimeout(HokusaiError):
    status_code = 504

    def __init__(self, timeout: float) -> None:
        super().__init__(f"MLflow server request timeout after {timeout:g}s")


@dataclass(frozen=True)
class UpstreamResponse:
    """A buffered answer from MLflow, for service code."""

    status_code: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.body)


@dataclass(frozen=True)
class ProbeResult:
    """One unguarded request made to report on MLflow (health endpoints), never to trip the breaker."""

    url: str
    status_code: int | None
    response_time_ms: float
    error: str | None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code is not None and self.status_code < 400


class MlflowUpstream:
    def __init__(
        self,
        base_url: str,
        timeout: float,
        breaker: CircuitBreaker,
        authorization: str | None = None,
        keepalive: bool = True,
        idle_seconds: float = UPSTREAM_IDLE_SECONDS,
    ) -> None:
        """Create within the running event loop (the app's lifespan). `idle_seconds`: how long an idle connection
        is kept for reuse (with `keepalive`); it must be less than MLflow's own idle timeout."""
        self.base_url = base_url.rstrip("/")
        root = URL(self.base_url)
        self._origin = str(root.origin())
        self._root_path = root.raw_path.rstrip("/")  # an MLflow served under a path prefix keeps it
        self.timeout = timeout
        self.breaker = breaker
        self._authorization = authorization
        self.session = aiohttp.ClientSession(
            # force_close opens a connection per call: the cure for multi-worker uvicorn upstreams, where every
            # reused keep-alive connection waits ~44 ms on delayed ACKs (HOKUSAI_MLFLOW_KEEPALIVE=false).
            connector=aiohttp.TCPConnector(
                limit=200,
                force_close=not keepalive,
                keepalive_timeout=idle_seconds if keepalive else None,
            ),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
            auto_decompress=False,  # bodies are relayed as MLflow encoded them
            read_bufsize=2**20,  # large artifact reads in few, big chunks
            cookie_jar=aiohttp.DummyCookieJar(),  # one client serves every user: it must never remember cookies
        )

    def url_for(self, raw_path: bytes, query: bytes = b"") -> URL:
        """An absolute URL on the configured upstream: only the (still encoded) path and query come from the caller."""
        target = f"{self._origin}{self._root_path}{raw_path.decode('latin-1')}"
        if query:
            target += "?" + query.decode("latin-1")
        return URL(target, encoded=True)

    def _headers(self, headers: list[tuple[str, str]] | None = None) -> CIMultiDict[str]:
        merged = CIMultiDict(headers or [])
        if self._authorization:
            merged["Authorization"] = self._authorization
        return merged

    async def open(
        self, method: str, raw_path: bytes, query: bytes, headers: list[tuple[str, str]], body: Any = None
    ) -> aiohttp.ClientResponse:
        """Send through the breaker and return the response with its body unread (the caller releases it).

        Every answer is returned, counted once its headers arrive by `CircuitBreaker.record_answer` (502/503/504
        are failures, a 500 is not); transport failures (no connection, no answer in time) count as failures and
        raise 502/504.
        """
        permit = self.breaker.acquire()
        response = await self._send(permit, method, raw_path, query, headers, body)
        self.breaker.record_answer(permit, response.status)
        return response

    async def request(
        self, method: str, path: str, *, params: dict[str, str] | None = None, json: Any = None
    ) -> UpstreamResponse:
        """A buffered call for service code (registry, analytics); `path` is relative to the upstream root.

        Counted once the whole body has arrived: a body cut off by MLflow is a failure like a refused connection.
        """
        query = URL.build(query=params).raw_query_string.encode() if params else b""
        headers = [("Content-Type", "application/json")] if json is not None else []
        body = jsonlib.dumps(json).encode() if json is not None else None
        permit = self.breaker.acquire()
        response = await self._send(permit, method, path.encode(), query, headers, body)
        try:
            content = await self.read_body(response)
        except (UpstreamTimeout, UpstreamConnectFailed):
            self.breaker.record(permit, success=False)
            raise
        except BaseException:
            self.breaker.release(permit)
            raise
        self.breaker.record_answer(permit, response.status)
        return UpstreamResponse(response.status, CIMultiDict(response.headers), content)

    async def _send(
        self, permit: Permit, method: str, raw_path: bytes, query: bytes, headers: list[tuple[str, str]], body: Any
    ) -> aiohttp.ClientResponse:
        """One admitted request; a transport failure is recorded against the permit and raised as 502/504.

        A streamed body that fails on the client's side (a stalled or aborted upload) surfaces from aiohttp as a
        connection error too: that is the caller's fault, not MLflow's, so it is raised as it was and not counted.
        """
        watched = _WatchedBody(body) if isinstance(body, AsyncIterator) else None
        try:
            return await self.session.request(
                method,
                self.url_for(raw_path, query),
                headers=self._headers(headers),
                data=watched if watched is not None else body,
                skip_auto_headers=NO_AUTO_HEADERS,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise self._transport_failure(permit, watched, UpstreamTimeout(self.timeout)) from None
        except aiohttp.ClientError:
            raise self._transport_failure(permit, watched, UpstreamConnectFailed(self.base_url)) from None
        except BaseException:
            self.breaker.release(permit)
            raise

    def _transport_failure(self, permit: Permit, watched: _WatchedBody | None, failure: HokusaiError) -> BaseException:
        """What to raise for a failed send, and whether the breaker counts it: only if MLflow's side failed."""
        if watched is not None and watched.failure is not None:
            self.breaker.release(permit)
            return watched.failure
        self.breaker.record(permit, success=False)
        return failure

    async def read_body(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole body of a response from `open`, which is then released; failures as 504/502."""
        try:
            return await response.read()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout(self.timeout) from None
        except aiohttp.ClientError:
            raise UpstreamConnectFailed(self.base_url) from None
        finally:
            response.release()

    async def probe(self, method: str, path: str, timeout: float, json: Any = None) -> ProbeResult:
        raw_path, _, query = path.partition("?")
        url = self.url_for(raw_path.encode(), query.encode())
        started = time.perf_counter()
        try:
            async with self.session.request(
                method,
                url,
                headers=self._headers(),
                json=json,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                await response.read()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return ProbeResult(str(url), None, _elapsed_ms(started), f"no answer within {timeout:g}s", timed_out=True)
        except aiohttp.ClientError as exc:
            return ProbeResult(str(url), None, _elapsed_ms(started), f"{type(exc).__name__}: {exc}")
        error = None if response.status < 400 else f"HTTP {response.status}"
        return ProbeResult(str(url), response.status, _elapsed_ms(started), error)

    async def ping(self, timeout: float) -> None:
        """Raise UpstreamUnavailable unless MLflow's /health answers 200 within `timeout` seconds (unguarded)."""
        result = await self.probe("GET", "/health", timeout)
        if result.timed_out:
            raise UpstreamUnavailable(f"MLflow server request timeout after {timeout:g}s")
        if result.status_code is None:
            raise UpstreamUnavailable(f"Failed to connect to MLflow server at {self.base_url}")
        if result.status_code != 200:
            raise UpstreamUnavailable(f"MLflow server at {self.base_url} answered {result.status_code} to /health")

    async def aclose(self) -> None:
        await self.session.close()


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


class UpstreamFailed(HokusaiError):
    """MLflow answered a call made by the service with a server error."""

    status_code = 502

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"MLflow server error ({status}): {message}")


class _WatchedBody:
    """A request body stream that remembers the exception it raised (the client's failure, not MLflow's)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self.failure: BaseException | None = None

    def __aiter__(self) -> _WatchedBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as exc:  # whatever the client's side raised: kept, then raised again by _send
            self.failure = exc
            raise
