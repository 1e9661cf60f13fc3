"""ApiKeyService: validates presented keys (with a short in-process cache) and manages keys for the HTTP API."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path

from hokusai.server.auth.caller import Caller
from hokusai.server.auth.keys import Scope, hash_api_key, is_well_formed
from hokusai.server.auth.store import ApiKeyInfo, ApiKeyStore, CreatedApiKey
from hokusai.server.db import utcnow
from hokusai.server.errors import InvalidApiKey

logger = logging.getLogger(__name__)
MAX_CACHED_KEYS = 10_000


class ApiKeyService:
    def __init__(self, store: ApiKeyStore, cache_ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._cache_ttl = cache_ttl
        self._clock = clock
        # key hash -> (record, trusted until: read time + TTL, or the key's expiry if sooner, on `clock`). Bounded
        # and keyed by hash: the plaintext is never kept. Only active keys are kept.
        self._cache: OrderedDict[str, tuple[ApiKeyInfo, float]] = OrderedDict()
        self._revoke_listeners: list[Callable[[str], None]] = []
        self._lookups: dict[str, asyncio.Future[ApiKeyInfo | None]] = {}  # key hash -> the database read in flight
        self._revocations = 0

    def on_revoke(self, listener: Callable[[str], None]) -> None:
        """Call `listener(key_id)` when this process revokes a key (the browser sessions forget theirs)."""
        self._revoke_listeners.append(listener)

    async def authenticate(
        self, presented: str, before_lookup: Callable[[], Awaitable[None]] | None = None
    ) -> ApiKeyInfo:
        """The record of an active key, or InvalidApiKey for anything else.

        `before_lookup` runs only when the database must be asked (the key is not in the cache): the hook for
        refusing a blocked client before its guess is looked at. The database is searched by the key's SHA-256,
        so lookup timing says nothing about the key itself; the only direct comparison (the checksum) is
        constant-time.
        """
        key_hash = hash_api_key(presented)
        cached = self._cache.get(key_hash)
        if cached is not None:
            if self._clock() < cached[1]:
                return cached[0]  # the per-request path: one hash, one dict read, one clock read
            del self._cache[key_hash]  # past its time: read again (it may have been revoked or expired)
        if not is_well_formed(presented):
            raise InvalidApiKey()
        if before_lookup is not None:
            await before_lookup()
        # One database read per key at a time: when a busy key's entry expires, the requests in flight with it
        # wait for the same read (and one `last_used_at` write) rather than each making their own.
        lookup = self._lookups.get(key_hash)
        if lookup is None:
            lookup = self._lookups[key_hash] = asyncio.ensure_future(self._look_up(key_hash))
            lookup.add_done_callback(lambda done: self._lookup_done(key_hash, done))
        info = await asyncio.shield(lookup)  # a caller that goes away does not cancel the others' read
        if info is None:
            raise InvalidApiKey()
        return info

    async def _look_up(self, key_hash: str) -> ApiKeyInfo | None:
        """The active key of this hash from the database (remembered for the TTL), or None."""
        revocations = self._revocations
        info = await self.store.find_by_hash(key_hash)
        now = utcnow()
        if info is None or not info.is_active(now):
            return None
        # Recorded when the cache is refreshed: at most once per TTL per process, not per request.
        await self.store.mark_used(info.id, now)
        if revocations == self._revocations:  # a key revoked here meanwhile may have been read before it was
            self._remember(key_hash, info, now)
        return info

    def _lookup_done(self, key_hash: str, lookup: asyncio.Future[ApiKeyInfo | None]) -> None:
        if self._lookups.get(key_hash) is lookup:
            del self._lookups[key_hash]
        if not lookup.cancelled():
            lookup.exception()  # retrieved here: every waiter may have gone away

    async def create(
        self,
        name: str,
        scopes: set[Scope],
        rate_limit_per_hour: int | None,
        expires_in_days: int | None,
        actor: Caller | None = None,
    ) -> CreatedApiKey:
        """A new key; `actor` is who asked for it (None: the operator, from the CLI)."""
        expires_in = timedelta(days=expires_in_days) if expires_in_days is not None else None
        created = await self.store.create(name, scopes, rate_limit_per_hour, expires_in)
        if actor is not None:
            logger.info("API key %s created by %s %s", created.info.id, actor.kind, actor.id)
        return created

    async def list(self) -> list[ApiKeyInfo]:
        return await self.store.list()

    async def revoke(self, key_id: str, actor: Caller | None = None) -> ApiKeyInfo:
        """Revoke at once in this process; other processes see it when their cache entry expires."""
        info = await self.store.revoke(key_id)
        if actor is not None:
            logger.info("API key %s revoked by %s %s", key_id, actor.kind, actor.id)
        self._revocations += 1
        for key_hash in [h for h, (cached, _) in self._cache.items() if cached.id == key_id]:
            del self._cache[key_hash]
        for listener in self._revoke_listeners:
            listener(key_id)
        return info

    def _remember(self, key_hash: str, info: ApiKeyInfo, now: datetime) -> None:
        if self._cache_ttl <= 0:
            return
        read_at = self._clock()
        trusted_for = self._cache_ttl
        if info.expires_at is not None:  # computed once here, so a cached request needs no wall-clock date
            trusted_for = min(trusted_for, (info.expires_at - now).total_seconds())
        self._cache.pop(key_hash, None)
        self._cache[key_hash] = (info, read_at + trusted_for)
        while len(self._cache) > MAX_CACHED_KEYS:
            self._cache.popitem(last=False)


BOOTSTRAP_KEY_NAME = "bootstrap admin"


async def ensure_admin_key(store: ApiKeyStore, supplied: str | None, key_file: Path) -> str | None:
    """On a database with no keys, create the first admin key.

    With `supplied` (HOKUSAI_BOOTSTRAP_ADMIN_KEY) that key is stored and nothing is printed or written.
    Otherwise a new key is written to `key_file` (mode 0600) and returned, for the caller to show once.
    Race-free: of processes starting at once on one database exactly one stores a key; the others find it there
    (the same supplied key given to all is accepted by all).
    """
    if await store.count() > 0:
        return None
    created = await store.create_first(BOOTSTRAP_KEY_NAME, {Scope.ADMIN}, key=supplied)
    if created is None or supplied is not None:
        return None
    _write_private_file(key_file, created.key + "\n")
    return created.key


def _write_private_file(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(content)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed
