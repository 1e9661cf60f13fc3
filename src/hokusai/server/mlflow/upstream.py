"""MlflowUpstream: the only code that talks to the MLflow server.

One pooled httpx.AsyncClient for the life of the app, every call guarded by the circuit breaker and bounded by
the timeout, and transport failures turned into the reference's 502/503/504 errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from hokusai.server.errors import HokusaiError, ServiceUnavailable
from hokusai.server.mlflow.breaker import CircuitBreaker


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
        auth: httpx.Auth | None = None,
        keepalive: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.breaker = breaker
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout),
            auth=auth,
            # keepalive=False opens a connection per call: the cure for multi-worker uvicorn upstreams, where every
            # reused keep-alive connection waits ~44 ms on delayed ACKs.
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50 if keepalive else 0),
            follow_redirects=False,
        )

    def url_for(self, raw_path: bytes, query: bytes = b"") -> httpx.URL:
        """An absolute URL on the configured upstream: only the path and query come from the caller."""
        base = httpx.URL(self.base_url)
        return base.copy_with(raw_path=base.raw_path.rstrip(b"/") + raw_path + (b"?" + query if query else b""))

    async def send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        """Send through the breaker. 5xx answers count as failures but are returned; transport errors raise."""
        permit = self.breaker.acquire()
        try:
            response = await self.client.send(request, stream=stream)
        except httpx.TimeoutException:
            self.breaker.record(permit, success=False)
            raise UpstreamTimeout(self.timeout) from None
        except httpx.TransportError:
            self.breaker.record(permit, success=False)
            raise UpstreamConnectFailed(self.base_url) from None
        except BaseException:
            self.breaker.release(permit)
            raise
        self.breaker.record(permit, success=response.status_code < 500)
        return response

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A buffered call for service code (registry, analytics): `path` is relative to the upstream root."""
        return await self.send(self.client.build_request(method, path, **kwargs))

    async def probe(self, method: str, path: str, timeout: float, **kwargs: Any) -> ProbeResult:
        url = str(self.url_for(path.encode()))
        started = time.perf_counter()
        try:
            response = await self.client.request(method, path, timeout=timeout, **kwargs)
        except httpx.TimeoutException:
            return ProbeResult(url, None, _elapsed_ms(started), f"no answer within {timeout:g}s", timed_out=True)
        except httpx.TransportError as exc:
            return ProbeResult(url, None, _elapsed_ms(started), f"{type(exc).__name__}: {exc}".rstrip(": "))
        error = None if response.status_code < 400 else f"HTTP {response.status_code}"
        return ProbeResult(url, response.status_code, _elapsed_ms(started), error)

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
        await self.client.aclose()


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
