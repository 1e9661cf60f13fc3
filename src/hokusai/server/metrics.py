"""Prometheus metrics. Labels are bounded: route template, method, status class; never a name, key or address."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
