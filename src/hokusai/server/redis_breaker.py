"""RedisBreaker: stop waiting on a Redis that does not answer.

A stalled Redis (SIGSTOP, a saturated host or link) accepts connections and never replies, so every call costs
its socket timeout. After `threshold` failures in a row the breaker opens and callers skip Redis at once for
`retry_after` seconds: the rate limiter then fails open (or closed, 503) immediately, the registry cache reads
MLflow directly. When the pause is over, one call tries Redis again while the others keep skipping it; a
success closes the breaker, a failure starts another pause.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

logger = logging.getLogger(__name__)

BreakerState = Literal["closed", "open"]
StateListener = Callable[[BreakerState], None]


def redis_retry() -> Retry:
    """One retry, at once: enough for a pooled connection Redis closed while idle, not for a stalled server.
    (redis-py's default retries 10 times with backoff: seconds per call against a stalled Redis.)"""
    return Retry(NoBackoff(), retries=1)


class RedisSkipped(Exception):
    """Raised in place of a Redis call while the breaker is open."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"Redis skipped after repeated failures; retrying in {retry_in:.1f}s")


@dataclass(frozen=True)
class RedisBreakerSnapshot:
    state: BreakerState
    consecutive_failures: int
    times_opened: int
    skipped_calls: int
    seconds_until_retry: float


class RedisBreaker:
    def __init__(self, threshold: int, retry_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.retry_after = retry_after
        self._clock = clock
        self._failures = 0
        self._retry_at: float | None = None  # set while open: when the next call may try Redis
        self.times_opened = 0
        self.skipped_calls = 0
        self._listeners: list[StateListener] = []

    def add_listener(self, listener: StateListener) -> None:
        """Called with the new state on every transition (the health cache drops its results)."""
        self._listeners.append(listener)

    @property
    def state(self) -> BreakerState:
        return "closed" if self._retry_at is None else "open"

    def allow(self) -> bool:
        """Whether this call may use Redis. While open, the first call after the pause may (a trial)."""
        if self._retry_at is None:
            return True
        now = self._clock()
        if now >= self._retry_at:
            self._retry_at = now + self.retry_after  # the others keep skipping while this trial runs
            return True
        self.skipped_calls += 1
        return False

    def check(self) -> None:
        """Raise RedisSkipped unless this call may use Redis."""
        if not self.allow():
            raise RedisSkipped(self.seconds_until_retry)

    def record_success(self) -> None:
        self._failures = 0
        if self._retry_at is not None:
            self._retry_at = None
            logger.warning("Redis answers again; using it")
            self._notify("closed")

    def record_failure(self, error: BaseException) -> None:
        self._failures += 1
        if self._retry_at is None and self._failures >= self.threshold:
            self._retry_at = self._clock() + self.retry_after
            self.times_opened += 1
            logger.warning(
                "Redis failed %d times in a row (%s); skipping it for %gs",
                self._failures,
                type(error).__name__,
                self.retry_after,
            )
            self._notify("open")

    @property
    def seconds_until_retry(self) -> float:
        return 0.0 if self._retry_at is None else max(0.0, self._retry_at - self._clock())

    def snapshot(self) -> RedisBreakerSnapshot:
        return RedisBreakerSnapshot(
            self.state, self._failures, self.times_opened, self.skipped_calls, round(self.seconds_until_retry, 3)
        )

    def _notify(self, state: BreakerState) -> None:
        for listener in self._listeners:
            listener(state)
