"""`hokusai events tail` and `hokusai events list`: the model lifecycle event log from a terminal.

`tail` follows the Redis stream `<HOKUSAI_REDIS_PREFIX>events` (XREAD BLOCK) when HOKUSAI_REDIS_URL is set (run it
with the server's environment: the stream's name derives from the server's database unless HOKUSAI_REDIS_PREFIX is
set), else it polls the service's GET /api/v1/events with an API key, as the client commands do. Either way it
prints each event as one JSON line (the Event as the API shows it), and Ctrl-C ends it with status 0.
"""

from __future__ import annotations

import importlib.util
import json
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import typer

from hokusai.client_cli import JsonOption, KeyOption, UrlOption, _table, failures_as_exit_codes, show
from hokusai.sdk.events import Event, type_matches

if TYPE_CHECKING:
    from hokusai.server.config import Settings

# The stream's key after the prefix, as StreamPublisher names it (not imported: that module loads the database
# layer, seconds of start-up for a command that never touches it; tests/test_event_stream.py checks they agree).
STREAM_KEY = "events"
# XREAD waits this long for an entry before asking again (and noticing a dead connection).
BLOCK_SECONDS = 5
READ_COUNT = 100  # entries per XREAD
PAGE_SIZE = 500  # events per page of the HTTP log (the route's maximum)
# Between attempts to reach Redis or the service again after a failure, doubling from the first to the last.
RECONNECT_DELAYS = (0.5, 10.0)

events_app = typer.Typer(help="The model lifecycle event log: follow it, list it.", no_args_is_help=True)

TypeOption = typer.Option(
    [], "--type", help="An event type or pattern (model_version.*, *); repeat for several; default every type"
)
ModelOption = typer.Option(None, "--model", help="Only this model's events")


@events_app.command("tail")
def tail(
    types: list[str] = TypeOption,
    model: str | None = ModelOption,
    from_start: bool = typer.Option(
        False, "--from-start", help="Begin with the oldest event still in the stream (over HTTP: the whole log)"
    ),
    http: bool = typer.Option(False, "--http", help="Poll the HTTP log even when HOKUSAI_REDIS_URL is set"),
    interval: float = typer.Option(2.0, "--interval", min=0.1, help="Seconds between polls of the HTTP log"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Follow the events as they happen, one JSON line each (Ctrl-C to stop)."""
    settings = None if http else _stream_settings()
    try:
        if settings is not None:
            _follow_stream(settings, types, model, from_start)
        else:
            _follow_log(url, api_key, types, model, from_start, interval)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@events_app.command("list")
def list_events(
    types: list[str] = TypeOption,
    model: str | None = ModelOption,
    since: str | None = typer.Option(None, "--since", help="ISO time with a zone, e.g. 2026-11-29T12:00:00Z"),
    limit: int = typer.Option(50, "--limit", min=1, max=PAGE_SIZE),
    cursor: str | None = typer.Option(None, "--cursor", help="The next_cursor of a previous page"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
    as_json: bool = JsonOption,
) -> None:
    """One page of the event log, oldest first (GET /api/v1/events; any key with read scope)."""
    from hokusai.sdk.registry import ModelRegistry

    with failures_as_exit_codes(), ModelRegistry(url, api_key) as registry:
        page = registry.events(types or None, model, since, limit, cursor)
    if as_json:
        show(page, True)
        return
    show(
        page.events,
        False,
        lambda rows: _table(
            "Events",
            ["seq", "occurred_at", "type", "model", "version", "actor"],
            [[e.seq, e.occurred_at, e.type, e.subject.model_name, e.subject.version, e.actor.name] for e in rows],
        ),
    )
    if page.next_cursor:
        typer.echo(f"More: --cursor {page.next_cursor}", err=True)


def _stream_settings() -> Settings | None:
    """The server's settings when they name a Redis (and the server side is installed), else None."""
    if importlib.util.find_spec("pydantic_settings") is None or importlib.util.find_spec("redis") is None:
        return None
    from hokusai.server.config import ConfigurationError, load_settings

    try:
        settings = load_settings()
    except ConfigurationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return settings if settings.redis_url is not None else None


def _follow_stream(settings: Settings, types: list[str], model: str | None, from_start: bool) -> None:
    """XREAD BLOCK from the stream's current end (or its start), printing the entries that match."""
    import redis

    from hokusai.server.events.types import pattern_problem

    for pattern in types:
        if (problem := pattern_problem(pattern)) is not None:
            raise typer.BadParameter(problem, param_hint="--type")
    stream = f"{settings.redis_key_prefix}{STREAM_KEY}"
    client = redis.Redis.from_url(
        str(settings.redis_url), socket_connect_timeout=settings.redis_timeout + 5, socket_timeout=BLOCK_SECONDS + 5
    )
    position: str | None = "0-0" if from_start else None
    announced = False
    delay = RECONNECT_DELAYS[0]
    while True:
        try:
            if position is None:  # "$" resolved once, so no entry between two reads is skipped
                newest = client.xrevrange(stream, count=1)
                position = newest[0][0].decode() if newest else "0-0"
            if not announced:
                typer.echo(f"Following {stream} after {position} (Ctrl-C to stop)", err=True)
                announced = True
            answer = client.xread({stream: position}, count=READ_COUNT, block=BLOCK_SECONDS * 1000)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            typer.echo(f"warning: Redis unavailable ({exc}); trying again in {delay:g}s", err=True)
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAYS[1])
            continue
        delay = RECONNECT_DELAYS[0]
        for _, entries in answer or []:
            for entry_id, fields in entries:
                position = entry_id.decode()
                event_type = fields.get(b"type", b"").decode()
                if types and not type_matches(types, event_type):
                    continue
                if model is not None and fields.get(b"model", b"").decode() != model:
                    continue
                typer.echo(fields[b"event"].decode())


def _follow_log(
    url: str | None, api_key: str | None, types: list[str], model: str | None, from_start: bool, interval: float
) -> None:
    """Poll GET /api/v1/events after the last event seen; from now (the service's clock) unless `from_start`."""
    from hokusai.sdk.errors import ConnectionFailed, RateLimited, UpstreamError
    from hokusai.sdk.registry import ModelRegistry

    with failures_as_exit_codes(), ModelRegistry(url, api_key) as registry:
        since = None if from_start else _service_time(registry)
        cursor: str | None = None
        typer.echo(f"Following the event log of {registry.url} every {interval:g}s (Ctrl-C to stop)", err=True)
        delay = RECONNECT_DELAYS[0]
        while True:
            try:
                page = registry.events(types or None, model, since, PAGE_SIZE, cursor)
            except (ConnectionFailed, UpstreamError, RateLimited) as exc:  # a long follow outlives an outage
                typer.echo(f"warning: {exc.detail}; trying again in {delay:g}s", err=True)
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_DELAYS[1])
                continue
            delay = RECONNECT_DELAYS[0]
            for event in page.events:
                typer.echo(event_line(event))
            if page.next_cursor:
                cursor = page.next_cursor
                continue
            if page.events:
                cursor = str(page.events[-1].seq)  # the log's cursor is the seq of the last event read
            time.sleep(interval)


def _service_time(registry: Any) -> datetime:
    """The service's clock (the Date of its answer), to start from: events carry its times, not this machine's."""
    import httpx

    from hokusai.sdk.errors import ConnectionFailed

    try:
        response = registry._transport.client.get(f"{registry._v1}/events", params={"limit": 1})
    except httpx.TransportError as exc:
        raise ConnectionFailed(f"Could not reach {registry.url}: {exc}") from exc
    registry._transport.raise_for_status(response)
    try:
        return parsedate_to_datetime(response.headers["date"]).astimezone(UTC)
    except (KeyError, TypeError, ValueError):
        return datetime.now(UTC)


def event_line(event: Event) -> str:
    """One event as one line of JSON, as the stream's `event` field holds it."""
    import dataclasses

    return json.dumps(dataclasses.asdict(event), separators=(",", ":"), ensure_ascii=False)
