"""RegistryReadCache: answers of list/get kept for a short TTL and dropped at once by any registry write.

Writes made through this service (its /models routes and the /mlflow gateway) call `invalidate`; writes made
straight to MLflow are seen within the TTL. Entries belong to a generation: `invalidate` starts a new one, so an
answer fetched before a write can never be stored as current after it. With Redis, the generation and the entries
live there and every server process shares them; while the Redis breaker is open the cache is bypassed (MLflow
is read directly) instead of waiting on Redis for every request.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from hokusai.server.redis_breaker import RedisBreaker

logger = logging.getLogger(__name__)
MAX_LOCAL_ENTRIES = 10_000
REDIS_PREFIX = "hokusai:"  # the service passes HOKUSAI_REDIS_PREFIX (Settings.redis_key_prefix)


class RegistryReadCache:
    def __init__(
        self, ttl: float, redis: Redis | None = None, breaker: RedisBreaker | None = None, prefix: str = REDIS_PREFIX
    ) -> None:
        self.ttl = ttl
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
