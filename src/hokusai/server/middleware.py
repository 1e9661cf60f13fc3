"""Pure ASGI middleware: request ids, access log, metrics, extra response headers, last-resort errors.

Pure ASGI rather than BaseHTTPMiddleware so streamed bodies (the MLflow gateway) pass through untouched.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hokusai.server.errors import INTERNAL_ERROR_DETAIL
from hokusai.server.logs import request_id_var, single_line
from hokusai.server.metrics import UNMATCHED_ROUTE, observe_request

logger = logging.getLogger("hokusai.request")
access_logger = logging.getLogger("hokusai.access")

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RAW = REQUEST_ID_HEADER.lower().encode("latin-1")
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Dependencies append (name, value) pairs here; they are added to whatever response the route produces.
RESPONSE_HEADERS_STATE_KEY = "response_headers"


# A random per-process prefix and a counter: unique across processes, and no urandom call per request
# (uuid4 showed up at ~4% of the gateway's CPU in a profile).
_REQUEST_ID_PREFIX = secrets.token_hex(8)
_request_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):016x}"


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if _SAFE_REQUEST_ID.fullmatch(candidate) else None
    return None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or new_request_id()
        token = request_id_var.set(request_id)
        extra_headers: list[tuple[str, str]] = []
        scope.setdefault("state", {})[RESPONSE_HEADERS_STATE_KEY] = extra_headers
        response = {"started": False, "status": 500}
        started_at = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["started"] = True
                response["status"] = message["status"]
                # Raw pairs rather than MutableHeaders: this runs on every answer, the gateway's relayed ones too.
                headers = [pair for pair in message.get("headers", ()) if pair[0].lower() != _REQUEST_ID_RAW]
                headers.append((_REQUEST_ID_RAW, request_id.encode("latin-1")))
                headers.extend(
                    (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in extra_headers
                )
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            logger.exception("Unhandled error serving %s %s", scope["method"], single_line(scope["path"]))
            if not response["started"]:
                await _send_internal_error(send_with_headers)
        finally:
            elapsed = time.perf_counter() - started_at
            route = scope.get("route")
            observe_request(getattr(route, "path", UNMATCHED_ROUTE), scope["method"], response["status"], elapsed)
            if access_logger.isEnabledFor(logging.INFO):
                # The path only (query strings may carry an api_key), on one line whatever it decodes to.
                access_logger.info(
                    "%s %s %s %.1fms", scope["method"], single_line(scope["path"]), response["status"], elapsed * 1000
                )
            request_id_var.reset(token)


async def _send_internal_error(send: Send) -> None:
    body = json.dumps({"detail": INTERNAL_ERROR_DETAIL}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
