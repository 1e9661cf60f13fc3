"""The service app plus trivial routes, identical but for authentication and rate limiting.

Served by bench/auth_overhead.py with `uvicorn --factory _auth_bench_app:create`; configured by HOKUSAI_* variables.

- `/bench/open`: no authentication.
- `/bench/guarded`: `allow("models:read")`, the service's gate (key check from the in-process cache, rate limit).
- `/bench/guarded-before`: the same behind the implementation issue 17 replaced, kept here to measure both in
  one run: the key cache as it was (checksum, date and expiry checked on every request) and the rate limiter on
  the `limits` library (a hit, then the window's stats: two Redis round trips per policy).
"""

from __future__ import annotations

import math
import time

from fastapi import Depends, FastAPI, Request
from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from hokusai.server.app import create_app
from hokusai.server.auth.caller import Caller
from hokusai.server.auth.dependencies import allow
from hokusai.server.auth.gate import Gate
from hokusai.server.auth.identity import KeyIdentifier
from hokusai.server.auth.keys import hash_api_key, is_well_formed
from hokusai.server.auth.service import ApiKeyService
from hokusai.server.auth.store import ApiKeyInfo
from hokusai.server.db import utcnow
from hokusai.server.errors import InvalidApiKey
from hokusai.server.ratelimit.policies import key_policies, parse_limit, route_id, route_limits
from hokusai.server.ratelimit.service import AUTH_FAILURES, RateLimited
from hokusai.server.ratelimit.throttle import Throttle
from hokusai.server.redis_breaker import RedisSkipped, redis_retry


class ApiKeyServiceBefore(ApiKeyService):
    """authenticate() as it was: checksum, hash, wall-clock date and expiry check on every cached request."""

    async def authenticate(self, presented, before_lookup=None) -> ApiKeyInfo:
        if not is_well_formed(presented):
            raise InvalidApiKey()
        key_hash = hash_api_key(presented)
        now = utcnow()
        entry = self._cache.get(key_hash)
        info = None
        if entry is not None:
            info, read_at = entry
            if self._clock() - read_at >= self._cache_ttl:
                del self._cache[key_hash]
                info = None
        if info is None:
            if before_lookup is not None:
                await before_lookup()
            info = await self.store.find_by_hash(key_hash)
            if info is None:
                raise InvalidApiKey()
            if info.is_active(now):
                await self.store.mark_used(info.id, now)
            self._cache[key_hash] = (info, self._clock())
        if not info.is_active(now):
            raise InvalidApiKey()
        return info


class RateLimiterBefore:
    """The rate limiter as it was: `limits`' sliding window counter, hit then window stats, policy by policy."""

    def __init__(self, storage: Storage, settings) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self.default_per_hour = settings.rate_limit_default_per_hour
        self.gateway_per_hour = settings.rate_limit_gateway_per_hour
        self.route_limits = route_limits(
            settings.rate_limit_registration,
            settings.rate_limit_lineage,
            settings.rate_limit_impact,
            settings.rate_limit_routes,
        )
        self.auth_failure_limit: RateLimitItem = parse_limit(settings.rate_limit_auth_failures)

    async def hit_key(self, key_id: str, key_limit_per_hour: int | None, route: str | None) -> dict[str, str]:
        policies = key_policies(
            key_id, key_limit_per_hour, self.default_per_hour, route, self.route_limits, self.gateway_per_hour
        )
        states, refused = [], None
        try:
            for policy in policies:
                allowed = await self._limiter.hit(policy.item, policy.counter)
                stats = await self._limiter.get_window_stats(policy.item, policy.counter)
                states.append((policy, stats.remaining, stats.reset_time))
                if not allowed:
                    refused = policy
                    break
        except StorageError:
            return {}  # failed open, as it did (the bench counts answers without rate-limit headers)
        now = time.time()
        policy, remaining, reset_at = min(states, key=lambda state: (state[1], state[2]))
        headers = {
            "X-RateLimit-Limit": str(policy.item.amount),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(math.ceil(reset_at)),
            "RateLimit-Policy": ", ".join(
                f'"{state[0].name}";q={state[0].item.amount};w={state[0].window_seconds}' for state in states
            ),
            "RateLimit": f'"{policy.name}";r={remaining};t={max(0, math.ceil(reset_at - now))}',
        }
        if refused is not None:
            raise RateLimited({**headers, "Retry-After": str(max(1, math.ceil(states[-1][2] - now)))})
        return headers

    async def refuse_if_blocked(self, address: str) -> None:
        await self._auth_failures(address, count=False)

    async def record_auth_failure(self, address: str) -> None:
        await self._auth_failures(address, count=True)

    async def _auth_failures(self, address: str, count: bool) -> None:
        check = self._limiter.hit if count else self._limiter.test
        try:
            if await check(self.auth_failure_limit, AUTH_FAILURES, address):
                return
            stats = await self._limiter.get_window_stats(self.auth_failure_limit, AUTH_FAILURES, address)
        except (StorageError, RedisSkipped):
            return
        raise RateLimited({"Retry-After": str(max(1, math.ceil(stats.reset_time - time.time())))})


class ThrottleBefore(Throttle):
    async def count(self, request: Request, caller: Caller) -> dict[str, str]:
        route = request.scope.get("route")
        # route_id was computed on every request (it is remembered now)
        route_key = route_id.__wrapped__(request.method, route.path) if route is not None else None
        return await self._limiter.hit_key(caller.id, caller.rate_limit_per_hour, route_key)


def gate_before(app: FastAPI) -> Gate:
    """Built on first use, from what the lifespan built (same database, sessions, policy and settings)."""
    gate = getattr(app.state, "gate_before", None)
    if gate is None:
        settings = app.state.settings
        if settings.redis_url is None:
            storage: Storage = MemoryStorage()
        else:
            storage = RedisStorage(
                "async+" + str(settings.redis_url),
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=f"{settings.redis_key_prefix}bench-before-ratelimit",
                socket_timeout=settings.redis_timeout,
                socket_connect_timeout=settings.redis_timeout,
                retry=redis_retry(),
            )
        limiter = RateLimiterBefore(storage, settings)
        api_keys = ApiKeyServiceBefore(app.state.api_keys.store, settings.auth_cache_ttl)
        identifier = KeyIdentifier(api_keys, limiter, app.state.sessions)  # type: ignore[arg-type]
        gate = app.state.gate_before = Gate(identifier, ThrottleBefore(limiter), app.state.policy)  # type: ignore[arg-type]
    return gate


async def guard_before(request: Request) -> Caller:
    return await gate_before(request.app).admit(request, "models:read")


def create() -> FastAPI:
    app = create_app(announce_admin_key=lambda key, path: None)

    @app.get("/bench/open")
    async def open_route() -> dict:
        return {"ok": True}

    @app.get("/bench/guarded", dependencies=[Depends(allow("models:read"))])
    async def guarded_route() -> dict:
        return {"ok": True}

    @app.get("/bench/guarded-before", dependencies=[Depends(guard_before)])
    async def guarded_before_route() -> dict:
        return {"ok": True}

    return app
