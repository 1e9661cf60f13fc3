"""Moments as the API shows them: ISO 8601 in UTC, from MLflow's milliseconds or the database's values."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_millis(value: Any) -> datetime:
    """MLflow's timestamps: milliseconds since the epoch."""
    return datetime.fromtimestamp(int(value or 0) / 1000, UTC)


def as_utc(value: datetime | str) -> datetime:
    """An aggregate (min, max) bypasses the column type, so SQLite hands back a naive UTC datetime or a string."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
