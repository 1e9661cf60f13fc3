"""The event as the API, the Redis stream and webhook bodies show it."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from pydantic import BaseModel, Field

from hokusai.server.events.models import EventRow


class EventActor(BaseModel):
    kind: str = Field(description="api_key | mlflow (changed in MLflow directly) | cli | service")
    name: str
    key_id: str | None = None


class EventSubject(BaseModel):
    model_name: str | None = None
    version: str | None = None
    model_id: str | None = None


class Event(BaseModel):
    id: str = Field(description="Unique; the webhook-id of its deliveries (receivers deduplicate by it)")
    seq: int = Field(description="Position in the log: events of one model are delivered in this order")
    type: str
    occurred_at: str
    actor: EventActor
    subject: EventSubject
    payload: dict[str, Any]

    @classmethod
    def of(cls, row: EventRow) -> Event:
        return cls(
            id=row.id,
            seq=row.seq,
            type=row.type,
            occurred_at=row.occurred_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            actor=EventActor(kind=row.actor_kind, name=row.actor_name, key_id=row.actor_key_id),
            subject=EventSubject(model_name=row.model_name, version=row.version, model_id=row.model_id),
            payload=row.payload,
        )


class EventPage(BaseModel):
    events: list[Event]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null at the end")


def webhook_body(event: Event) -> dict[str, Any]:
    """A delivery's JSON body, in the Standard Webhooks shape: type, timestamp, data (the event)."""
    return {"type": event.type, "timestamp": event.occurred_at, "data": event.model_dump()}
