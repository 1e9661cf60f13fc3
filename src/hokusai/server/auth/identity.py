"""Identify: who is calling, from the request's credentials (an API key today; a browser session next).

Failed attempts are counted per client address: past the budget they are answered 429, and a blocked address
gets no key looked up in the database either (a key this process validated moments ago is still served: it is no
guess).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from hokusai.server.auth.caller import Caller
from hokusai.server.auth.service import ApiKeyService
from hokusai.server.errors import ApiKeyRequired, InvalidApiKey
from hokusai.server.ratelimit.service import RequestRateLimiter

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


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@dataclass(frozen=True)
class Identified:
    caller: Caller
    source: KeySource  # where the credential was: a key in the query string is answered with a deprecation


class KeyIdentifier:
    """Finds the caller's API key and checks it (active, not expired); 401 without a valid key."""

    def __init__(self, api_keys: ApiKeyService, limiter: RequestRateLimiter) -> None:
        self._api_keys = api_keys
        self._limiter = limiter  # counts failed attempts per client address

    async def identify(self, request: Request) -> Identified:
        key, source = presented_key(request)
        if not key or source is None:
            raise ApiKeyRequired()
        address = client_address(request)
        limiter = self._limiter
        try:
            info = await self._api_keys.authenticate(key, before_lookup=lambda: limiter.refuse_if_blocked(address))
        except InvalidApiKey:
            await limiter.record_auth_failure(address)
            raise
        return Identified(Caller.of_key(info, address), source)
