"""Identify: who is calling, from the request's credentials: an API key in a header (or the deprecated query
parameter), else the browser session cookie a key signed in. A header key wins over a cookie, so header-key clients
are never subject to the cookie's cross-site checks.

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
from hokusai.server.auth.sessions import BrowserSessions
from hokusai.server.auth.store import ApiKeyInfo
from hokusai.server.errors import ApiKeyRequired, InvalidApiKey, SessionExpired
from hokusai.server.ratelimit.service import RequestRateLimiter
from hokusai.server.web.csrf import refuse_cross_site, session_token

KeySource = Literal["authorization", "x-api-key", "query", "session"]
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
    """Finds the caller's API key (or session) and checks it (active, not expired); 401 without a valid one."""

    def __init__(
        self, api_keys: ApiKeyService, limiter: RequestRateLimiter, sessions: BrowserSessions | None = None
    ) -> None:
        self._api_keys = api_keys
        self._limiter = limiter  # counts failed attempts per client address
        self._sessions = sessions

    async def identify(self, request: Request) -> Identified:
        key, source = presented_key(request)
        address = client_address(request)
        if key and source is not None:
            return Identified(Caller.of_key(await self.check_key(key, address), address), source)
        token = session_token(request) if self._sessions is not None else None
        if token is None:
            raise ApiKeyRequired()
        limiter = self._limiter
        try:
            info = await self._sessions.key_of(token, before_lookup=lambda: limiter.refuse_if_blocked(address))
        except SessionExpired:
            await limiter.record_auth_failure(address)
            raise
        refuse_cross_site(request)  # the cookie rides along with any request a page makes: writes must be ours
        return Identified(Caller.of_key(info, address, via="session"), "session")

    async def check_key(self, key: str, address: str) -> ApiKeyInfo:
        """The record of an active key; a failure counts against the client address (429 past its budget)."""
        limiter = self._limiter
        try:
            return await self._api_keys.authenticate(key, before_lookup=lambda: limiter.refuse_if_blocked(address))
        except InvalidApiKey:
            await limiter.record_auth_failure(address)
            raise
