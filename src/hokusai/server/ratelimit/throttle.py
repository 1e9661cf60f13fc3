"""Throttle: count one request of an identified caller against its hourly budget and the route's policy."""

from __future__ import annotations

from starlette.requests import Request

from hokusai.server.auth.caller import Caller
from hokusai.server.ratelimit.policies import route_id
from hokusai.server.ratelimit.service import RequestRateLimiter


class Throttle:
    def __init__(self, limiter: RequestRateLimiter) -> None:
        self._limiter = limiter

    async def count(self, request: Request, caller: Caller) -> dict[str, str]:
        """The rate-limit headers to send, or RateLimited (429). The route (put in the scope by the router, the
        request-bounds middleware or the gateway) selects the route policy."""
        route = request.scope.get("route")
        route_key = route_id(request.method, route.path) if route is not None else None
        return await self._limiter.hit_key(caller.id, caller.rate_limit_per_hour, route_key)
