"""The one seam every request passes once its status is known: it records the writes in the audit log.

Pure ASGI, outside the bounds middleware and the gateway, so routes, the gateway and refusals (401, 403, 413,
429) are all seen. It reads only what the gate left in the scope (the caller), the matched route's template and
its path parameters: never a header, body or query string.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hokusai.server.audit.store import AuditEntry, AuditLog
from hokusai.server.auth.gate import CALLER_STATE_KEY
from hokusai.server.auth.keys import Scope as KeyScope
from hokusai.server.mlflow.gateway import MLFLOW_SCOPES
from hokusai.server.mlflow.proxy import GatewayRoute, gateway_prefix
from hokusai.server.mlflow.scopes import GRAPHQL

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANONYMOUS = "anonymous"


def gateway_write_route(method: str, path: str) -> str | None:
    """For a gateway call, the MLflow route (prefix + MLflow path) when it writes; None for reads. The scope table
    says which POSTs are reads (`runs/search`, `traces/search`...); GraphQL is treated as a read (its operation is
    in the body, which the audit log does not read)."""
    prefix = gateway_prefix(path)
    if prefix is None:
        return None
    upstream = path[len(prefix) :] or "/"
    rule = MLFLOW_SCOPES.lookup(method, unquote(upstream))
    if rule == KeyScope.READ or rule == GRAPHQL:
        return None
    return path


class AuditMiddleware:
    def __init__(self, app: ASGIApp, audit: Callable[[], AuditLog]) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in READ_METHODS:
            await self.app(scope, receive, send)
            return
        status = {"code": 500, "recorded": False}

        async def record_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif (
                message["type"] == "http.response.body"
                and not message.get("more_body", False)
                and 200 <= status["code"] < 300
                and not status["recorded"]
            ):
                # An acknowledged write: its row is committed before the client has the whole answer.
                status["recorded"] = True
                if (entry := self._entry(scope, status["code"])) is not None:
                    await self.audit().record_durably(entry)
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            if not status["recorded"] and (entry := self._entry(scope, status["code"])) is not None:
                self.audit().record(entry)

    def _entry(self, scope: Scope, status: int) -> AuditEntry | None:
        method = scope["method"]
        route = scope.get("route")
        if isinstance(route, GatewayRoute) or gateway_prefix(scope["path"]) is not None:
            template = gateway_write_route(method, scope["path"])
            if template is None:
                return None
            targets: dict[str, str] = {}
        else:
            # An unmatched path (404/405) keeps no raw path: it may carry anything.
            template = getattr(route, "path", None) or "(unmatched)"
            targets = {name: str(value) for name, value in (scope.get("path_params") or {}).items()}
        caller = (scope.get("state") or {}).get(CALLER_STATE_KEY)
        client = scope.get("client")
        return AuditEntry(
            key_id=caller.key_id if caller is not None else None,
            actor=caller.name if caller is not None else ANONYMOUS,
            address=(caller.address if caller is not None and caller.address else None)
            or (client[0] if client else None),
            method=method,
            route=template,
            targets=targets,
            status=status,
        )
