"""Webhook subscriptions and their deliveries: create, change, delete, list deliveries, redeliver, send a test.

The dispatcher (webhooks/dispatch.py) does the delivering; this service only writes rows and wakes it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from hokusai.server.config import Settings
from hokusai.server.db import Database, utcnow
from hokusai.server.errors import Conflict, InvalidRequest, NotFound
from hokusai.server.events.models import EventRow
from hokusai.server.events.outbox import Actor, new_event_id, parse_cursor
from hokusai.server.events.types import WEBHOOK_TEST, pattern_problem
from hokusai.server.webhooks.addresses import check_webhook_destination, parse_webhook_url
from hokusai.server.webhooks.dispatch import PENDING, SendResult, WebhookDispatcher, event_body
from hokusai.server.webhooks.models import DeliveryRow, WebhookRow
from hokusai.server.webhooks.signing import new_secret

EDITABLE = ("url", "event_types", "model_names", "enabled", "description")
TEST_MESSAGE = "A test delivery from Hokusai Registry: if its signature verifies, the webhook is set up right."


@dataclass(frozen=True)
class DeliveryView:
    """A delivery and its event's type (None when the event is no longer in the log)."""

    row: DeliveryRow
    event_type: str | None


def new_webhook_id() -> str:
    return "wh_" + secrets.token_hex(12)


def event_patterns(patterns: Sequence[str]) -> list[str]:
    """The patterns, each known (InvalidRequest otherwise), without repeats, in the order given."""
    for pattern in patterns:
        if (problem := pattern_problem(pattern)) is not None:
            raise InvalidRequest(problem)
    return list(dict.fromkeys(patterns))


def model_filter(names: Sequence[str] | None) -> list[str] | None:
    """None (every model) for no names, else the names without repeats."""
    return list(dict.fromkeys(names)) if names else None


class WebhookService:
    def __init__(self, database: Database, settings: Settings, dispatcher: WebhookDispatcher) -> None:
        self._database = database
        self._settings = settings
        self._dispatcher = dispatcher

    async def _checked_url(self, raw: str) -> str:
        url = parse_webhook_url(raw.strip())
        await check_webhook_destination(url, self._settings.webhook_allow_private, self._settings.webhook_timeout)
        return str(url)

    # Subscriptions

    async def create(
        self,
        url: str,
        event_types: Sequence[str],
        model_names: Sequence[str] | None = None,
        enabled: bool = True,
        description: str | None = None,
        created_by: str | None = None,
    ) -> tuple[WebhookRow, str]:
        """The new webhook and its secret (kept to sign; the caller shows it once)."""
        patterns = event_patterns(event_types)
        checked = await self._checked_url(url)
        now = utcnow()
        secret = new_secret()
        row = WebhookRow(
            id=new_webhook_id(),
            url=checked,
            event_types=patterns,
            model_names=model_filter(model_names),
            enabled=enabled,
            secret=secret,
            description=description,
            created_by=created_by,
            created_at=now,
            updated_at=now,
        )
        async with self._database.session() as session, session.begin():
            session.add(row)
        return row, secret

    async def list(self) -> list[WebhookRow]:
        async with self._database.session() as session:
            return list(await session.scalars(select(WebhookRow).order_by(WebhookRow.created_at, WebhookRow.id)))

    async def get(self, webhook_id: str) -> WebhookRow:
        async with self._database.session() as session:
            return await self._webhook(session, webhook_id)

    async def update(
        self, webhook_id: str, changes: Mapping[str, Any], rotate_secret: bool = False
    ) -> tuple[WebhookRow, str | None]:
        """Apply the given fields (those of EDITABLE present in `changes`); the new secret when rotated. A change of
        types or models applies to events from now on: deliveries already queued stay."""
        values: dict[str, Any] = {}
        for name in EDITABLE:
            if name in changes:
                values[name] = changes[name]
        if "url" in values:
            if values["url"] is None:
                raise InvalidRequest("url cannot be null")
            values["url"] = await self._checked_url(values["url"])
        if "event_types" in values:
            if values["event_types"] is None:
                raise InvalidRequest("event_types cannot be null")
            values["event_types"] = event_patterns(values["event_types"])
        if "model_names" in values:
            values["model_names"] = model_filter(values["model_names"])
        if values.get("enabled", False) is None:
            raise InvalidRequest("enabled cannot be null")
        secret = new_secret() if rotate_secret else None
        async with self._database.session() as session, session.begin():
            row = await self._webhook(session, webhook_id)
            for name, value in values.items():
                setattr(row, name, value)
            if secret is not None:
                row.secret = secret
            row.updated_at = utcnow()
        if values.get("enabled"):
            self._dispatcher.wake()  # what waited while it was disabled
        return row, secret

    async def delete(self, webhook_id: str) -> None:
        """The webhook and its deliveries: pending ones are dropped (one in flight finishes, unrecorded)."""
        async with self._database.session() as session, session.begin():
            await self._webhook(session, webhook_id)
            await session.execute(delete(DeliveryRow).where(DeliveryRow.webhook_id == webhook_id))
            await session.execute(delete(WebhookRow).where(WebhookRow.id == webhook_id))

    # Deliveries

    async def deliveries(
        self, webhook_id: str, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[DeliveryView], str | None]:
        """Newest first; the cursor is the id of the last delivery of the previous page."""
        before = parse_cursor(cursor)
        statement = (
            select(DeliveryRow, EventRow.type)
            .outerjoin(EventRow, EventRow.seq == DeliveryRow.event_seq)
            .where(DeliveryRow.webhook_id == webhook_id)
            .order_by(DeliveryRow.id.desc())
            .limit(limit + 1)
        )
        if status is not None:
            statement = statement.where(DeliveryRow.status == status)
        if before is not None:
            statement = statement.where(DeliveryRow.id < before)
        async with self._database.session() as session:
            await self._webhook(session, webhook_id)
            rows = (await session.execute(statement)).all()
        views = [DeliveryView(row, event_type) for row, event_type in rows[:limit]]
        next_cursor = str(views[-1].row.id) if len(rows) > limit else None
        return views, next_cursor

    async def redeliver(self, webhook_id: str, delivery_id: int) -> DeliveryView:
        """A new pending delivery of the same event (same webhook-id), sent at once (in its model's order, ahead of
        newer events still pending); 409 while a delivery of that event to this webhook is pending."""
        async with self._database.session() as session, session.begin():
            await self._webhook(session, webhook_id)
            original = await session.scalar(
                select(DeliveryRow).where(DeliveryRow.id == delivery_id, DeliveryRow.webhook_id == webhook_id)
            )
            if original is None:
                raise NotFound(f"Delivery {delivery_id} of webhook {webhook_id} not found")
            event_type = await session.scalar(select(EventRow.type).where(EventRow.seq == original.event_seq))
            if event_type is None:
                raise Conflict(f"Event {original.event_id} is no longer in the event log: it cannot be sent again")
            pending = await session.scalar(
                select(DeliveryRow.id).where(
                    DeliveryRow.webhook_id == webhook_id,
                    DeliveryRow.lane == original.lane,
                    DeliveryRow.event_seq == original.event_seq,
                    DeliveryRow.status == PENDING,
                )
            )
            if pending is not None:
                raise Conflict(f"Delivery {pending} of event {original.event_id} is still pending")
            now = utcnow()
            again = DeliveryRow(
                webhook_id=webhook_id,
                event_seq=original.event_seq,
                event_id=original.event_id,
                lane=original.lane,
                status=PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                redelivery_of=original.id,
            )
            session.add(again)
        self._dispatcher.wake()
        return DeliveryView(again, event_type)

    async def send_test(self, webhook_id: str, actor: Actor) -> SendResult:
        """Send a signed `webhook.test` event to the webhook's URL now and answer what happened. The event is made
        for the test alone (seq 0): it is not in the event log and no delivery is stored."""
        webhook = await self.get(webhook_id)
        probe = EventRow(
            seq=0,
            id=new_event_id(),
            type=WEBHOOK_TEST,
            occurred_at=utcnow(),
            actor_kind=actor.kind,
            actor_key_id=actor.key_id,
            actor_name=actor.name,
            model_name=None,
            version=None,
            model_id=None,
            payload={"webhook_id": webhook.id, "message": TEST_MESSAGE},
        )
        return await self._dispatcher.send(webhook.url, webhook.secret, probe.id, event_body(probe))

    async def _webhook(self, session: AsyncSession, webhook_id: str) -> WebhookRow:
        row = await session.get(WebhookRow, webhook_id)
        if row is None:
            raise NotFound(f"Webhook {webhook_id} not found")
        return row
