"""HealthCache: each health result reused for a short TTL, and at most one run of each check at a time.

The health routes are public. Without this, every anonymous call ran its probes (the detailed MLflow check makes
seven MLflow calls): a loop of them slowed every gateway call (p50 15.8 -> 465 ms). Now concurrent callers await
the run in flight, later ones get its result until the TTL passes, and a breaker changing state (MLflow's or
Redis') drops the results at once, so health never reports the state from before a transition.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import Counter

T = TypeVar("T")

HEALTH_CHECK_RUNS = Counter(
    "hokusai_health_check_runs_total", "Health checks actually run (not answered from the cache)", ["check"]
)


class HealthCache:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._results: dict[str, tuple[float, Any]] = {}
        self._in_flight: dict[str, asyncio.Future[Any]] = {}
        self._generation = 0  # bumped by clear(): a run started before it is not stored after it

    async def get(self, name: str, check: Callable[[], Awaitable[T]]) -> T:
        """The result of `check` (named `name`, a fixed word): fresh from the cache, from the run in flight, or
        from a new run."""
        cached = self._results.get(name)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        running = self._in_flight.get(name)
        if running is None:
            running = asyncio.ensure_future(self._run(name, check))
            self._in_flight[name] = running
        # Shielded: one caller hanging up must not cancel the run the others are waiting for.
        return await asyncio.shield(running)

    def clear(self, *_: object) -> None:
        """Forget every result (a breaker changed state): later callers start new runs; runs already in flight
        finish for their own callers and are not stored."""
        self._results.clear()
        self._in_flight.clear()
        self._generation += 1

    async def _run(self, name: str, check: Callable[[], Awaitable[T]]) -> T:
        generation = self._generation
        try:
            HEALTH_CHECK_RUNS.labels(check=name).inc()
            result = await check()
            if self.ttl > 0 and generation == self._generation:
                self._results[name] = (self._clock() + self.ttl, result)
            return result
        finally:
            if self._in_flight.get(name) is asyncio.current_task():
                del self._in_flight[name]
