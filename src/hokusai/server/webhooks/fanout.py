"""Fan-out: in the transaction that appends events, one pending delivery per (event, matching enabled webhook)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hokusai.server.db import utcnow
from hokusai.server.events.models import EventRow
from hokusai.server.events.types import matches
from hokusai.server.webhooks.models import DeliveryRow, WebhookRow


def wants(webhook: WebhookRow, event: EventRow) -> bool:
    if not matches(webhook.event_types, event.type):
        return False
    return not webhook.model_names or event.model_name in webhook.model_names


async def add_deliveries(session: AsyncSession, events: Sequence[EventRow]) -> int:
    webhooks = (await session.execute(select(WebhookRow).where(WebhookRow.enabled.is_(True)))).scalars().all()
    if not webhooks:
        return 0
    now = utcnow()
    deliveries = [
        DeliveryRow(
            webhook_id=webhook.id,
            event_seq=event.seq,
            event_id=event.id,
            lane=event.model_name or "",
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        for event in events
        for webhook in webhooks
        if wants(webhook, event)
    ]
    session.add_all(deliveries)
    return len(deliveries)
