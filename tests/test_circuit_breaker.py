"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

import pytest

from hokusai.server.mlflow.breaker import BreakerState, CircuitBreaker, CircuitOpen


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock, **kwargs) -> CircuitBreaker:
    options = {
        "failure_threshold": 3,
        "recovery_timeout": 10,
        "max_recovery_timeout": 35,
        "half_open_max_calls": 1,
        "success_threshold": 2,
    }
    return CircuitBreaker(clock=clock, **{**options, **kwargs})


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record(breaker.acquire(), success=False)


def test_opens_after_n_consecutive_failures_only(clock):
    breaker = make(clock)
    fail(breaker, 2)
    breaker.record(breaker.acquire(), success=True)  # a success in between starts the count again
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as raised:
        breaker.acquire()
    assert raised.value.status_code == 503 and raised.value.headers["Retry-After"] == "10"


def test_reading_the_state_changes_nothing(clock):
    breaker = make(clock)
    fail(breaker, 3)
    clock.now += 10
    assert breaker.state is BreakerState.HALF_OPEN  # what a call now would meet ...
    assert breaker._state is BreakerState.OPEN  # ... without having moved
    assert breaker.snapshot().state is BreakerState.HALF_OPEN
    assert breaker._state is BreakerState.OPEN


def test_half_open_admits_limited_probes_and_closes_after_m_successes(clock):
    transitions = []
    breaker = make(clock, half_open_max_calls=2)
    breaker.add_listener(lambda old, new: transitions.append((old.value, new.value)))
    fail(breaker, 3)
    clock.now += 10
    first, second = breaker.acquire(), breaker.acquire()
    with pytest.raises(CircuitOpen):
        breaker.acquire()  # only two probes at once
    breaker.record(first, success=True)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(second, success=True)
    assert breaker.state is BreakerState.CLOSED
    assert transitions == [("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"), ("HALF_OPEN", "CLOSED")]
    assert breaker.snapshot().failure_count == 0


def test_failed_probe_reopens_with_a_doubling_capped_timeout(clock):
    breaker = make(clock)
    fail(breaker, 3)
    timeouts = []
    for _ in range(4):
        clock.now += breaker.snapshot().recovery_timeout
        fail(breaker)  # the probe fails
        assert breaker.state is BreakerState.OPEN
        timeouts.append(breaker.snapshot().recovery_timeout)
    assert timeouts == [20, 35, 35, 35]
    clock.now += 34
    with pytest.raises(CircuitOpen):
        breaker.acquire()
    clock.now += 1
    breaker.record(breaker.acquire(), success=True)
    breaker.record(breaker.acquire(), success=True)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot().recovery_timeout == 10  # back to the base after closing
    assert breaker.snapshot().times_opened == 5


def test_released_probe_frees_its_slot(clock):
    breaker = make(clock)
    fail(breaker, 3)
    clock.now += 10
    probe = breaker.acquire()
    assert probe.probe and breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpen):
        breaker.acquire()  # the one probe slot is taken
    breaker.release(probe)  # e.g. the client went away before MLflow answered
    assert breaker.state is BreakerState.HALF_OPEN  # a released probe proves nothing either way
    assert breaker.acquire().probe  # the slot is free again


def test_manual_reset(clock):
    breaker = make(clock)
    fail(breaker, 3)
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED and breaker.snapshot().failure_count == 0
    breaker.acquire()


def test_late_answers_from_before_the_opening_do_not_confuse_it(clock):
    breaker = make(clock)
    early = [breaker.acquire() for _ in range(4)]
    for permit in early[:3]:
        breaker.record(permit, success=False)
    breaker.record(early[3], success=True)  # arrives after the breaker opened
    assert breaker.state is BreakerState.OPEN


def test_only_answers_about_mlflow_itself_count(clock):
    """502/503/504 are failures; a 500 (one request's input) neither counts nor resets the count; 4xx succeed."""
    breaker = make(clock)
    for _ in range(10):
        breaker.record_answer(breaker.acquire(), 500)
    assert breaker.state is BreakerState.CLOSED and breaker.snapshot().failure_count == 0
    breaker.record_answer(breaker.acquire(), 502)
    breaker.record_answer(breaker.acquire(), 503)
    breaker.record_answer(breaker.acquire(), 500)  # in between: does not start the count again
    assert breaker.snapshot().failure_count == 2
    breaker.record_answer(breaker.acquire(), 504)
    assert breaker.state is BreakerState.OPEN
    clock.now += 10
    probe = breaker.acquire()
    breaker.record_answer(probe, 500)  # a probe answered 500: frees the slot, proves nothing
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record_answer(breaker.acquire(), 404)
    breaker.record_answer(breaker.acquire(), 200)
    assert breaker.state is BreakerState.CLOSED
