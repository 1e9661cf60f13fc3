"""CircuitBreaker: one guard in front of every call to MLflow.

CLOSED -> OPEN after `failure_threshold` consecutive failures. OPEN refuses calls at once until the recovery
timeout has passed, then lets up to `half_open_max_calls` probes through (HALF_OPEN). `success_threshold`
successful probes close it; a failed probe opens it again with the recovery timeout doubled, up to a cap.

What counts as a failure is decided here, in `record_answer`: only what says MLflow itself is unwell (no
connection, no answer in time, a 502/503/504). A 500 answers one request's input: any caller could send such
input on purpose, so it must never move the breaker that every caller shares.

A small state machine rather than a library: the maintained ones (pybreaker, aiobreaker, purgatory) either wrap
whole coroutines, which does not fit a proxied response whose outcome is known once its headers arrive, or have
no growing recovery timeout. The event loop is single-threaded and nothing here awaits, so no lock is needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from hokusai.server.errors import ServiceUnavailable

logger = logging.getLogger(__name__)


class BreakerState(StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


class CircuitOpen(ServiceUnavailable):
    def __init__(self, retry_after: float) -> None:
        super().__init__("MLflow server unavailable (circuit breaker open)")
        self.headers = {"Retry-After": str(max(1, round(retry_after)))}


@dataclass(frozen=True)
class BreakerSnapshot:
    state: BreakerState
    failure_count: int
    last_failure_time: datetime | None
    recovery_timeout: float
    seconds_until_probe: float | None
    times_opened: int


@dataclass(frozen=True)
class Permit:
    """Handed out for each admitted call; tells `record` whether the call was a half-open probe."""

    probe: bool


StateListener = Callable[[BreakerState, BreakerState], None]

# MLflow (or a proxy in front of it) is down, overloaded or too slow: the answers that are about MLflow, not about
# the request. Everything else it answers, 500 included, says MLflow is up and reading requests.
UPSTREAM_FAULT_STATUSES = frozenset({502, 503, 504})


def is_upstream_fault(status: int) -> bool:
    return status in UPSTREAM_FAULT_STATUSES


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        recovery_timeout: float = 10.0,
        max_recovery_timeout: float = 300.0,
        half_open_max_calls: int = 1,
        success_threshold: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.base_recovery_timeout = recovery_timeout
        self.max_recovery_timeout = max_recovery_timeout
        self.half_open_max_calls = half_open_max_calls
        self.success_threshold = success_threshold
        self._clock = clock
        self._listeners: list[StateListener] = []
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._recovery_timeout = recovery_timeout
        self._opened_at = 0.0
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._last_failure_time: datetime | None = None
        self._times_opened = 0

    def add_listener(self, listener: StateListener) -> None:
        """Called with (old, new) on every state change: logging and metrics hang here."""
        self._listeners.append(listener)

    @property
    def state(self) -> BreakerState:
        """The state a call made now would meet. Pure: reading it changes nothing."""
        if self._state is BreakerState.OPEN and self._clock() >= self._opened_at + self._recovery_timeout:
            return BreakerState.HALF_OPEN
        return self._state

    def snapshot(self) -> BreakerSnapshot:
        state = self.state
        until_probe = None
        if state is BreakerState.OPEN:
            until_probe = max(0.0, self._opened_at + self._recovery_timeout - self._clock())
        return BreakerSnapshot(
            state=state,
            failure_count=self._consecutive_failures,
            last_failure_time=self._last_failure_time,
            recovery_timeout=self._recovery_timeout,
            seconds_until_probe=until_probe,
            times_opened=self._times_opened,
        )

    def acquire(self) -> Permit:
        """Admit a call or raise CircuitOpen at once."""
        if self._state is BreakerState.CLOSED:
            return Permit(probe=False)
        if self.state is BreakerState.OPEN:
            raise CircuitOpen(self._opened_at + self._recovery_timeout - self._clock())
        if self._state is BreakerState.OPEN:
            self._transition(BreakerState.HALF_OPEN)
            self._probes_in_flight = 0
            self._probe_successes = 0
        if self._probes_in_flight >= self.half_open_max_calls:
            raise CircuitOpen(1.0)
        self._probes_in_flight += 1
        return Permit(probe=True)

    def record(self, permit: Permit, success: bool) -> None:
        if permit.probe:
            self._probes_in_flight = max(0, self._probes_in_flight - 1)
        if success:
            self._on_success(permit)
        else:
            self._on_failure(permit)

    def record_answer(self, permit: Permit, status: int) -> None:
        """An HTTP answer from MLflow: 502/503/504 are failures; 2xx-4xx successes; any other 5xx (a 500 from one
        request's input, a 501) tells nothing about MLflow as a whole, so it neither counts nor resets the count."""
        if is_upstream_fault(status):
            self.record(permit, success=False)
        elif status < 500:
            self.record(permit, success=True)
        else:
            self.release(permit)

    def release(self, permit: Permit) -> None:
        """The call ended without telling anything about MLflow (e.g. the client went away)."""
        if permit.probe:
            self._probes_in_flight = max(0, self._probes_in_flight - 1)

    def reset(self) -> None:
        self._consecutive_failures = 0
        self._recovery_timeout = self.base_recovery_timeout
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._transition(BreakerState.CLOSED)

    def _on_success(self, permit: Permit) -> None:
        if self._state is BreakerState.HALF_OPEN and permit.probe:
            self._probe_successes += 1
            if self._probe_successes >= self.success_threshold:
                self.reset()
        elif self._state is BreakerState.CLOSED:
            self._consecutive_failures = 0

    def _on_failure(self, permit: Permit) -> None:
        self._last_failure_time = datetime.now(UTC)
        self._consecutive_failures += 1
        if self._state is BreakerState.HALF_OPEN and permit.probe:
            self._recovery_timeout = min(self._recovery_timeout * 2, self.max_recovery_timeout)
            self._open()
        elif self._state is BreakerState.CLOSED and self._consecutive_failures >= self.failure_threshold:
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._times_opened += 1
        self._transition(BreakerState.OPEN)

    def _transition(self, new_state: BreakerState) -> None:
        old_state, self._state = self._state, new_state
        if old_state is new_state:
            return
        logger.warning(
            "MLflow circuit breaker %s -> %s (recovery timeout %.1fs, consecutive failures %d)",
            old_state,
            new_state,
            self._recovery_timeout,
            self._consecutive_failures,
        )
        for listener in self._listeners:
            listener(old_state, new_state)
