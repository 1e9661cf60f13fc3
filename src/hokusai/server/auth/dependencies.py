"""The route side of the gate: `current_caller` identifies and throttles, `allow(action)` guards a route.

A route is public only by not declaring these; there is no list of exempt path prefixes to get wrong.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request

from hokusai.server.auth.caller import Caller
from hokusai.server.auth.gate import Gate
from hokusai.server.auth.policy import scope_for

Guard = Callable[[Request], Awaitable[Caller]]


def get_gate(request: Request) -> Gate:
    """The gate the lifespan built (app.state.gate)."""
    return request.app.state.gate


async def current_caller(request: Request) -> Caller:
    """The caller of this request: identified (401) and counted (429), once per request."""
    return await get_gate(request).caller(request)


def allow(action: str) -> Guard:
    """A guard for routes doing `action`: the caller, or 401/403/429.

    Guards take the request only: besides FastAPI, the request-bounds middleware (identify before the body) and
    `errors.refuse_unencodable_text` (401 before 422) find them by their `required_scope` / `required_action`
    attributes and call them. The gate is the one the lifespan built; replace it on app.state, not through
    dependency_overrides (the middlewares, outside FastAPI's dependencies, use the same instance).
    """
    scope = scope_for(action)  # an unknown action fails here, when the route is declared

    async def guard(request: Request) -> Caller:
        return await get_gate(request).admit(request, action)

    guard.__name__ = f"allow_{action.replace(':', '_')}"
    guard.required_action = action  # type: ignore[attr-defined]
    # Read by the OpenAPI document, the request-bounds middleware and the unencodable-text check.
    guard.required_scope = scope  # type: ignore[attr-defined]
    return guard
