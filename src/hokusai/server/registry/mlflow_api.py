"""MlflowApi: one MLflow REST call through the upstream client, its errors turned into ours."""

from __future__ import annotations

from typing import Any

from hokusai.server.errors import InvalidRequest, NotFound
from hokusai.server.mlflow.upstream import MlflowUpstream, UpstreamFailed

API = "/api/2.0/mlflow"


class MlflowApi:
    def __init__(self, upstream: MlflowUpstream) -> None:
        self.upstream = upstream

    async def __call__(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: Any = None,
        not_found: NotFound | None = None,
        tolerated: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """`path` under /api/2.0/mlflow; `tolerated` MLflow error codes count as success (their body is returned).

        A 404 raises `not_found` when given, any other 4xx an InvalidRequest with MLflow's message, a 5xx
        UpstreamFailed (502).
        """
        response = await self.upstream.request(method, API + path, params=params, json=json)
        body = response.json() if response.body else {}
        if response.status_code < 400:
            return body
        if isinstance(body, dict) and body.get("error_code") in tolerated:
            return body
        message = body.get("message", "") if isinstance(body, dict) else ""
        if response.status_code == 404 and not_found is not None:
            raise not_found
        if response.status_code < 500:
            raise InvalidRequest(message or f"MLflow refused the request ({response.status_code})")
        raise UpstreamFailed(response.status_code, message)
