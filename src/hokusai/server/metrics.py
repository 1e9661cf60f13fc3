"""Prometheus metrics. Labels are bounded: route template, method, status class; never a name, key or address.

One process keeps its metrics in memory and /metrics shows them. Under `hokusai serve --workers N` the serve process
gives its workers a private PROMETHEUS_MULTIPROC_DIR: prometheus_client then keeps every value in a file per worker,
and /metrics, whichever worker answers it, adds up the files of all of them (counters and histograms summed; the
gauges below say how they combine). The process, platform and GC collectors describe one process and are left out
there.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anyio
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

if TYPE_CHECKING:
    from hokusai.server.mlflow.breaker import CircuitBreaker

# prometheus_client chose its value storage (memory or files) from this variable when it was imported; read once
# here to agree with it. Set by the serve process for its workers, never a HOKUSAI_* setting.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests served, by route template, method and status class",
    ["route", "method", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time to serve an HTTP request, by route template and method",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    method_label = method if method in KNOWN_METHODS else "OTHER"
    HTTP_REQUESTS.labels(route=route, method=method_label, status=f"{status // 100}xx").inc()
    HTTP_REQUEST_DURATION.labels(route=route, method=method_label).observe(seconds)
    if _exported_breaker is not None:
        _export_breaker(_exported_breaker)


# Each API worker has its own breaker: with several, the gauges show the worst of the live workers ("livemax": an
# exited worker's value is dropped when the serve process marks it dead).
MLFLOW_BREAKER_STATE = Gauge(
    "mlflow_circuit_breaker_state",
    "State of the MLflow circuit breaker: 0 closed, 1 half-open, 2 open (with several workers, the worst)",
    multiprocess_mode="livemax",
)
MLFLOW_BREAKER_TRANSITIONS = Counter(
    "mlflow_circuit_breaker_transitions_total",
    "State changes of the MLflow circuit breaker",
    ["from_state", "to_state"],
)
MLFLOW_BREAKER_CONSECUTIVE_FAILURES = Gauge(
    "mlflow_circuit_breaker_consecutive_failures",
    "Consecutive failed calls to MLflow (with several workers, the most of any)",
    multiprocess_mode="livemax",
)
_STATE_VALUES = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}
_exported_breaker: CircuitBreaker | None = None  # multiprocess mode only: written after each request


def track_breaker(breaker: CircuitBreaker) -> None:
    """Export a breaker's state and its transitions.

    In one process the gauges are read on scrape, so an elapsed recovery timeout shows. A worker's file cannot call
    back: there the gauges are written at each transition and after each request the worker serves (a few
    microseconds), so an idle worker shows its state as of its last request."""
    global _exported_breaker
    breaker.add_listener(
        lambda old, new: MLFLOW_BREAKER_TRANSITIONS.labels(from_state=old.value, to_state=new.value).inc()
    )
    if MULTIPROCESS_DIR is None:
        MLFLOW_BREAKER_STATE.set_function(lambda: _STATE_VALUES[breaker.state.value])
        MLFLOW_BREAKER_CONSECUTIVE_FAILURES.set_function(lambda: breaker.snapshot().failure_count)
        return
    _exported_breaker = breaker
    breaker.add_listener(lambda old, new: _export_breaker(breaker))
    _export_breaker(breaker)


def _export_breaker(breaker: CircuitBreaker) -> None:
    snapshot = breaker.snapshot()
    MLFLOW_BREAKER_STATE.set(_STATE_VALUES[snapshot.state.value])
    MLFLOW_BREAKER_CONSECUTIVE_FAILURES.set(snapshot.failure_count)


async def exposition() -> bytes:
    """The Prometheus text of /metrics: this process's registry, or (several workers) every worker's files."""
    if MULTIPROCESS_DIR is None:
        return generate_latest(REGISTRY)
    if _exported_breaker is not None:
        _export_breaker(_exported_breaker)  # the answering worker's own state as of now
    return await anyio.to_thread.run_sync(_all_workers, MULTIPROCESS_DIR)  # reads a file per worker and metric type


def _all_workers(directory: str) -> bytes:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return generate_latest(registry)
