"""The authenticated MLflow gateway: /mlflow/{path} and /api/mlflow/{path} forward to the configured MLflow.

Path mapping is a prefix rewrite: `/mlflow/api/2.0/mlflow/runs/create` -> `<upstream>/api/2.0/mlflow/runs/create`
(likewise `/api/mlflow/...`), so the stock client works with MLFLOW_TRACKING_URI=<service>/mlflow and MLflow
itself needs no --static-prefix. Bodies with a declared length up to SMALL_BODY_BYTES (256 KB) are read whole;
larger or unsized ones stream in both directions, at most one chunk held at a time.

It is a pure ASGI middleware rather than a FastAPI route: every MLflow client call passes here, and FastAPI's
routing, dependency solving and exception middlewares cost more than the forwarding itself (py-spy: ~75% of the
gateway's CPU per small call). Callers pass the same gate the routes use (identify, throttle, then the policy
authorizes the action the scope table gives the route); errors become the same JSON bodies through
`errors.error_response_for`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from urllib.parse import parse_qs

import aiohttp
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import RedirectResponse, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from hokusai.server.auth.caller import Caller
from hokusai.server.auth.gate import Gate
from hokusai.server.auth.keys import Scope as KeyScope
from hokusai.server.auth.policy import gateway_action
from hokusai.server.errors import HokusaiError, error_response_for
from hokusai.server.events.changes import RegistryChanges
from hokusai.server.events.outbox import Actor
from hokusai.server.mlflow.gateway import (
    forwarded_request_headers,
    forwarded_response_headers,
    is_static_asset,
    route_rule,
    scope_for,
    upstream_query,
    upstream_raw_path,
)
from hokusai.server.mlflow.scopes import GRAPHQL
from hokusai.server.mlflow.upstream import MlflowUpstream

GATEWAY_PREFIXES = ("/mlflow", "/api/mlflow")
# Our own routes under the gateway prefixes (the MLflow health family), served by the app, not forwarded.
OWN_ROUTES = frozenset({"/mlflow/health/mlflow", "/mlflow/health/mlflow/detailed"})


@dataclass(frozen=True)
class GatewayRoute:
    """Stands in for a matched route in the scope, so metrics label gateway calls by a bounded template."""

    path: str


# Bodies up to this size are read whole instead of streamed: bounded memory per request, fewer ASGI messages.
SMALL_BODY_BYTES = 256 * 1024
DOWNLOAD_CHUNK_BYTES = 1024 * 1024  # bounded: at most this much of a download is held per request

ROUTES = {prefix: GatewayRoute(f"{prefix}/{{path:path}}") for prefix in GATEWAY_PREFIXES}


class ScopedBodyTooLarge(HokusaiError):
    """A body the gateway must read to decide the scope (GraphQL) is larger than it reads."""

    status_code = 413

    def __init__(self) -> None:
        super().__init__(f"GraphQL request body is larger than {SMALL_BODY_BYTES} bytes")


def changes_registry(upstream_path: bytes) -> bool:
    """A write to registered models or versions: what /models answers may have changed."""
    return b"/registered-models" in upstream_path or b"/model-versions" in upstream_path


def models_named(body: bytes | AsyncIterator[bytes] | None, query: bytes) -> list[str]:
    """The registered models a registry write names: `name` (and a rename's `new_name`) in its JSON body, else
    `name` in its query."""
    if isinstance(body, bytes) and body:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            named = [parsed.get(key) for key in ("name", "new_name")]
            found = [name for name in named if isinstance(name, str) and name]
            if found:
                return list(dict.fromkeys(found))
    return parse_qs(query.decode("latin-1")).get("name", [])[:1]


def gateway_prefix(path: str) -> str | None:
    if path in OWN_ROUTES:
        return None
    for prefix in GATEWAY_PREFIXES:
        if path.startswith(prefix + "/"):
            return prefix
    return None


@dataclass(frozen=True)
class GatewayParts:
    """What the gateway works with: built in the lifespan, after the middleware itself is constructed."""

    upstream: MlflowUpstream
    gate: Gate
    on_registry_change: Callable[[], Awaitable[object]]  # a write to registered models went through
    changes: RegistryChanges | None = None  # the event log's record of who changed which model


class MlflowGateway:
    def __init__(self, app: ASGIApp, parts: Callable[[], GatewayParts]) -> None:
        """`parts` gives the lifespan's collaborators (the middleware stack is built before the lifespan runs)."""
        self.app = app
        self.parts = parts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in GATEWAY_PREFIXES:
            # `/mlflow` is MLflow's UI root without its slash (what people type): send them to it.
            query = scope.get("query_string", b"").decode("latin-1")
            await RedirectResponse(scope["path"] + "/" + (f"?{query}" if query else ""))(scope, receive, send)
            return
        prefix = gateway_prefix(scope["path"]) if scope["type"] == "http" else None
        if prefix is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = ROUTES[prefix]
        request = Request(scope, receive)
        parts = self.parts()
        answer: ASGIApp
        try:
            counted = not is_static_asset(scope["method"], scope["path"][len(prefix) :])
            answer = await forward(request, prefix, await parts.gate.caller(request, counted=counted), parts)
        except HokusaiError as exc:
            answer = error_response_for(request, exc)
        await answer(scope, receive, send)


async def forward(request: Request, prefix: str, caller: Caller, parts: GatewayParts) -> ASGIApp:
    """Check the caller's scope for the route, send the request to MLflow and return its answer to relay."""
    upstream = parts.upstream
    scope = request.scope
    method = scope["method"]
    path = upstream_raw_path(scope.get("raw_path") or scope["path"].encode(), prefix)
    route_path = path.decode("latin-1")
    rule = route_rule(method, route_path)  # one look-up in the scope table per call
    body: bytes | AsyncIterator[bytes] | None
    if rule == GRAPHQL:
        body = await _bounded_body(request)  # read before the scope check, then forwarded as read
        needed = scope_for(rule, body)
    else:
        needed = scope_for(rule)
        body = None
    parts.gate.policy.authorize(caller, gateway_action(needed), route_path)
    if body is None:
        body = await _body(request)

    client = scope.get("client")
    headers = forwarded_request_headers(
        scope["headers"],
        client_host=client[0] if client else None,
        scheme=scope.get("scheme", "http"),
        host=request.headers.get("host"),
        prefix=prefix,
    )
    query = upstream_query(scope.get("query_string", b""))
    registry_write = needed is not KeyScope.READ and changes_registry(path)
    changed_models = models_named(body, query) if registry_write and parts.changes is not None else []
    if changed_models:
        async with AsyncExitStack() as observed:
            for name in changed_models:
                # Like /models writes: who is about to change the model recorded first, the model observed after.
                await observed.enter_async_context(parts.changes.change(name, Actor.of(caller)))
            upstream_response = await upstream.open(method, path, query, headers, body=body)
    else:
        upstream_response = await upstream.open(method, path, query, headers, body=body)
    if registry_write:
        await parts.on_registry_change()
    relayed_headers = forwarded_response_headers(list(upstream_response.raw_headers))
    if _declared_length(upstream_response.headers.get("content-length")) <= SMALL_BODY_BYTES:
        # Small JSON answers (most MLflow calls) go out in one message: streaming costs more than it saves here.
        return RelayedAnswer(upstream_response.status, relayed_headers, await upstream.read_body(upstream_response))
    response = StreamingResponse(
        _relay(upstream_response),
        status_code=upstream_response.status,
        background=BackgroundTask(upstream_response.release),
    )
    response.raw_headers = relayed_headers
    return response


class RelayedAnswer:
    """MLflow's whole answer, sent on as it came (its own Content-Length included) in one start and one body
    message: a starlette Response would build headers only to have them replaced by MLflow's."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


async def _body(request: Request) -> bytes | AsyncIterator[bytes] | None:
    """Small bodies are read whole; anything larger, or of unknown length, is streamed through."""
    length = request.headers.get("content-length")
    if length is None and "transfer-encoding" not in request.headers:
        return None
    if _declared_length(length) <= SMALL_BODY_BYTES:
        return await request.body()
    return request.stream()


async def _bounded_body(request: Request) -> bytes:
    """The whole body, refused (413) past SMALL_BODY_BYTES: by its Content-Length, or as it arrives (chunked)."""
    length = request.headers.get("content-length")
    if length is not None and _declared_length(length) > SMALL_BODY_BYTES:
        raise ScopedBodyTooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > SMALL_BODY_BYTES:
            raise ScopedBodyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def _declared_length(value: str | None) -> int:
    """A Content-Length as a number; unknown or malformed counts as large (streamed)."""
    return int(value) if value is not None and value.isascii() and value.isdigit() else SMALL_BODY_BYTES + 1


async def _relay(upstream_response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The upstream body as it arrives (still encoded as MLflow sent it); the connection is released either way."""
    try:
        async for chunk in upstream_response.content.iter_chunked(DOWNLOAD_CHUNK_BYTES):
            yield chunk
    finally:
        upstream_response.release()
