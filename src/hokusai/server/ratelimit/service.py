"""RequestRateLimiter: counts requests per API key in `limits` storage (in process, or Redis shared by every
server process) with the sliding-window-counter strategy, and failed authentications per client address.

Sliding window counter rather than moving window: two counters per key and window, O(1) per request whatever the
limit, where the moving window keeps one timestamp per counted request and its cost grows with the limit
(bench/auth_overhead.py: the moving window alone took more than half the throughput of a trivial route). It is
exact within a window (N allowed, N+1 refused) and smooth across window edges, where it weighs the previous
window's count by how much of it still overlaps: no burst of 2N at a fixed-window boundary.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from hokusai.server.errors import HokusaiError, ServiceUnavailable
from hokusai.server.ratelimit.policies import Policy, key_policies
from hokusai.server.redis_breaker import RedisBreaker, RedisSkipped, redis_retry

logger = logging.getLogger(__name__)
STORAGE_WARNING_INTERVAL = 60.0
AUTH_FAILURES = "auth-failures"  # counter namespace of failed authentications, per client address


class RateLimited(HokusaiError):
    status_code = 429

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__("Rate limit exceeded")
        self.headers = headers


class RateLimitingUnavailable(ServiceUnavailable):
    def __init__(self) -> None:
        super().__init__("Rate limiting is unavailable")


@dataclass(frozen=True)
class PolicyState:
    policy: Policy
    remaining: int
    reset_at: float


def rate_limit_headers(states: list[PolicyState], now: float) -> dict[str, str]:
    """X-RateLimit-* for the tightest policy, and the IETF RateLimit / RateLimit-Policy fields for all of them."""
    tightest = min(states, key=lambda state: (state.remaining, state.reset_at))
    reset_in = max(0, math.ceil(tightest.reset_at - now))
    return {
        "X-RateLimit-Limit": str(tightest.policy.item.amount),
        "X-RateLimit-Remaining": str(tightest.remaining),
        "X-RateLimit-Reset": str(math.ceil(tightest.reset_at)),
        "RateLimit-Policy": ", ".join(
            f'"{state.policy.name}";q={state.policy.item.amount};w={state.policy.window_seconds}' for state in states
        ),
        "RateLimit": f'"{tightest.policy.name}";r={tightest.remaining};t={reset_in}',
    }


class RequestRateLimiter:
    def __init__(
        self,
        storage: Storage,
        default_per_hour: int,
        route_limits: dict[str, RateLimitItem],
        auth_failure_limit: RateLimitItem,
        fail_open: bool,
        breaker: RedisBreaker | None = None,
        gateway_per_hour: int | None = None,
    ) -> None:
        self.storage = storage
        self.breaker = breaker
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self.default_per_hour = default_per_hour
        self.gateway_per_hour = gateway_per_hour
        self.route_limits = route_limits
        self.auth_failure_limit = auth_failure_limit
        self.fail_open = fail_open
        self._last_storage_warning = -math.inf

    @classmethod
    def in_memory(cls, **options) -> RequestRateLimiter:
        return cls(MemoryStorage(), **options)

    @classmethod
    def on_redis(
        cls, redis_url: str, timeout: float, breaker: RedisBreaker, prefix: str = "hokusai-", **options
    ) -> RequestRateLimiter:
        """`limits` builds its own Redis client (and pool): it gets the same short timeouts and single retry as
        the service's, so a stalled Redis costs a request at most two timeouts before the breaker opens. Its keys
        start with `prefix` + "ratelimit" (HOKUSAI_REDIS_PREFIX in the service)."""
        storage = RedisStorage(
            "async+" + redis_url,
            implementation="redispy",
            wrap_exceptions=True,
            key_prefix=f"{prefix}ratelimit",
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=redis_retry(),
        )
        return cls(storage, breaker=breaker, **options)

    async def hit_key(self, key_id: str, key_limit_per_hour: int | None, route: str | None) -> dict[str, str]:
        """Count one request of this key; the headers to send, or RateLimited (429) when a policy is spent.

        A refused hit is not counted in the policy that refused it, and the route policy (the tighter one) is
        checked first, so a request refused there does not spend the key's hourly budget either.
        """
        policies = key_policies(
            key_id, key_limit_per_hour, self.default_per_hour, route, self.route_limits, self.gateway_per_hour
        )
        try:
            self._check_breaker()
            states, refused = [], None
            for policy in policies:
                allowed = await self._limiter.hit(policy.item, policy.counter)
                stats = await self._limiter.get_window_stats(policy.item, policy.counter)
                states.append(PolicyState(policy, stats.remaining, stats.reset_time))
                if not allowed:
                    refused = policy
                    break
        except (StorageError, RedisSkipped) as exc:
            return self._storage_failed(exc)
        self._storage_answered()
        now = time.time()
        headers = rate_limit_headers(states, now)
        if refused is not None:
            retry_after = max(1, math.ceil(states[-1].reset_at - now))
            raise RateLimited({**headers, "Retry-After": str(retry_after)})
        return headers

    async def refuse_if_blocked(self, address: str) -> None:
        """429 for an address that has failed authentication too often in the window."""
        await self._auth_failures(address, count=False)

    async def record_auth_failure(self, address: str) -> None:
        """Count a failed authentication; past the budget the answer becomes 429 instead of 401."""
        await self._auth_failures(address, count=True)

    async def _auth_failures(self, address: str, count: bool) -> None:
        check = self._limiter.hit if count else self._limiter.test
        try:
            self._check_breaker()
            if await check(self.auth_failure_limit, AUTH_FAILURES, address):
                self._storage_answered()
                return
            stats = await self._limiter.get_window_stats(self.auth_failure_limit, AUTH_FAILURES, address)
        except (StorageError, RedisSkipped) as exc:
            self._storage_failed(exc)
            return
        self._storage_answered()
        raise RateLimited({"Retry-After": str(max(1, math.ceil(stats.reset_time - time.time())))})

    def _check_breaker(self) -> None:
        if self.breaker is not None:
            self.breaker.check()

    def _storage_answered(self) -> None:
        if self.breaker is not None:
            self.breaker.record_success()

    def _storage_failed(self, exc: Exception) -> dict[str, str]:
        """Fail open (serve, warn at most once a minute) or closed (503), as configured."""
        if self.breaker is not None and not isinstance(exc, RedisSkipped):
            self.breaker.record_failure(exc)
        now = time.monotonic()
        if now - self._last_storage_warning >= STORAGE_WARNING_INTERVAL:
            self._last_storage_warning = now
            logger.warning(
                "Rate limit storage unreachable (%s); %s",
                exc,
                "serving without limits" if self.fail_open else "refusing requests",
            )
        if self.fail_open:
            return {}
        raise RateLimitingUnavailable()
