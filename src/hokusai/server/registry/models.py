"""Stage transitions made through the service: when a version entered a stage (MLflow does not keep it)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, String
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
