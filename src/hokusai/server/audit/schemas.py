"""What GET /api/v1/audit answers."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from pydantic import BaseModel

from hokusai.server.audit.store import AuditEntry


class AuditRecord(BaseModel):
    id: int
    at: datetime
    key_id: str | None
    actor: str
    address: str | None
    method: str
    route: str
    targets: dict[str, str]
    status: int

    @classmethod
    def of(cls, entry: AuditEntry) -> AuditRecord:
        return cls(**{**dataclasses.asdict(entry), "id": entry.id or 0})


class AuditPage(BaseModel):
    records: list[AuditRecord]
    next_cursor: str | None
