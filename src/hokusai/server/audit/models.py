"""Table of the audit log: who wrote what, when; never a key, token, body or query string."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from hokusai.server.db import Base, UtcDateTime


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    actor: Mapped[str] = mapped_column(String(200))  # the key's name, `cli:<os user>`, or "anonymous"
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[str] = mapped_column(String(16))
    route: Mapped[str] = mapped_column(String(500))
    targets: Mapped[dict[str, str]] = mapped_column(JSON)
    status: Mapped[int] = mapped_column(Integer)
