"""What GET /api/v1/audit answers."""

from __future__ import annotations

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
        return cls(
            id=entry.id or 0,
            at=entry.at,
            key_id=entry.key_id,
            actor=entry.actor,
            address=entry.address,
            method=entry.method,
            route=entry.route,
            targets=entry.targets,
            status=entry.status,
        )


class AuditPage(BaseModel):
    records: list[AuditRecord]
    next_cursor: str | None
