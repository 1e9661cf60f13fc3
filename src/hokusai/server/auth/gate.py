"""Gate: identify, throttle, authorize, in that order, with the caller identified and counted once per request.

Routes reach it through their guards (auth.dependencies), the request-bounds middleware and the MLflow gateway
through their constructors: all three share the one instance the lifespan builds, so a request that passes more
than one of them is still identified once and counted once.
"""

from __future__ import annotations

from starlette.requests import Request

from hokusai.server.auth.caller import Caller
from hokusai.server.auth.identity import QUERY_KEY_WARNING, KeyIdentifier
from hokusai.server.auth.policy import Policy
from hokusai.server.middleware import RESPONSE_HEADERS_STATE_KEY
from hokusai.server.ratelimit.throttle import Throttle

CALLER_STATE_KEY = "caller"


class Gate:
    def __init__(self, identifier: KeyIdentifier, throttle: Throttle, policy: Policy) -> None:
        self.identifier = identifier
        self.throttle = throttle
        self.policy = policy

    async def caller(self, request: Request, counted: bool = True) -> Caller:
        """The caller, identified (401) and counted (429) unless `counted` is False (static assets of the MLflow UI:
        a page load fetches dozens); the second call on the same request returns it again."""
        already = getattr(request.state, CALLER_STATE_KEY, None)
        if already is not None:
            return already
        identified = await self.identifier.identify(request)
        limit_headers = await self.throttle.count(request, identified.caller) if counted else {}
        response_headers = getattr(request.state, RESPONSE_HEADERS_STATE_KEY, None)
        if response_headers is not None:
            response_headers.extend(limit_headers.items())
            if identified.source == "query":
                response_headers.extend([("Deprecation", "true"), ("Warning", QUERY_KEY_WARNING)])
        setattr(request.state, CALLER_STATE_KEY, identified.caller)
        return identified.caller

    async def admit(self, request: Request, action: str, resource: str | None = None) -> Caller:
        """The caller, once the policy allows it `action` (403 otherwise)."""
        caller = await self.caller(request)
        self.policy.authorize(caller, action, resource)
        return caller
