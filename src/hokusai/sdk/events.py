"""The event log (GET /api/v1/events, read scope) and webhook subscriptions (/api/v1/webhooks, admin scope), as
operations of ModelRegistry and AsyncModelRegistry.

    registry = ModelRegistry()
    for event in registry.iter_events(type=["model_version.*"], model="churn"):
        print(event.seq, event.type, event.subject.version)
    hook = registry.create_webhook("https://example.com/hooks/hokusai", ["model_version.improved"])
    print(hook.secret)   # shown once: keep it to verify deliveries (hokusai.verify_webhook)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from hokusai.sdk.transport import Call, Operations, without_none

# Marks a field update_webhook leaves as it is (None is a value there: model_names=None means every model).
UNCHANGED: Any = type("Unchanged", (), {"__repr__": lambda self: "UNCHANGED"})()


def v1_prefix(base_url: str) -> str:
    """/api/v1 on the service's root; on an `.../api` base URL (the production one) that is `/v1`."""
    return "/v1" if base_url.rstrip("/").endswith("/api") else "/api/v1"


def type_matches(patterns: list[str] | tuple[str, ...], event_type: str) -> bool:
    """Whether an event type matches any of the patterns: an exact type, "<family>.*" or "*" (as the server
    filters and webhooks subscribe)."""
    return any(
        pattern in ("*", event_type) or (pattern.endswith(".*") and event_type.startswith(pattern[:-1]))
        for pattern in patterns
    )


@dataclass
class EventActor:
    kind: str  # api_key | mlflow (changed in MLflow directly) | cli | service
    name: str
    key_id: str | None = None


@dataclass
class EventSubject:
    model_name: str | None = None
    version: str | None = None
    model_id: str | None = None


@dataclass
class Event:
    """One lifecycle event. `id` is unique (the webhook-id of its deliveries); `seq` orders the log."""

    id: str
    seq: int
    type: str
    occurred_at: str  # ISO 8601, UTC
    actor: EventActor
    subject: EventSubject
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class EventPage:
    events: list[Event]
    next_cursor: str | None = None  # pass as `cursor` for the next page; None at the end


@dataclass
class Webhook:
    id: str
    url: str
    event_types: list[str] = field(default_factory=list)
    model_names: list[str] | None = None  # None: every model
    enabled: bool = True
    description: str | None = None
    created_by: str | None = None  # the id of the admin key that created it
    created_at: str | None = None
    updated_at: str | None = None
    # whsec_...: only in the answer to its creation (and to an update with rotate_secret); keep it to verify
    # deliveries with hokusai.verify_webhook.
    secret: str | None = None


@dataclass
class WebhookList:
    webhooks: list[Webhook]


@dataclass
class WebhookDelivery:
    """One event sent (or to be sent) to one webhook: pending, delivered or dead (dead-lettered after the last
    retry). `event_id` is the webhook-id header of every attempt."""

    id: int
    webhook_id: str
    event_id: str
    status: str  # pending | delivered | dead
    attempts: int = 0
    event_type: str | None = None  # None when the event is no longer in the log
    next_attempt_at: str | None = None
    last_status_code: int | None = None
    last_latency_ms: float | None = None
    last_error: str | None = None
    created_at: str | None = None
    delivered_at: str | None = None
    redelivery_of: int | None = None  # the delivery this one sends again


@dataclass
class DeliveryPage:
    deliveries: list[WebhookDelivery]  # newest first
    next_cursor: str | None = None


@dataclass
class WebhookTestResult:
    success: bool  # the receiver answered 2xx
    status_code: int | None = None  # None when no answer came (timeout, connection refused)
    latency_ms: float | None = None
    error: str | None = None


def _events_params(
    type: str | list[str] | None,
    model: str | None,
    since: datetime | str | None,
    limit: int | None,
    cursor: str | None,
) -> dict[str, Any]:
    if isinstance(since, datetime):
        if since.tzinfo is None:
            raise ValueError("since must carry a time zone (e.g. datetime.now(timezone.utc))")
        since = since.isoformat()
    types = [type] if isinstance(type, str) else type
    return without_none({"type": types or None, "model": model, "since": since, "limit": limit, "cursor": cursor})


class EventOperations(Operations):
    """Mixed into the registry clients; `url` is the client's base URL."""

    url: str

    @property
    def _v1(self) -> str:
        return v1_prefix(self.url)

    def _webhook_path(self, webhook_id: str) -> str:
        return f"{self._v1}/webhooks/{quote(webhook_id, safe='')}"

    # --- the event log ---------------------------------------------------------------------------------------

    def events(
        self,
        type: str | list[str] | None = None,
        model: str | None = None,
        since: datetime | str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Any:
        """One page of events in log order: `type` an event type or pattern ("model_version.*") or a list of them,
        `model` one model's, `since` at or after a time (aware datetime or ISO 8601). See iter_events for all."""
        params = _events_params(type, model, since, limit, cursor)
        return self._send(Call("GET", f"{self._v1}/events", EventPage, params=params))

    # --- webhooks (admin) ------------------------------------------------------------------------------------

    def create_webhook(
        self,
        url: str,
        event_types: list[str],
        model_names: list[str] | None = None,
        enabled: bool = True,
        description: str | None = None,
    ) -> Any:
        """Subscribe `url` to events of these types (patterns allowed), of these models (None: every model). The
        answer holds the signing `secret`, shown this once."""
        body = {"url": url, "event_types": event_types, "model_names": model_names, "enabled": enabled}
        body |= without_none({"description": description})
        return self._send(Call("POST", f"{self._v1}/webhooks", Webhook, json=body, idempotent=False))

    def list_webhooks(self) -> Any:
        return self._send(Call("GET", f"{self._v1}/webhooks", WebhookList, pick="webhooks"))

    def get_webhook(self, webhook_id: str) -> Any:
        return self._send(Call("GET", self._webhook_path(webhook_id), Webhook))

    def update_webhook(
        self,
        webhook_id: str,
        *,
        url: str = UNCHANGED,
        event_types: list[str] = UNCHANGED,
        model_names: list[str] | None = UNCHANGED,
        enabled: bool = UNCHANGED,
        description: str | None = UNCHANGED,
        rotate_secret: bool = False,
    ) -> Any:
        """Change the fields given, leave the others (model_names=None: every model from now on). With
        `rotate_secret`, a new secret replaces the old one at once; the answer's `secret` shows it, once."""
        given = {
            "url": url,
            "event_types": event_types,
            "model_names": model_names,
            "enabled": enabled,
            "description": description,
        }
        body = {name: value for name, value in given.items() if value is not UNCHANGED}
        if rotate_secret:
            body["rotate_secret"] = True
        return self._send(Call("PATCH", self._webhook_path(webhook_id), Webhook, json=body))

    def delete_webhook(self, webhook_id: str) -> Any:
        return self._send(Call("DELETE", self._webhook_path(webhook_id), None, idempotent=False))

    def webhook_deliveries(
        self, webhook_id: str, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Any:
        """One page of the webhook's deliveries, newest first: `status` pending, delivered or dead."""
        params = without_none({"status": status, "limit": limit, "cursor": cursor})
        return self._send(Call("GET", self._webhook_path(webhook_id) + "/deliveries", DeliveryPage, params=params))

    def redeliver(self, webhook_id: str, delivery_id: str | int) -> Any:
        """Send a delivery's event once more (a dead-lettered one, or any other), as a new delivery."""
        path = f"{self._webhook_path(webhook_id)}/deliveries/{quote(str(delivery_id), safe='')}/redeliver"
        return self._send(Call("POST", path, WebhookDelivery, idempotent=False))

    def test_webhook(self, webhook_id: str) -> Any:
        """Send a signed `webhook.test` event to the webhook now (not in the log); the answer says how the receiver
        responded."""
        return self._send(Call("POST", self._webhook_path(webhook_id) + "/test", WebhookTestResult, idempotent=False))
