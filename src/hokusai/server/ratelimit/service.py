"""RequestRateLimiter: counts requests per API key (in process, or in Redis shared by every server process) with a
sliding window counter, and failed authentications per client address.

Sliding window counter rather than moving window: two counts per key and window, O(1) per request whatever the
limit, where the moving window keeps one timestamp per counted request and its cost grows with the limit
(bench/auth_overhead.py: the moving window alone took more than half the throughput of a trivial route). It is
exact within a window (N allowed, N+1 refused) and smooth across window edges, where it weighs the previous
window's count by how much of it still overlaps: no burst of 2N at a fixed-window boundary.

Rather than GCRA: GCRA keeps one timestamp per key and is as cheap in a script, but its "N per hour" is a rate
with a burst of N, which lets up to 2N-1 requests through in a rolling hour; the sliding window counter keeps the
documented meaning of a budget per hour (and the headers it always sent). See counters.py for the storage.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem
from redis.asyncio import Redis
from redis.exceptions import RedisError

from hokusai.server.errors import HokusaiError, ServiceUnavailable
from hokusai.server.ratelimit.counters import CounterLimit, CounterState, CounterStore, MemoryCounters, RedisCounters
from hokusai.server.ratelimit.policies import Policy, key_policies
from hokusai.server.redis_breaker import RedisBreaker, RedisSkipped, redis_retry

logger = logging.getLogger(__name__)
STORAGE_WARNING_INTERVAL = 60.0
AUTH_FAILURES = "auth-failures"  # counter namespace of failed authentications, per client address
MAX_CACHED_POLICY_SETS = 10_000


class RateLimited(HokusaiError):
    status_code = 429

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__("Rate limit exceeded")
        self.headers = headers


class RateLimitingUnavailable(ServiceUnavailable):
    def __init__(self) -> None:
        super().__init__("Rate limiting is unavailable")


def counter_limit(counter: str, item: RateLimitItem) -> CounterLimit:
    window = item.get_expiry()
    return CounterLimit(f"{counter}:{window}", item.amount, window)


@dataclass(frozen=True)
class PolicySet:
    """The policies of one (key, its own limit, route), with what each request would otherwise rebuild."""

    policies: tuple[Policy, ...]
    limits: tuple[CounterLimit, ...]
    policy_fields: tuple[str, ...]  # RateLimit-Policy, one item per policy
    policy_header: str  # all of them: the same for every admitted request of the set

    @classmethod
    def of(cls, policies: list[Policy]) -> PolicySet:
        fields = tuple(f'"{policy.name}";q={policy.item.amount};w={policy.window_seconds}' for policy in policies)
        limits = tuple(counter_limit(policy.counter, policy.item) for policy in policies)
        return cls(tuple(policies), limits, fields, ", ".join(fields))


def rate_limit_headers(policies: PolicySet, states: tuple[CounterState, ...], now: float) -> dict[str, str]:
    """X-RateLimit-* for the tightest policy, and the IETF RateLimit / RateLimit-Policy fields for all of them
    (RateLimit-Policy lists the policies decided: up to the one that refused)."""
    tightest = 0  # most requests have one policy (a route policy adds a second): no min() with a key function
    for position in range(1, len(states)):
        candidate, best = states[position], states[tightest]
        if (candidate.remaining, candidate.reset_in) < (best.remaining, best.reset_in):
            tightest = position
    policy, state = policies.policies[tightest], states[tightest]
    reset_in = max(0, math.ceil(state.reset_in))
    policy_header = policies.policy_header
    if len(states) < len(policies.policies):  # refused before the last policy
        policy_header = ", ".join(policies.policy_fields[: len(states)])
    return {
        "X-RateLimit-Limit": str(policy.item.amount),
        "X-RateLimit-Remaining": str(state.remaining),
        "X-RateLimit-Reset": str(math.ceil(now + state.reset_in)),
        "RateLimit-Policy": policy_header,
        "RateLimit": f'"{policy.name}";r={state.remaining};t={reset_in}',
    }


class RequestRateLimiter:
    def __init__(
        self,
        counters: CounterStore,
        default_per_hour: int,
        route_limits: dict[str, RateLimitItem],
        auth_failure_limit: RateLimitItem,
        fail_open: bool,
        breaker: RedisBreaker | None = None,
        gateway_per_hour: int | None = None,
    ) -> None:
        self.counters = counters
        self.breaker = breaker
        self.default_per_hour = default_per_hour
        self.gateway_per_hour = gateway_per_hour
        self.route_limits = route_limits
        self.auth_failure_limit = auth_failure_limit
        self.fail_open = fail_open
        self._last_storage_warning = -math.inf
        self._last_failure: BaseException | None = None  # the requests of one failed Redis call share its error
        # (key id, its own limit, route) -> policies: built once, not on every request of the key.
        self._policy_sets: dict[tuple[str, int | None, str | None], PolicySet] = {}

    @classmethod
    def in_memory(cls, **options) -> RequestRateLimiter:
        return cls(MemoryCounters(), **options)

    @classmethod
    def on_redis(
        cls, redis_url: str, timeout: float, breaker: RedisBreaker, prefix: str = "hokusai-", **options
    ) -> RequestRateLimiter:
        """A Redis client (and pool) of its own, with the same short timeouts and single retry as the service's,
        so a stalled Redis costs a request at most two timeouts before the breaker opens. Its keys start with
        `prefix` + "ratelimit:" (HOKUSAI_REDIS_PREFIX in the service)."""
        client = Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=redis_retry())
        return cls(RedisCounters(client, f"{prefix}ratelimit:"), breaker=breaker, **options)

    async def aclose(self) -> None:
        """Close the Redis client of its own, if it has one (the in-process counters hold nothing to close)."""
        if isinstance(self.counters, RedisCounters):
            await self.counters.aclose()

    def policy_set(self, key_id: str, key_limit_per_hour: int | None, route: str | None) -> PolicySet:
        cache_key = (key_id, key_limit_per_hour, route)
        policies = self._policy_sets.get(cache_key)
        if policies is None:
            if len(self._policy_sets) >= MAX_CACHED_POLICY_SETS:
                self._policy_sets.clear()  # rebuilt on demand: cheap, and rare with a bounded set of keys
            policies = PolicySet.of(
                key_policies(
                    key_id, key_limit_per_hour, self.default_per_hour, route, self.route_limits, self.gateway_per_hour
                )
            )
            self._policy_sets[cache_key] = policies
        return policies

    async def hit_key(self, key_id: str, key_limit_per_hour: int | None, route: str | None) -> dict[str, str]:
        """Count one request of this key; the headers to send, or RateLimited (429) when a policy is spent.

        The route policy (the tighter one) is decided first, then the key's budget; a request one of them refuses
        is counted in neither.
        """
        policies = self.policy_set(key_id, key_limit_per_hour, route)
        try:
            self._check_breaker()
            decision = await self.counters.acquire(policies.limits)
        except (RedisError, OSError, RedisSkipped) as exc:
            return self._storage_failed(exc)
        self._storage_answered()
        headers = rate_limit_headers(policies, decision.states, time.time())
        if decision.refused is not None:
            retry_after = max(1, math.ceil(decision.states[-1].reset_in))
            raise RateLimited({**headers, "Retry-After": str(retry_after)})
        return headers

    async def refuse_if_blocked(self, address: str) -> None:
        """429 for an address that has failed authentication too often in the window."""
        await self._auth_failures(address, count=False)

    async def record_auth_failure(self, address: str) -> None:
        """Count a failed authentication; past the budget the answer becomes 429 instead of 401."""
        await self._auth_failures(address, count=True)

    async def _auth_failures(self, address: str, count: bool) -> None:
        limit = counter_limit(f"{AUTH_FAILURES}:{address}", self.auth_failure_limit)
        try:
            self._check_breaker()
            decision = await self.counters.acquire((limit,), count=count)
        except (RedisError, OSError, RedisSkipped) as exc:
            self._storage_failed(exc)
            return
        self._storage_answered()
        if decision.refused is not None:
            raise RateLimited({"Retry-After": str(max(1, math.ceil(decision.states[-1].reset_in)))})

    def _check_breaker(self) -> None:
        if self.breaker is not None:
            self.breaker.check()

    def _storage_answered(self) -> None:
        if self.breaker is not None:
            self.breaker.record_success()

    def _storage_failed(self, exc: Exception) -> dict[str, str]:
        """Fail open (serve, warn at most once a minute) or closed (503), as configured."""
        if self.breaker is not None and not isinstance(exc, RedisSkipped) and exc is not self._last_failure:
            # One failure per Redis call, not per request it carried: one slow call does not open the breaker.
            self._last_failure = exc
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
