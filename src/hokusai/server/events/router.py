"""/api/v1/events: the event log (read scope), filtered by type, model and time, in pages."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from hokusai.server.auth.dependencies import allow
from hokusai.server.deps import Events
from hokusai.server.errors import ErrorDetail, InvalidRequest
from hokusai.server.events.mlflow_hooks import MAX_HINT_BYTES
from hokusai.server.events.outbox import EventQuery, parse_cursor
from hokusai.server.events.schemas import Event, EventPage
from hokusai.server.events.types import pattern_problem

router = APIRouter(prefix="/api/v1/events", tags=["events"])


@router.get(
    "",
    response_model=EventPage,
    dependencies=[Depends(allow("events:read"))],
    responses={400: {"model": ErrorDetail, "description": "Unknown type pattern or invalid cursor"}},
)
async def list_events(
    events: Events,
    type: Annotated[
        list[str] | None,
        Query(max_length=20, description="Event types or patterns ('model_version.*'); repeat for several"),
    ] = None,
    model: Annotated[str | None, Query(max_length=1000, description="Only this model's events")] = None,
    since: Annotated[datetime | None, Query(description="Only events at or after this time (ISO 8601)")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=20)] = None,
) -> EventPage:
    types = type or []
    for pattern in types:
        if (problem := pattern_problem(pattern)) is not None:
            raise InvalidRequest(problem)
    if since is not None and since.tzinfo is None:
        raise InvalidRequest("since must carry a time zone (e.g. 2026-11-29T12:00:00Z)")
    after = parse_cursor(cursor)
    if model is not None and "\x00" in model:
        return EventPage(events=[])  # no model has that name (PostgreSQL text cannot even hold it)
    query = EventQuery(types=types, model_name=model, since=since, after=after)
    rows, next_cursor = await events.outbox.page(query, limit)
    return EventPage(events=[Event.of(row) for row in rows], next_cursor=next_cursor)


@router.post(
    "/mlflow",
    status_code=202,
    include_in_schema=False,  # MLflow's own callback, signed with the subscription's secret; no API key
)
async def mlflow_webhook(request: Request, events: Events) -> dict[str, str | None]:
    body = await request.body()
    if len(body) > MAX_HINT_BYTES:
        raise InvalidRequest(f"MLflow webhook body larger than {MAX_HINT_BYTES} bytes")
    headers = {name.lower(): value for name, value in request.headers.items()}
    return {"observing": events.mlflow_hooks.receive(body, headers)}
