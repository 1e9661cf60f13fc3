"""Bounded requests: the caller of a guarded route is identified from its headers before any body byte is read,
and bodies are bounded in size and in idle time while they stream, before anything parses them.

FastAPI reads and parses a JSON body before it solves a route's dependencies, so without this step an
unauthenticated 100 MB body is read, parsed and held (600 MB of RSS) before the 401. Here, for a route guarded by
`auth.dependencies.allow`, the gate identifies and throttles the caller first (it keeps the caller on the request,
so the route's own guard reuses it: one check, one count) and the policy authorizes the route's actions; then a
declared Content-Length over the bound is answered 413 at once. The MLflow
gateway authenticates before reading on its own and streams artifact uploads of any size; its bodies only get the
idle timeout.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastapi.routing import iter_route_contexts
from starlette.requests import Request
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hokusai.server.auth.dependencies import current_caller
from hokusai.server.auth.gate import Gate
from hokusai.server.errors import HokusaiError, error_response_for
from hokusai.server.mlflow.proxy import gateway_prefix


class RequestBodyTooLarge(HokusaiError):
    status_code = 413
    # The rest of the body is not read: the connection ends with this answer.
    headers = {"Connection": "close"}

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body exceeds {limit} bytes (HOKUSAI_MAX_BODY_BYTES)")


class RequestBodyTimeout(HokusaiError):
    status_code = 408
    headers = {"Connection": "close"}

    def __init__(self, seconds: float) -> None:
        super().__init__(f"Request body stalled for {seconds:g} s (HOKUSAI_BODY_READ_TIMEOUT)")


@dataclass(frozen=True)
class GuardedRoute:
    """What identifying a caller needs to know of a route: how it matches, and what its guards require."""

    path_regex: re.Pattern[str]
    methods: frozenset[str] | None
    route: object  # put in the scope, so the route's rate-limit policy and metrics label apply
    needs_key: bool
    actions: tuple[str, ...]


def _guards(dependant: object) -> Iterator[str | None]:
    """The action each guard in a dependency tree is for (None for a bare `current_caller`)."""
    for sub in getattr(dependant, "dependencies", ()):
        if sub.call is current_caller:
            yield None
        elif (required := getattr(sub.call, "required_action", None)) is not None:
            yield required
        yield from _guards(sub)


def guarded_routes(routes: list) -> list[GuardedRoute]:
    """Every HTTP route in routing order, with what its guards require (computed once per app)."""
    table = []
    for context in iter_route_contexts(routes):
        path_regex = getattr(context, "path_regex", None)
        if path_regex is None:
            continue
        guards = list(_guards(getattr(context, "dependant", None)))
        methods = getattr(context, "methods", None)
        table.append(
            GuardedRoute(
                path_regex=path_regex,
                methods=frozenset(methods) if methods else None,
                route=context.original_route,
                needs_key=bool(guards),
                actions=tuple(dict.fromkeys(guard for guard in guards if guard is not None)),
            )
        )
    return table


def matched_route(table: list[GuardedRoute], scope: Scope) -> GuardedRoute | None:
    """The route the router will run (its first full match), or None (404/405 answer without reading a body)."""
    path = get_route_path(scope)
    for route in table:
        if route.path_regex.match(path) and (route.methods is None or scope["method"] in route.methods):
            return route
    return None


def declared_length(scope: Scope) -> int | None:
    """The body's declared size: None when it is of unknown length (chunked), 0 when there is none."""
    length: int | None = 0
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
        if name == b"transfer-encoding":
            length = None
    return length


class BoundedBody:
    """Wraps `receive`: counts the body as it streams and stops it past `limit`; each chunk must come within
    `idle_timeout`. Once the body is complete, `receive` passes through untouched (a disconnect listener waits as
    long as it likes)."""

    def __init__(self, receive: Receive, limit: int | None, idle_timeout: float) -> None:
        self._receive = receive
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.pending = True
        self.received = 0
        self.refusal: HokusaiError | None = None

    async def receive(self) -> Message:
        if self.refusal is not None:
            raise self.refusal
        if not self.pending:
            return await self._receive()
        try:
            async with asyncio.timeout(self.idle_timeout):
                message = await self._receive()
        except TimeoutError:
            self.refusal = RequestBodyTimeout(self.idle_timeout)
            raise self.refusal from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.limit is not None and self.received > self.limit:
                self.refusal = RequestBodyTooLarge(self.limit)
                raise self.refusal
            self.pending = message.get("more_body", False)
        else:  # http.disconnect
            self.pending = False
        return message


class RequestBoundsMiddleware:
    """Pure ASGI, inside the request context (ids, access log) and outside the gateway (its uploads get the idle
    timeout too)."""

    def __init__(self, app: ASGIApp, gate: Callable[[], Gate], max_body_bytes: int, body_read_timeout: float) -> None:
        """`gate` gives the lifespan's gate (the middleware stack is built before the lifespan runs)."""
        self.app = app
        self.gate = gate
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout = body_read_timeout
        self._routes: list[GuardedRoute] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = declared_length(scope)
        if length == 0:  # no body: nothing to bound, and the route's own guard runs first anyway
            await self.app(scope, receive, send)
            return
        streamed = gateway_prefix(scope["path"]) is not None
        body = BoundedBody(
            receive, limit=None if streamed else self.max_body_bytes, idle_timeout=self.body_read_timeout
        )
        if not streamed:
            refusal = await self._refusal_before_the_body(scope, receive, length)
            if refusal is not None:
                await self._answer(scope, send, refusal, body_unread=True)
                return

        started = replaced = False

        async def send_or_refuse(message: Message) -> None:
            nonlocal started, replaced
            if message["type"] == "http.response.start":
                started = True
                if body.refusal is not None:
                    # The app answered a body it could not read (FastAPI: 400 "error parsing the body", the gateway:
                    # 502): the answer is why it could not.
                    replaced = True
                    await self._answer(scope, send, body.refusal, body_unread=True)
                    return
            elif replaced:
                return  # the rest of the replaced answer
            await send(message)

        try:
            await self.app(scope, body.receive, send_or_refuse)
        except (RequestBodyTooLarge, RequestBodyTimeout) as exc:
            if started:
                raise
            await self._answer(scope, send, exc, body_unread=True)

    async def _refusal_before_the_body(self, scope: Scope, receive: Receive, length: int | None) -> HokusaiError | None:
        """Authenticate a guarded route's caller from the headers, then check the declared size: both before reading."""
        if self._routes is None:
            self._routes = guarded_routes(scope["app"].router.routes)
        route = matched_route(self._routes, scope)
        if route is not None and route.needs_key:
            scope["route"] = route.route  # the route's rate-limit policy and metrics label
            request = Request(scope, receive)
            gate = self.gate()
            try:
                caller = await gate.caller(request)
                for action in route.actions:
                    gate.policy.authorize(caller, action)
            except HokusaiError as exc:
                return exc
        if length is not None and length > self.max_body_bytes:
            return RequestBodyTooLarge(self.max_body_bytes)
        return None

    @staticmethod
    async def _answer(scope: Scope, send: Send, refusal: HokusaiError, body_unread: bool) -> None:
        response = error_response_for(Request(scope), refusal)
        if body_unread:
            # The unread rest of the body is not drained: the connection ends with this answer.
            response.headers["Connection"] = "close"

        async def no_body() -> Message:
            return {"type": "http.disconnect"}

        await response(scope, no_body, send)
