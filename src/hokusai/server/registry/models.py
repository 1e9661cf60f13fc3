"""The registry's own records: stage transitions, model ids, idempotency (analytics: analytics/models.py)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from hokusai.server.db import Base, UtcDateTime


class StageTransitionRow(Base):
    __tablename__ = "stage_transitions"
    __table_args__ = (Index("ix_stage_transitions_model_version", "model_name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    transitioned_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ModelIdRow(Base):
    """The stable, opaque id of a registered model, assigned at its first registration through the service."""

    __tablename__ = "model_ids"

    model_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class IdempotencyRow(Base):
    """The first answer to a request sent with an Idempotency-Key (per API key); null while it is being made."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("key_id", "idempotency_key", name="uq_idempotency_key_per_api_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(32))
    idempotency_key: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
