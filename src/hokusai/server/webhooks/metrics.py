"""Prometheus metrics of webhook deliveries (on /metrics with the others). Labels are bounded: the outcome only,
never a webhook id, URL or model name."""

from __future__ import annotations

from typing import Literal

from prometheus_client import Counter, Histogram

Outcome = Literal["delivered", "failed", "dead"]

WEBHOOK_DELIVERIES = Counter(
    "webhook_deliveries_total",
    "Webhook delivery attempts by outcome: delivered (2xx), failed (to be retried), dead (retries exhausted, or "
    "queued behind one that was)",
    ["outcome"],
)
WEBHOOK_ATTEMPT_DURATION = Histogram(
    "webhook_attempt_duration_seconds",
    "Time from sending a webhook delivery to its receiver's answer (or the error)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


def count_outcome(outcome: Outcome, deliveries: int = 1) -> None:
    if deliveries > 0:
        WEBHOOK_DELIVERIES.labels(outcome=outcome).inc(deliveries)
