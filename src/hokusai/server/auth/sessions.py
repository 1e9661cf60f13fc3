"""Browser sessions: a key signs a browser in; the browser then carries an opaque random id in a cookie.

The id is 256 random bits; the database stores only its SHA-256 (with the key, created, expires, last seen), so no
server secret is needed and every service process shares the sessions through the database. A session is only
as good as its key: each lookup joins the key and refuses a revoked or expired one, and the session itself ends
at HOKUSAI_SESSION_TTL or the key's own expiry, whichever comes first.

Like validated keys, a looked-up session is trusted for `cache_ttl` seconds in this process (auth_cache_ttl):
sign-out and revocation in this process take effect at once, in another process within that time.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, insert, select, update

from hokusai.server.auth.models import ApiKeyRow, BrowserSessionRow, LoginLinkRow
from hokusai.server.auth.store import ApiKeyInfo
from hokusai.server.db import Database, utcnow
from hokusai.server.errors import AuthenticationError, SessionExpired

LOGIN_LINK_SECONDS = 60.0
MAX_CACHED_SESSIONS = 10_000
TOKEN_BYTES = 32


class LoginLinkInvalid(AuthenticationError):
    def __init__(self) -> None:
        super().__init__("This sign-in link has expired or was already used")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class NewSession:
    token: str  # for the cookie; never stored
    key: ApiKeyInfo
    expires_at: datetime
    next_path: str | None = None  # where a login link was minted to lead


@dataclass(frozen=True)
class LoginLink:
    token: str
    expires_at: datetime


class BrowserSessions:
    def __init__(
        self,
        database: Database,
        ttl: float,
        cache_ttl: float,
        link_seconds: float = LOGIN_LINK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._database = database
        self._ttl = timedelta(seconds=ttl)
        self._cache_ttl = cache_ttl
        self._link_lifetime = timedelta(seconds=link_seconds)
        self._clock = clock
        # token hash -> (key, session expiry, when read); bounded, keyed by hash.
        self._cache: OrderedDict[str, tuple[ApiKeyInfo, datetime, float]] = OrderedDict()

    async def open(self, key: ApiKeyInfo, address: str | None) -> NewSession:
        """A new session for an authenticated key (its id returned once, for the cookie)."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = utcnow()
        expires_at = self._expiry(key, now)
        async with self._database.session() as session, session.begin():
            # Opportunistic clean-up, indexed and idempotent: any process may do it at any time.
            await session.execute(delete(BrowserSessionRow).where(BrowserSessionRow.expires_at <= now))
            await session.execute(delete(LoginLinkRow).where(LoginLinkRow.expires_at <= now))
            await session.execute(
                insert(BrowserSessionRow).values(
                    id_hash=hash_token(token),
                    key_id=key.id,
                    created_at=now,
                    expires_at=expires_at,
                    last_seen_at=now,
                    address=address,
                )
            )
        return NewSession(token, key, expires_at)

    async def key_of(self, token: str, before_lookup: Callable[[], Awaitable[None]] | None = None) -> ApiKeyInfo:
        """The key of a live session, or SessionExpired. `before_lookup` runs only when the database must be
        asked (the hook that refuses a client blocked for failed attempts)."""
        token_hash = hash_token(token)
        now = utcnow()
        cached = self._cache.get(token_hash)
        if cached is not None and self._clock() - cached[2] < self._cache_ttl:
            key, expires_at, _ = cached
        else:
            self._cache.pop(token_hash, None)
            if before_lookup is not None:
                await before_lookup()
            async with self._database.session() as session, session.begin():
                row = (
                    await session.execute(
                        select(BrowserSessionRow.expires_at, ApiKeyRow)
                        .join(ApiKeyRow, ApiKeyRow.id == BrowserSessionRow.key_id)
                        .where(BrowserSessionRow.id_hash == token_hash)
                    )
                ).one_or_none()
                if row is None:
                    raise SessionExpired()
                expires_at, key = row[0], ApiKeyInfo.from_row(row[1])
                # last_seen_at is a hint for operators: written when this process reads the session again, at most
                # once per cache_ttl, not on every request.
                await session.execute(
                    update(BrowserSessionRow).where(BrowserSessionRow.id_hash == token_hash).values(last_seen_at=now)
                )
            self._remember(token_hash, key, expires_at)
        if expires_at <= now or not key.is_active(now):
            raise SessionExpired()
        return key

    async def close(self, token: str) -> None:
        """Sign out: the session is deleted (a no-op for one that is already gone)."""
        token_hash = hash_token(token)
        self._cache.pop(token_hash, None)
        async with self._database.session() as session, session.begin():
            await session.execute(delete(BrowserSessionRow).where(BrowserSessionRow.id_hash == token_hash))

    def forget_key(self, key_id: str) -> None:
        """A key was revoked in this process: its sessions are looked up again (and refused) from now on."""
        for token_hash in [h for h, (key, _, _) in self._cache.items() if key.id == key_id]:
            del self._cache[token_hash]

    async def mint_link(self, key_id: str, next_path: str) -> LoginLink:
        """A one-time sign-in link for the key `key_id`, valid for a minute."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = utcnow()
        expires_at = now + self._link_lifetime
        async with self._database.session() as session, session.begin():
            await session.execute(
                insert(LoginLinkRow).values(
                    token_hash=hash_token(token),
                    key_id=key_id,
                    next_path=next_path,
                    created_at=now,
                    expires_at=expires_at,
                    used_at=None,
                )
            )
        return LoginLink(token, expires_at)

    async def redeem_link(self, token: str, address: str | None) -> NewSession:
        """A session from a login link, used at most once: of two processes redeeming it at once, the one whose
        conditional UPDATE marks it used wins; the other gets LoginLinkInvalid."""
        token_hash = hash_token(token)
        now = utcnow()
        async with self._database.session() as session, session.begin():
            claimed = await session.execute(
                update(LoginLinkRow)
                .where(
                    LoginLinkRow.token_hash == token_hash,
                    LoginLinkRow.used_at.is_(None),
                    LoginLinkRow.expires_at > now,
                )
                .values(used_at=now)
                .returning(LoginLinkRow.key_id, LoginLinkRow.next_path)
            )
            found = claimed.one_or_none()
            if found is None:
                raise LoginLinkInvalid()
            key_row = await session.get(ApiKeyRow, found.key_id)
        if key_row is None or not ApiKeyInfo.from_row(key_row).is_active(now):
            raise LoginLinkInvalid()
        opened = await self.open(ApiKeyInfo.from_row(key_row), address)
        return NewSession(opened.token, opened.key, opened.expires_at, next_path=found.next_path)

    def _expiry(self, key: ApiKeyInfo, now: datetime) -> datetime:
        expires_at = now + self._ttl
        return min(expires_at, key.expires_at) if key.expires_at is not None else expires_at

    def _remember(self, token_hash: str, key: ApiKeyInfo, expires_at: datetime) -> None:
        if self._cache_ttl <= 0:
            return
        self._cache[token_hash] = (key, expires_at, self._clock())
        self._cache.move_to_end(token_hash)
        while len(self._cache) > MAX_CACHED_SESSIONS:
            self._cache.popitem(last=False)
