"""MlflowUpstream: the only code that talks to the MLflow server, over one pooled httpx.AsyncClient."""

from __future__ import annotations

import httpx

from hokusai.server.errors import ServiceUnavailable


class UpstreamUnavailable(ServiceUnavailable):
    """MLflow could not be reached or answered with a server error."""


class MlflowUpstream:
    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        )

    async def ping(self, timeout: float) -> None:
        """Raise UpstreamUnavailable unless MLflow's /health answers 200 within `timeout` seconds."""
        try:
            response = await self.client.get("/health", timeout=timeout)
        except httpx.TimeoutException:
            raise UpstreamUnavailable(f"MLflow server request timeout after {timeout:g}s") from None
        except httpx.TransportError:
            raise UpstreamUnavailable(f"Failed to connect to MLflow server at {self.base_url}") from None
        if response.status_code != 200:
            raise UpstreamUnavailable(f"MLflow server at {self.base_url} answered {response.status_code} to /health")

    async def aclose(self) -> None:
        await self.client.aclose()
