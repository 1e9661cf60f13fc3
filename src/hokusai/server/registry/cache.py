"""RegistryReadCache: answers of list/get kept for a short TTL and dropped at once by any registry write.

Writes made through this service (its /models routes and the /mlflow gateway) call `invalidate`; writes made
straight to MLflow are seen within the TTL. Entries belong to a generation: `invalidate` starts a new one, so an
answer fetched before a write can never be stored as current after it. With Redis, the generation and the entries
live there and every server process shares them; while the Redis breaker is open the cache is bypassed (MLflow
is read directly) instead of waiting on Redis for every request.

Single flight (`fill`, HOKUSAI_CACHE_SINGLE_FLIGHT): when an entry is missing or has expired, one request per key
and generation asks MLflow while the others wait for its answer, instead of all of them asking at once. In one
process the waiters share the fetch itself (its answer, or its error, which is not kept); with Redis, the process
that takes a short lock on the key fetches and the others poll for its entry, and after FILL_WAIT_SECONDS (or as
soon as the lock is gone without an entry) ask MLflow themselves, so a filler that died holds no one up for long.
A fill belongs to its generation like an entry does: a request that reads the generation after a write never
waits for a fetch begun before it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from hokusai.server.redis_breaker import RedisBreaker

logger = logging.getLogger(__name__)
MAX_LOCAL_ENTRIES = 10_000
REDIS_PREFIX = "hokusai:"  # the service passes HOKUSAI_REDIS_PREFIX (Settings.redis_key_prefix)
# The lock of a shared fill lives this long, and a process waits at most this long for another's fill before it
# asks MLflow itself: a list or get answers in well under a second, and a dead filler delays the others this much.
FILL_WAIT_SECONDS = 3.0
FILL_POLL_SECONDS = 0.02  # how often a waiting process looks for the entry (one MGET)
# Deletes the fill lock only if it is still ours (it may have expired and been taken by another process).
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
Fetch = Callable[[], Awaitable[Any]]


class RegistryReadCache:
    def __init__(
        self,
        ttl: float,
        redis: Redis | None = None,
        breaker: RedisBreaker | None = None,
        prefix: str = REDIS_PREFIX,
        single_flight: bool = True,
        fill_wait: float = FILL_WAIT_SECONDS,
    ) -> None:
        self.ttl = ttl
        self.single_flight = single_flight
        self._fill_wait = fill_wait
        self._flights: dict[tuple[int, str], asyncio.Task] = {}
        self._redis = redis
        self._prefix = f"{prefix}registry-cache"
        self._breaker = breaker or RedisBreaker(threshold=3, retry_after=5.0)
        self._generation = 0
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    async def generation(self) -> int:
        """The current generation; read it before fetching what will be stored with `put`."""
        if self._redis is None:
            return self._generation
        if not self._breaker.allow():
            return -1
        try:
            generation = int(await self._redis.get(f"{self._prefix}:generation") or 0)
        except RedisError as exc:
            self._breaker.record_failure(exc)
            logger.warning("Registry cache unavailable in Redis (%s); reading MLflow directly", exc)
            return -1
        self._breaker.record_success()
        return generation

    async def get(self, key: str, generation: int) -> Any | None:
        if not self.enabled or generation < 0:
            return None
        if self._redis is None:
            entry = self._entries.get(f"{generation}:{key}")
            if entry is None or entry[0] < time.monotonic():
                return None
            return entry[1]
        if not self._breaker.allow():
            return None
        try:
            raw = await self._redis.get(f"{self._prefix}:{generation}:{key}")
        except RedisError as exc:
            self._breaker.record_failure(exc)
            logger.debug("Registry cache read failed: %s", exc)
            return None
        self._breaker.record_success()
        return json.loads(raw) if raw is not None else None

    async def put(self, key: str, generation: int, value: Any) -> None:
        """Store an answer fetched in `generation`; nothing is stored if a write has happened since."""
        if not self.enabled or generation < 0:
            return
        if self._redis is None:
            if generation != self._generation:
                return
            self._entries[f"{generation}:{key}"] = (time.monotonic() + self.ttl, value)
            while len(self._entries) > MAX_LOCAL_ENTRIES:
                self._entries.popitem(last=False)
            return
        if not self._breaker.allow():
            return
        try:
            await self._redis.set(f"{self._prefix}:{generation}:{key}", json.dumps(value), px=int(self.ttl * 1000))
        except RedisError as exc:  # not cached this time: the next read asks MLflow again
            self._breaker.record_failure(exc)
            logger.debug("Registry cache write failed: %s", exc)
            return
        self._breaker.record_success()

    async def fill(self, key: str, fetch: Fetch) -> Any:
        """The cached answer for `key`, else what `fetch()` returns (a JSON-able value), kept for the TTL unless a
        write happens meanwhile. With single flight, concurrent misses of one key share one fetch (see above)."""
        generation = await self.generation()
        if (cached := await self.get(key, generation)) is not None:
            return cached
        if not (self.single_flight and self.enabled and generation >= 0):  # Redis skipped: MLflow directly
            return await self._fetch_and_put(key, generation, fetch)
        flight = self._flights.get((generation, key))
        if flight is None:
            # A task of its own: a waiter that goes away (its client disconnected) does not cancel the others' fetch.
            flight = asyncio.create_task(self._fill(key, generation, fetch))
            self._flights[(generation, key)] = flight
            flight.add_done_callback(partial(self._landed, (generation, key)))
        return await asyncio.shield(flight)

    def _landed(self, flight_key: tuple[int, str], flight: asyncio.Task) -> None:
        """A fill ended: the next miss starts another (an error is shared with the waiters of this one only)."""
        if self._flights.get(flight_key) is flight:
            del self._flights[flight_key]
        if not flight.cancelled():
            flight.exception()  # retrieved here too, so an error no one waited for is not reported as lost

    async def _fill(self, key: str, generation: int, fetch: Fetch) -> Any:
        if self._redis is None:
            return await self._fetch_and_put(key, generation, fetch)
        lock_key, token = f"{self._prefix}:fill:{generation}:{key}", secrets.token_hex(8)
        try:
            ours, found = await self._turn(key, generation, lock_key, token)
        except RedisError as exc:
            self._breaker.record_failure(exc)
            logger.debug("Registry cache fill lock unavailable (%s); asking MLflow", exc)
            return await self._fetch_and_put(key, generation, fetch)
        self._breaker.record_success()
        if found is not None:
            return found
        if not ours:
            logger.info("Waited %gs for another process to fill the registry cache; asking MLflow", self._fill_wait)
            return await self._fetch_and_put(key, generation, fetch)
        try:
            return await self._fetch_and_put(key, generation, fetch)
        finally:
            try:
                await self._redis.eval(_UNLOCK, 1, lock_key, token)
            except RedisError as exc:  # it expires by itself
                logger.debug("Registry cache fill lock not released: %s", exc)

    async def _turn(self, key: str, generation: int, lock_key: str, token: str) -> tuple[bool, Any | None]:
        """(True, None): this process holds the fill lock; (False, value): another process's fill stored the entry;
        (False, None): waited FILL_WAIT_SECONDS for nothing."""
        assert self._redis is not None
        entry_key = f"{self._prefix}:{generation}:{key}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._fill_wait
        while loop.time() < deadline:
            if await self._redis.set(lock_key, token, nx=True, px=max(1, int(self._fill_wait * 1000))):
                return True, None
            while loop.time() < deadline:
                await asyncio.sleep(FILL_POLL_SECONDS)
                raw, holder = await self._redis.mget(entry_key, lock_key)
                if raw is not None:
                    return False, json.loads(raw)
                if holder is None:  # its fill ended without an entry (an error, a write meanwhile) or expired
                    break
        return False, None

    async def _fetch_and_put(self, key: str, generation: int, fetch: Fetch) -> Any:
        value = await fetch()
        await self.put(key, generation, value)
        return value

    async def invalidate(self) -> None:
        self._generation += 1
        self._entries.clear()
        if self._redis is None:
            return
        if not self._breaker.allow():
            logger.warning("Redis is skipped: other processes see registry cache entries expire in %gs", self.ttl)
            return
        try:
            await self._redis.incr(f"{self._prefix}:generation")
        except RedisError as exc:
            self._breaker.record_failure(exc)
            logger.warning("Could not invalidate the shared registry cache (%s); entries expire in %gs", exc, self.ttl)
            return
        self._breaker.record_success()
