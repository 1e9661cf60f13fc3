"""The authenticated MLflow gateway: /mlflow/{path} and /api/mlflow/{path} forward to the configured MLflow.

Path mapping is a prefix rewrite: `/mlflow/api/2.0/mlflow/runs/create` -> `<upstream>/api/2.0/mlflow/runs/create`
(likewise `/api/mlflow/...`), so the stock client works with MLFLOW_TRACKING_URI=<service>/mlflow and MLflow
itself needs no --static-prefix. Bodies stream in both directions; nothing is buffered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from fastapi import APIRouter, Depends, Request
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from hokusai.server.auth.dependencies import authenticate
from hokusai.server.auth.keys import grants
from hokusai.server.auth.store import ApiKeyInfo
from hokusai.server.errors import PermissionDenied
from hokusai.server.mlflow.gateway import (
    forwarded_request_headers,
    forwarded_response_headers,
    required_scope,
    upstream_query,
    upstream_raw_path,
)
from hokusai.server.runtime import get_runtime

PROXIED_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

router = APIRouter(tags=["mlflow gateway"])


async def forward(request: Request, prefix: str, key: ApiKeyInfo) -> StreamingResponse:
    upstream = get_runtime(request).mlflow
    scope = request.scope
    path = upstream_raw_path(scope.get("raw_path") or scope["path"].encode(), prefix)
    needed = required_scope(request.method, path.decode("latin-1"))
    if not grants(key.scopes, needed):
        raise PermissionDenied(f"This API key lacks the '{needed.value}' scope")

    headers = forwarded_request_headers(
        scope["headers"],
        client_host=request.client.host if request.client else None,
        scheme=scope.get("scheme", "http"),
        host=request.headers.get("host"),
        prefix=prefix,
    )
    has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
    upstream_request = upstream.client.build_request(
        request.method,
        upstream.url_for(path, upstream_query(scope.get("query_string", b""))),
        headers=headers,
        content=request.stream() if has_body else None,
    )
    upstream_response = await upstream.send(upstream_request, stream=True)
    response = StreamingResponse(
        _relay(upstream_response),
        status_code=upstream_response.status_code,
        background=BackgroundTask(upstream_response.aclose),
    )
    response.raw_headers = forwarded_response_headers(upstream_response.headers.raw)
    return response


async def _relay(upstream_response: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream body as it arrives (still encoded as MLflow sent it); the connection is released either way."""
    try:
        async for chunk in upstream_response.aiter_raw():
            yield chunk
    finally:
        await upstream_response.aclose()


@router.api_route("/mlflow/{path:path}", methods=PROXIED_METHODS, include_in_schema=False)
async def mlflow_gateway(request: Request, key: ApiKeyInfo = Depends(authenticate)) -> StreamingResponse:
    return await forward(request, "/mlflow", key)


@router.api_route("/api/mlflow/{path:path}", methods=PROXIED_METHODS, include_in_schema=False)
async def api_mlflow_gateway(request: Request, key: ApiKeyInfo = Depends(authenticate)) -> StreamingResponse:
    return await forward(request, "/api/mlflow", key)
