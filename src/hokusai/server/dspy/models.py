"""Declared DSPy programs (one row per version) and the record of every execution."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from hokusai.server.db import Base, UtcDateTime


class DspyProgramRow(Base):
    __tablename__ = "dspy_programs"

    program_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    description: Mapped[str] = mapped_column(Text)
    module: Mapped[str] = mapped_column(String(32))
    signatures: Mapped[list] = mapped_column(JSON)  # one signature string per predictor
    instructions: Mapped[str] = mapped_column(Text)
    demos: Mapped[list] = mapped_column(JSON)
    lm: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the program's own LM settings, if any
    source: Mapped[str | None] = mapped_column(String(1000), nullable=True)  # models:/... of a pickled program
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class DspyExecutionRow(Base):
    __tablename__ = "dspy_executions"
    __table_args__ = (
        Index("ix_dspy_executions_program_started", "program_id", "started_at"),
        Index("ix_dspy_executions_started", "started_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    program_id: Mapped[str] = mapped_column(String(128))
    program_version: Mapped[str] = mapped_column(String(64))
    batch_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    mode: Mapped[str] = mapped_column(String(16))
    success: Mapped[bool] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    duration_ms: Mapped[float] = mapped_column(Float)
    input_bytes: Mapped[int] = mapped_column(Integer)
    output_bytes: Mapped[int] = mapped_column(Integer)
    inputs: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # only with HOKUSAI_DSPY_RECORD_CONTENT
    outputs: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    usage: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
