"""The analytics records: contributions, prediction calls, evaluations."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, Float, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from hokusai.server.db import Base, UtcDateTime


class ContributionRow(Base):
    """A contributor's share of one model version, with the improvement it brought over the version's parent."""

    __tablename__ = "contributions"
    __table_args__ = (
        UniqueConstraint("address", "model_name", "version", name="uq_contribution_per_version"),
        Index("ix_contributions_address_contributed_at", "address", "contributed_at"),
        Index("ix_contributions_model_version", "model_name", "version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    address: Mapped[str] = mapped_column(String(42))  # EIP-55 checksum form
    model_name: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(32))
    model_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    weight: Mapped[float] = mapped_column(Float)
    benchmark_metric: Mapped[str | None] = mapped_column(String(250), nullable=True)
    benchmark_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    parent: Mapped[str | None] = mapped_column(String(300), nullable=True)  # "name:version"
    parent_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    improvement_score: Mapped[float] = mapped_column(Float)  # signed, direction-aware, times the weight
    contributed_at: Mapped[datetime] = mapped_column(UtcDateTime)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime)


class PredictionRow(Base):
    """One call of POST /models/{name}/{version}/predict: when, how many rows, how long, whether it worked."""

    __tablename__ = "prediction_records"
    __table_args__ = (Index("ix_prediction_records_model_version_at", "model_name", "version", "predicted_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(32))
    predicted_at: Mapped[datetime] = mapped_column(UtcDateTime)
    rows: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    success: Mapped[bool] = mapped_column(Boolean)


class EvaluationRow(Base):
    """An evaluation of a version on a dataset: queued, running, then succeeded (with its result) or failed."""

    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_status_lease", "status", "lease_expires_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(32))
    dataset_path: Mapped[str] = mapped_column(String(1000))
    status: Mapped[str] = mapped_column(String(16))
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Who runs it (a process's owner id), when that process last said it still does, and until when the claim holds:
    # a starting process reclaims only evaluations whose lease has expired, never another live process's work.
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # What was asked (so a process that reclaims an abandoned evaluation can run it again) and how many runs began.
    request: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
