"""Tables of the event log: the outbox, the registry snapshot events are derived from, intents, named leases."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from hokusai.server.db import Base, UtcDateTime

# SQLite makes only an INTEGER PRIMARY KEY an alias of its rowid (autoincrement); PostgreSQL gets a bigint.
SEQUENCE = BigInteger().with_variant(Integer(), "sqlite")


class EventRow(Base):
    """One lifecycle event. `seq` orders the log (and is the stream id in Redis): event transactions take one lock
    (PostgreSQL advisory; SQLite has one writer), so events are committed in `seq` order and a reader following
    `seq` never skips one committed late."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_model_seq", "model_name", "seq"),
        Index("ix_events_type_seq", "type", "seq"),
        Index("ix_events_unpublished", "published"),
    )

    seq: Mapped[int] = mapped_column(SEQUENCE, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)  # evt_<hex>: the webhook-id of its deliveries
    type: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    actor_kind: Mapped[str] = mapped_column(String(16))  # api_key | mlflow | cli | service
    actor_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    actor_name: Mapped[str] = mapped_column(String(200))
    model_name: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    published: Mapped[bool] = mapped_column(Boolean, default=False)  # appended to the Redis stream


class SnapshotModelRow(Base):
    """What the service last saw of one registered model in MLflow; `revision` makes each diff a compare-and-set."""

    __tablename__ = "registry_snapshot_models"

    name: Mapped[str] = mapped_column(String(1000), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)  # description, tags, aliases
    observed_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SnapshotVersionRow(Base):
    __tablename__ = "registry_snapshot_versions"

    name: Mapped[str] = mapped_column(String(1000), primary_key=True)
    version: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)  # stage, status, description, tags, source, run_id


class ChangeIntentRow(Base):
    """A change the service is about to ask MLflow for, and who asked: written before the call, removed by the diff
    that sees the change. A process killed in between leaves it, and the reconciler still names the right actor."""

    __tablename__ = "registry_change_intents"

    id: Mapped[int] = mapped_column(SEQUENCE, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(1000), index=True)
    actor_kind: Mapped[str] = mapped_column(String(16))
    actor_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    actor_name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class NamedLeaseRow(Base):
    """A job that one service process at a time should run (the reconciler, the stream publisher)."""

    __tablename__ = "named_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class EventLogOriginRow(Base):
    """When the event log began (one row, written by the migration): a registered model MLflow created before
    then is taken into the snapshot silently, not announced as created."""

    __tablename__ = "event_log_origin"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
