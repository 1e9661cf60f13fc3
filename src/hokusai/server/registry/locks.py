"""ModelLocks: changes to one registered model, one at a time.

A transition with `archive_existing` reads the versions in a stage and moves them: two such transitions at once both
see the other's version still where it was, and both stay in Production. MLflow takes no lock for this, so the
service does: an asyncio.Lock per model name within the process, and, with Redis configured, a Redis lock per name
so that every service process takes turns too. Writes made straight through the MLflow gateway are not serialized.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import RedisError

from hokusai.server.errors import Conflict

logger = logging.getLogger(__name__)

REDIS_PREFIX = "hokusai:"  # the service passes HOKUSAI_REDIS_PREFIX (Settings.redis_key_prefix)
# A holder that dies (kill -9) keeps the Redis lock at most this long; a live holder renews it every third of it, so a
# change that takes longer (a slow MLflow) keeps its turn.
LOCK_TTL_SECONDS = 10.0
# How long a change waits for its turn before it is answered 409 (it then changed nothing).
WAIT_SECONDS = 30.0


class ModelBusy(Conflict):
    def __init__(self, name: str) -> None:
        super().__init__(f"Another change to model {name!r} is still in progress; retry")


class ModelLocks:
    def __init__(
        self,
        redis: Redis | None = None,
        ttl: float = LOCK_TTL_SECONDS,
        wait: float = WAIT_SECONDS,
        prefix: str = REDIS_PREFIX,
    ) -> None:
        self._redis = redis
        self._key_prefix = f"{prefix}model-lock:"
        self._ttl = ttl
        self._wait = wait
        # name -> (lock, users): an entry lives while someone holds or waits for it, so the map stays bounded.
        self._local: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """The model's lock for the duration of the block; ModelBusy (409) when the turn does not come in time."""
        lock, users = self._local.get(name, (asyncio.Lock(), 0))
        self._local[name] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout(self._wait):
                    await lock.acquire()
            except TimeoutError:
                raise ModelBusy(name) from None
            try:
                async with self._shared(name):
                    yield
            finally:
                lock.release()
        finally:
            lock, users = self._local[name]
            if users > 1:
                self._local[name] = (lock, users - 1)
            else:
                del self._local[name]

    @asynccontextmanager
    async def _shared(self, name: str) -> AsyncIterator[None]:
        """The Redis lock of the name, when Redis is configured. Redis unreachable: the process lock alone (logged),
        as the rate limits fail open; a change is then only serialized within this process."""
        if self._redis is None:
            yield
            return
        key = self._key_prefix + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        lock = self._redis.lock(key, timeout=self._ttl, blocking_timeout=self._wait, sleep=0.02)
        try:
            acquired = await lock.acquire()
        except RedisError as exc:
            logger.warning("Model lock not taken in Redis (%s): serialized within this process only", exc)
            yield
            return
        if not acquired:
            raise ModelBusy(name)
        renewal = asyncio.create_task(self._renew(lock, name))
        try:
            yield
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
            try:
                await lock.release()
            except RedisError as exc:  # expired meanwhile, or Redis went away: the TTL frees it
                logger.warning("Model lock not released in Redis: %s", exc)

    async def _renew(self, lock: Lock, name: str) -> None:
        """Keep the lock's TTL full while the change runs (a change outliving the TTL must not lose its turn)."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                await lock.reacquire()
            except RedisError as exc:  # Redis away, or the lock expired meanwhile: nothing more to keep
                logger.warning("Model lock of %r not renewed in Redis: %s", name, exc)
                return
