"""The outbox: events written in the same transaction as what they announce, then published and delivered.

`append` runs inside the caller's transaction: it takes the event log's lock (a PostgreSQL transaction advisory
lock; SQLite has one writer at a time anyway), so events commit in `seq` order, inserts the events, and makes one
delivery per matching webhook. After the commit the caller calls `appended()`, which wakes this process's
publisher and dispatcher (other processes find the rows on their next poll).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from hokusai.server.auth.caller import Caller
from hokusai.server.db import Database, utcnow
from hokusai.server.errors import InvalidRequest
from hokusai.server.events.models import EventRow
from hokusai.server.webhooks.fanout import add_deliveries

EVENT_LOG_LOCK_ID = 0x686F6B75736169_03  # db.py's namespace: "hokusai" in ASCII, then a suffix
ActorKind = Literal["api_key", "mlflow", "cli", "service"]


@dataclass(frozen=True)
class Actor:
    """Who made a change: an API key (id and name), MLflow itself (a change made there directly), a server command
    (`cli:<os user>`), or the service (what it does on its own, e.g. an evaluation finishing)."""

    kind: ActorKind
    name: str
    key_id: str | None = None

    @classmethod
    def of(cls, caller: Caller) -> Actor:
        return cls("api_key", caller.name, caller.key_id)


MLFLOW_ACTOR = Actor("mlflow", "mlflow")
SERVICE_ACTOR = Actor("service", "hokusai")  # what the service does on its own account


@dataclass(frozen=True)
class NewEvent:
    type: str
    actor: Actor
    model_name: str | None
    version: str | None = None
    model_id: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EventQuery:
    types: Sequence[str] = ()  # exact types or patterns ("model_version.*"); none: every type
    model_name: str | None = None
    since: datetime | None = None
    after: int | None = None  # the cursor: events with a greater seq


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(12)


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if not cursor.isascii() or not cursor.isdigit() or len(cursor) > 18:
        raise InvalidRequest("Invalid cursor: give the next_cursor of a previous page")
    return int(cursor)


class EventOutbox:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._postgres = database.engine.dialect.name == "postgresql"
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, wake: Callable[[], None]) -> None:
        """`wake()` is called after each commit that appended events (the publisher, the dispatcher)."""
        self._listeners.append(wake)

    async def append(self, session: AsyncSession, events: Iterable[NewEvent]) -> list[EventRow]:
        """Within the caller's transaction: the events inserted in order, and their deliveries made."""
        events = list(events)
        if not events:
            return []
        if self._postgres:
            await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": EVENT_LOG_LOCK_ID})
        now = utcnow()
        rows = [
            EventRow(
                id=new_event_id(),
                type=event.type,
                occurred_at=now,
                actor_kind=event.actor.kind,
                actor_key_id=event.actor.key_id,
                actor_name=event.actor.name[:200],
                model_name=event.model_name,
                version=event.version,
                model_id=event.model_id,
                payload=event.payload,
                published=False,
            )
            for event in events
        ]
        session.add_all(rows)
        await session.flush()  # assigns each seq, in order
        await add_deliveries(session, rows)
        return rows

    def appended(self) -> None:
        """Call after the commit of a transaction that appended events."""
        for wake in self._listeners:
            wake()

    async def record(self, events: Iterable[NewEvent]) -> list[EventRow]:
        """Events alone, in a transaction of their own."""
        async with self._database.session() as session, session.begin():
            rows = await self.append(session, events)
        if rows:
            self.appended()
        return rows

    async def page(self, query: EventQuery, limit: int) -> tuple[list[EventRow], str | None]:
        """Events in `seq` order after the cursor; the next cursor when there may be more."""
        statement = select(EventRow).order_by(EventRow.seq).limit(limit + 1)
        if query.after is not None:
            statement = statement.where(EventRow.seq > query.after)
        if query.model_name is not None:
            statement = statement.where(EventRow.model_name == query.model_name)
        if query.since is not None:
            statement = statement.where(EventRow.occurred_at >= query.since)
        if query.types and "*" not in query.types:
            # "<family>.*" as LIKE "<family>.%" (its "_" matches any one character: harmless, as every stored type is
            # one of types.EVENT_TYPES, whose families differ by more than that).
            statement = statement.where(
                or_(
                    *(EventRow.type.like(t[:-1] + "%") if t.endswith(".*") else EventRow.type == t for t in query.types)
                )
            )
        async with self._database.session() as session:
            rows = list((await session.execute(statement)).scalars())
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, str(rows[-1].seq) if more and rows else None

    async def last_seq(self) -> int:
        async with self._database.session() as session:
            return (await session.execute(select(EventRow.seq).order_by(EventRow.seq.desc()).limit(1))).scalar() or 0
