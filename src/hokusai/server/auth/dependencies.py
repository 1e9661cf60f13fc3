"""FastAPI dependencies: `authenticate` finds and checks the caller's key, `require_scope` guards a route.

A route is public only by not declaring these; there is no list of exempt path prefixes to get wrong.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import Request

from hokusai.server.auth.keys import Scope, grants
from hokusai.server.auth.store import ApiKeyInfo
from hokusai.server.errors import ApiKeyRequired, InvalidApiKey, PermissionDenied
from hokusai.server.middleware import RESPONSE_HEADERS_STATE_KEY
from hokusai.server.ratelimit.policies import route_id
from hokusai.server.runtime import get_runtime

KeySource = Literal["authorization", "x-api-key", "query"]
QUERY_KEY_WARNING = '299 - "The api_key query parameter is deprecated: send the key in the Authorization header"'


def presented_key(request: Request) -> tuple[str | None, KeySource | None]:
    """The key the client sent, and where: Authorization (Bearer/ApiKey), then X-API-Key, then ?api_key=."""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() in {"bearer", "apikey"}:
            return credentials.strip(), "authorization"
    header_key = request.headers.get("x-api-key")
    if header_key is not None:
        return header_key.strip(), "x-api-key"
    query_key = request.query_params.get("api_key")
    if query_key is not None:
        return query_key.strip(), "query"
    return None, None


async def authenticate(request: Request) -> ApiKeyInfo:
    """The caller's key, checked and counted: 401 without a valid key, 429 over a rate limit.

    Failed attempts are counted per client address: past the budget they are answered 429, and a blocked address
    gets no key looked up in the database either (a key this process validated moments ago is still served: it
    is no guess). A valid key's request is counted against its hourly budget and the route's policy.
    """
    already = getattr(request.state, "api_key", None)
    if already is not None:  # a second dependency on the same request: checked and counted once
        return already
    key, source = presented_key(request)
    if not key:
        raise ApiKeyRequired()
    runtime = get_runtime(request)
    limiter = runtime.rate_limiter
    address = request.client.host if request.client else "unknown"
    try:
        info = await runtime.api_keys.authenticate(key, before_lookup=lambda: limiter.refuse_if_blocked(address))
    except InvalidApiKey:
        await limiter.record_auth_failure(address)
        raise
    route = request.scope.get("route")
    route_key = route_id(request.method, route.path) if route is not None else None
    limit_headers = await runtime.rate_limiter.hit_key(info.id, info.rate_limit_per_hour, route_key)
    response_headers = getattr(request.state, RESPONSE_HEADERS_STATE_KEY, None)
    if response_headers is not None:
        response_headers.extend(limit_headers.items())
        if source == "query":
            response_headers.extend([("Deprecation", "true"), ("Warning", QUERY_KEY_WARNING)])
    request.state.api_key = info
    return info


def require_scope(scope: Scope) -> Callable[..., Awaitable[ApiKeyInfo]]:
    # Calls authenticate itself rather than through Depends: one level of dependency solving less on every
    # request (FastAPI's solver is a measurable share of a small request); authenticate is idempotent per request.
    async def scope_guard(request: Request) -> ApiKeyInfo:
        key = await authenticate(request)
        if not grants(key.scopes, scope):
            raise PermissionDenied(f"This API key lacks the '{scope.value}' scope")
        return key

    scope_guard.__name__ = f"require_{scope.value}_scope"
    # Read by RequestBoundsMiddleware: a guarded route's caller is authenticated before its body is read.
    scope_guard.required_scope = scope  # type: ignore[attr-defined]
    return scope_guard
