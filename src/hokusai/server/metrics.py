"""Prometheus metrics. Labels are bounded: route template, method, status class; never a name, key or address."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from hokusai.server.mlflow.breaker import CircuitBreaker

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


MLFLOW_BREAKER_STATE = Gauge(
    "mlflow_circuit_breaker_state", "State of the MLflow circuit breaker: 0 closed, 1 half-open, 2 open"
)
MLFLOW_BREAKER_TRANSITIONS = Counter(
    "mlflow_circuit_breaker_transitions_total",
    "State changes of the MLflow circuit breaker",
    ["from_state", "to_state"],
)
MLFLOW_BREAKER_CONSECUTIVE_FAILURES = Gauge(
    "mlflow_circuit_breaker_consecutive_failures", "Consecutive failed calls to MLflow"
)
_STATE_VALUES = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}


def track_breaker(breaker: CircuitBreaker) -> None:
    """Export a breaker's state (read on scrape, so an elapsed recovery timeout shows) and its transitions."""
    MLFLOW_BREAKER_STATE.set_function(lambda: _STATE_VALUES[breaker.state.value])
    MLFLOW_BREAKER_CONSECUTIVE_FAILURES.set_function(lambda: breaker.snapshot().failure_count)
    breaker.add_listener(
        lambda old, new: MLFLOW_BREAKER_TRANSITIONS.labels(from_state=old.value, to_state=new.value).inc()
    )
