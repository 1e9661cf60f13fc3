"""Request and response bodies of /api/v1/webhooks."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from hokusai.server.webhooks.models import DeliveryRow, WebhookRow

DeliveryStatus = Literal["pending", "delivered", "dead"]
EventPattern = Annotated[str, Field(min_length=1, max_length=64)]
ModelName = Annotated[str, Field(min_length=1, max_length=1000)]

URL_FIELD = Field(
    max_length=2000,
    description="http(s) URL the events are POSTed to; it must resolve to public addresses only, unless the "
    "service runs with HOKUSAI_WEBHOOK_ALLOW_PRIVATE",
)
EVENT_TYPES_FIELD = Field(
    min_length=1,
    max_length=50,
    description="Event types to send: exact ('model_version.created'), a family ('model_version.*') or '*'",
)
MODEL_NAMES_FIELD = Field(
    None,
    max_length=100,
    description="Only events of these models (null or empty: every event, those of no model included)",
)


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = URL_FIELD
    event_types: list[EventPattern] = EVENT_TYPES_FIELD
    model_names: list[ModelName] | None = MODEL_NAMES_FIELD
    enabled: bool = True
    description: str | None = Field(None, max_length=500)


class WebhookUpdate(BaseModel):
    """Only the fields given change (model_names: null sends every model's events again)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, max_length=2000)
    event_types: list[EventPattern] | None = Field(None, min_length=1, max_length=50)
    model_names: list[ModelName] | None = MODEL_NAMES_FIELD
    enabled: bool | None = Field(
        None, description="false: deliveries already queued wait, and new events are not queued, until true again"
    )
    description: str | None = Field(None, max_length=500)
    rotate_secret: bool = Field(False, description="true: a new secret replaces the old one at once (shown once)")


class Webhook(BaseModel):
    id: str
    url: str
    event_types: list[str]
    model_names: list[str] | None
    enabled: bool
    description: str | None
    created_by: str | None = Field(description="Id of the admin key that created it")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: WebhookRow) -> Webhook:
        return cls(
            id=row.id,
            url=row.url,
            event_types=list(row.event_types),
            model_names=list(row.model_names) if row.model_names else None,
            enabled=row.enabled,
            description=row.description,
            created_by=row.created_by,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class WebhookList(BaseModel):
    """Every subscription (an object, like the other lists, so that fields can be added)."""

    webhooks: list[Webhook]


class WebhookCreated(Webhook):
    secret: str = Field(
        description="whsec_...: verifies the webhook-signature of each delivery (Standard Webhooks). Shown once: "
        "GET never returns it; PATCH with rotate_secret makes a new one"
    )


class WebhookUpdated(Webhook):
    secret: str | None = Field(None, description="The new secret, when rotate_secret was asked (shown once)")


class Delivery(BaseModel):
    id: int
    webhook_id: str
    event_id: str = Field(description="The webhook-id header of every attempt")
    event_type: str | None = Field(description="null when the event is no longer in the log")
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None = Field(description="When a pending delivery is tried next")
    last_status_code: int | None
    last_latency_ms: float | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    redelivery_of: int | None = Field(description="The delivery this one sends again (POST .../redeliver)")

    @classmethod
    def of(cls, row: DeliveryRow, event_type: str | None) -> Delivery:
        return cls(
            id=row.id,
            webhook_id=row.webhook_id,
            event_id=row.event_id,
            event_type=event_type,
            status=row.status,  # type: ignore[arg-type]
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
            last_status_code=row.last_status_code,
            last_latency_ms=row.last_latency_ms,
            last_error=row.last_error,
            created_at=row.created_at,
            delivered_at=row.delivered_at,
            redelivery_of=row.redelivery_of,
        )


class DeliveryPage(BaseModel):
    deliveries: list[Delivery] = Field(description="Newest first")
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null at the end")


class WebhookTestResult(BaseModel):
    success: bool = Field(description="The receiver answered 2xx")
    status_code: int | None = Field(description="null when no answer came (timeout, connection refused)")
    latency_ms: float
    error: str | None
