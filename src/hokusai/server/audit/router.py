"""/api/v1/audit: read the audit log (admin scope)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from hokusai.server.audit.schemas import AuditPage, AuditRecord
from hokusai.server.audit.store import AuditFilter
from hokusai.server.auth.dependencies import allow
from hokusai.server.deps import Audit
from hokusai.server.errors import ErrorDetail

router = APIRouter(prefix="/api/v1/audit", tags=["audit"], dependencies=[Depends(allow("audit:read"))])


@router.get("", response_model=AuditPage, responses={400: {"model": ErrorDetail, "description": "Invalid cursor"}})
async def list_audit(
    audit: Audit,
    key_id: Annotated[str | None, Query(max_length=32)] = None,
    method: Annotated[str | None, Query(max_length=16)] = None,
    route: Annotated[
        str | None, Query(max_length=500, description="A route template, e.g. /models/{model_name}")
    ] = None,
    status: Annotated[int | None, Query(ge=100, le=599)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> AuditPage:
    # This process's pending rows first, so a write is visible to the next read made here.
    await audit.flush()
    entries, next_cursor = await audit.store.list(
        AuditFilter(key_id=key_id, method=method, route=route, status=status, since=since, until=until),
        limit,
        cursor,
    )
    return AuditPage(records=[AuditRecord.of(entry) for entry in entries], next_cursor=next_cursor)
