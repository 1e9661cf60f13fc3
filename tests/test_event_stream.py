"""The Redis stream of events: each event appended once, in seq order, whatever happens to the publishers (two at
once, a restart, a crash between the append and its record) or to Redis (down for a while, restarted empty);
bounded by MAXLEN; reported by /health as `message_queue`; followed by `hokusai events tail`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select, update

from hokusai.server.config import Settings
from hokusai.server.db import Database, run_migrations
from hokusai.server.events.models import EventRow
from hokusai.server.events.outbox import Actor, EventOutbox, NewEvent
from hokusai.server.events.stream import STREAM_KEY, StreamPublisher
from hokusai.server.health.service import message_queue_check
from hokusai.server.redis_breaker import RedisBreaker, redis_retry
from tests.support import eventually, service_environment

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

TEST_ACTOR = Actor("service", "stream tests")
# Generous: a deadline for what is expected within a poll or two, never a performance limit.
DEADLINE_SECONDS = 60.0


def unique_prefix() -> str:
    return f"test-{secrets.token_hex(4)}:"


def redis_client(url: str) -> Redis:
    """As the service makes its client: short timeouts, one retry."""
    return Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=redis_retry())


def new_events(count: int, model: str, type: str = "model_version.created") -> list[NewEvent]:
    return [NewEvent(type, TEST_ACTOR, model, str(n + 1), payload={"n": n}) for n in range(count)]


async def all_rows(database: Database) -> list[EventRow]:
    async with database.session() as session:
        return list((await session.execute(select(EventRow).order_by(EventRow.seq))).scalars())


async def unpublished(database: Database) -> int:
    return sum(1 for row in await all_rows(database) if not row.published)


async def drained(database: Database) -> bool:
    return await unpublished(database) == 0


class StreamWorld:
    """A test's stream: its prefix on a Redis, publishers over one database, a reader of the stream."""

    def __init__(self, database: Database, redis_url: str, **settings: Any) -> None:
        self.database = database
        self.redis_url = redis_url
        self.settings = Settings(
            redis_prefix=unique_prefix(), events_poll_seconds=0.2, redis_retry_after=0.5, **settings
        )
        self.stream = f"{self.settings.redis_key_prefix}{STREAM_KEY}"
        self.outbox = EventOutbox(database)
        self.reader = Redis.from_url(redis_url, retry=redis_retry())  # reconnects after a Redis restart
        self.publishers: list[StreamPublisher] = []

    def publisher(self, owner: str, redis: bool = True, **options: Any) -> StreamPublisher:
        client = redis_client(self.redis_url) if redis else None
        breaker = RedisBreaker(self.settings.redis_failure_threshold, self.settings.redis_retry_after)
        publisher = StreamPublisher(self.database, client, breaker, self.settings, owner=owner, **options)
        self.outbox.add_listener(publisher.wake)
        self.publishers.append(publisher)
        return publisher

    async def entries(self) -> list[tuple[str, dict[str, str]]]:
        raw = await self.reader.xrange(self.stream)
        return [(entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()}) for entry_id, fields in raw]

    async def assert_stream_holds(self, rows: list[EventRow]) -> None:
        """The stream holds exactly these events, once each, in seq order, at ids <seq>-0, with their fields."""
        entries = await self.entries()
        assert [entry_id for entry_id, _ in entries] == [f"{row.seq}-0" for row in rows]
        for (_, fields), row in zip(entries, rows, strict=True):
            assert fields["id"] == row.id and fields["seq"] == str(row.seq) and fields["type"] == row.type
            assert fields["model"] == (row.model_name or "") and fields["version"] == (row.version or "")
            event = json.loads(fields["event"])
            assert event["id"] == row.id and event["seq"] == row.seq and event["occurred_at"] == fields["occurred_at"]
            assert event["subject"]["model_name"] == row.model_name and event["payload"] == row.payload

    async def aclose(self) -> None:
        for publisher in self.publishers:
            await publisher.aclose()
            if publisher._redis is not None:
                await publisher._redis.aclose()
        # db 15 of the machine's Redis is shared by the suite: its keys are removed; a private Redis may be gone.
        with contextlib.suppress(RedisError):
            keys = [key async for key in self.reader.scan_iter(f"{self.settings.redis_key_prefix}*")]
            if keys:
                await self.reader.delete(*keys)
        await self.reader.aclose()


@pytest.fixture
async def world(database: Database, redis_url: str) -> AsyncIterator[Callable[..., StreamWorld]]:
    made: list[StreamWorld] = []

    def make(url: str = redis_url, **settings: Any) -> StreamWorld:
        made.append(StreamWorld(database, url, **settings))
        return made[-1]

    yield make
    for each in made:
        await each.aclose()


async def test_each_event_reaches_the_stream_once_in_order_with_two_publishers_running(world):
    stream = world()
    first, second = stream.publisher("process-a"), stream.publisher("process-b")
    await first.start()
    await second.start()

    async def writer(model: str) -> None:
        for _ in range(5):
            await stream.outbox.record(new_events(3, model))

    await asyncio.gather(*(writer(f"model-{n}") for n in range(4)))
    await eventually(lambda: drained(stream.database), "every event published")
    rows = await all_rows(stream.database)
    assert len(rows) == 60
    await eventually(lambda: stream.entries(), "entries")
    await stream.assert_stream_holds(rows)
    # One process publishes at a time: the other never held the lease.
    assert [p.last_published_at is not None for p in (first, second)].count(True) == 1


async def test_publishers_running_at_once_without_the_lease_still_append_each_event_once(world):
    """A holder whose lease ran out while it was stalled publishes beside the next one: Redis refuses the ids it
    already has, so the stream is still right."""
    stream = world()
    first, second = stream.publisher("process-a"), stream.publisher("process-b")
    appended = 0
    for round in range(4):
        await stream.outbox.record(new_events(7, f"race-{round}"))
        counts = await asyncio.gather(first.publish_pending(), second.publish_pending(), first.publish_pending())
        appended += sum(counts)
    rows = await all_rows(stream.database)
    assert appended == len(rows) == 28  # each event appended by exactly one of them
    assert all(row.published for row in rows)
    await stream.assert_stream_holds(rows)


async def test_a_restart_or_a_crash_between_append_and_record_neither_loses_nor_repeats(world):
    stream = world()
    first = stream.publisher("process-a", lease_seconds=1)
    await first.start()
    await stream.outbox.record(new_events(10, "restarted"))
    await eventually(lambda: drained(stream.database), "the first ten published")
    await first.aclose()  # a clean stop hands the lease on

    await stream.outbox.record(new_events(5, "restarted"))  # while no publisher runs
    rows = await all_rows(stream.database)
    # A crash after the append, before the rows were marked: the database says the last four of the first ten
    # are unpublished, the stream has them.
    async with stream.database.session() as session, session.begin():
        await session.execute(update(EventRow).where(EventRow.seq > rows[5].seq).values(published=False))

    second = stream.publisher("process-b", lease_seconds=1)
    await second.start()
    await eventually(lambda: drained(stream.database), "the rest published after the restart")
    await stream.assert_stream_holds(await all_rows(stream.database))

    # A publisher killed without releasing its lease: another takes over once the lease expires.
    second._task.cancel()  # as a killed process: no release
    await stream.outbox.record(new_events(3, "after-a-kill"))
    third = stream.publisher("process-c", lease_seconds=1)
    await third.start()
    await eventually(lambda: drained(stream.database), "published by the next holder")
    await stream.assert_stream_holds(await all_rows(stream.database))


async def test_events_wait_in_the_database_while_redis_is_down_and_none_is_lost(world, private_redis):
    stream = world(private_redis.url)
    publisher = stream.publisher("process-a")
    await publisher.start()
    await stream.outbox.record(new_events(5, "outage"))
    await eventually(lambda: drained(stream.database), "published before the outage")

    private_redis.pause()  # stalled: connections accepted, never answered
    try:
        await stream.outbox.record(new_events(5, "outage"))
        await stream.outbox.record(new_events(2, "outage", "model_version.stage_changed"))
        check = await eventually(
            lambda: _unhealthy(message_queue_check(publisher, 2.0)), "message_queue unhealthy while Redis is stalled"
        )
        assert "7 event(s) wait" in check.error and check.details["backlog"] == 7
        assert await unpublished(stream.database) == 7
    finally:
        private_redis.resume()
    await eventually(lambda: drained(stream.database), "published once Redis answers")
    await stream.assert_stream_holds(await all_rows(stream.database))
    assert (await message_queue_check(publisher, 2.0)).status == "healthy"

    # Killed and started again empty: what is recorded meanwhile goes to the new stream.
    private_redis.stop()
    await stream.outbox.record(new_events(3, "after-restart"))
    await asyncio.sleep(0.5)
    assert await unpublished(stream.database) == 3
    assert (await message_queue_check(publisher, 2.0)).status == "unhealthy"
    private_redis.restart()
    await eventually(lambda: drained(stream.database), "published into the new stream")
    await stream.assert_stream_holds((await all_rows(stream.database))[-3:])


async def _unhealthy(check: Any) -> Any:
    result = await check
    return result if result.status == "unhealthy" else None


async def test_the_stream_is_trimmed_to_about_maxlen(world):
    stream = world(events_stream_maxlen=100)
    publisher = stream.publisher("process-a")
    await publisher.start()
    for batch in range(6):
        await stream.outbox.record(new_events(100, f"bounded-{batch}"))
        await eventually(lambda: drained(stream.database), "published")
    rows = await all_rows(stream.database)
    entries = await stream.entries()
    # MAXLEN ~ trims whole macro nodes: at least 100 stay, and far fewer than the 600 appended.
    assert 100 <= len(entries) < 300, len(entries)
    assert [entry_id for entry_id, _ in entries] == [f"{row.seq}-0" for row in rows[-len(entries) :]]


async def test_a_backlog_older_than_maxlen_is_not_replayed_when_redis_comes(world):
    """Events kept while the service ran without Redis: only the newest MAXLEN go to the stream when it is
    configured (MAXLEN would trim the others at once); all are marked published; the log keeps them all."""
    stream = world(events_stream_maxlen=100)
    idle = stream.publisher("no-redis", redis=False)
    await idle.start()
    assert (await idle.state()).status == "disabled"
    assert (await message_queue_check(idle, 2.0)).status == "disabled"
    for batch in range(3):
        await stream.outbox.record(new_events(100, f"kept-{batch}"))
    assert await unpublished(stream.database) == 300  # without Redis nothing is published

    publisher = stream.publisher("with-redis")
    await publisher.start()
    await eventually(lambda: drained(stream.database), "caught up")
    rows = await all_rows(stream.database)
    await stream.assert_stream_holds(rows[-100:])


async def test_a_stream_of_another_event_log_stops_publishing_and_health_says_why(world):
    stream = world()
    await stream.reader.xadd(stream.stream, {"id": "evt_from_another_database"}, id="1000000-0")
    publisher = stream.publisher("process-a")
    await stream.outbox.record(new_events(3, "conflict"))
    assert await publisher.publish_pending() == 0
    assert await unpublished(stream.database) == 3  # nothing marked: nothing lost
    state = await publisher.state()
    assert state.status == "degraded" and "delete the key" in state.detail and stream.stream in state.detail
    check = await message_queue_check(publisher, 2.0)
    assert check.status == "degraded" and check.passed

    await stream.reader.delete(stream.stream)  # what the operator does
    assert await publisher.publish_pending() == 3
    await stream.assert_stream_holds(await all_rows(stream.database))
    assert (await publisher.state()).status == "healthy"


async def test_message_queue_states(world, private_redis):
    assert (await message_queue_check(None, 2.0)).status == "disabled"
    stream = world(private_redis.url)
    publisher = stream.publisher("process-a")
    await publisher.start()
    await stream.outbox.record(new_events(2, "health"))
    await eventually(lambda: drained(stream.database), "published")
    healthy = await message_queue_check(publisher, 2.0)
    assert healthy.status == "healthy" and healthy.error is None and not healthy.critical
    assert healthy.details["stream"] == stream.stream and healthy.details["backlog"] == 0
    assert healthy.details["stream_length"] == 2 and healthy.details["publishing"] is True
    assert healthy.details["last_published_at"].endswith("Z")
    private_redis.stop()
    down = await message_queue_check(publisher, 2.0)
    assert down.status == "unhealthy" and "Redis" in down.error and not down.critical


# --- /health of a running service ---------------------------------------------------------------------------


def message_queue(service) -> tuple[str, dict]:
    with httpx.Client(base_url=service.base_url) as client:
        health = client.get("/health").json()
        status = client.get("/health/status").json()
    return health["services"]["message_queue"], status["message_queue"]


@pytest.mark.slow
def test_health_reports_the_publisher_of_a_running_service(start_service, mlflow_server, private_redis):
    without = start_service(mlflow_url=mlflow_server.url)
    assert message_queue(without)[0] == "disabled"

    service = start_service(mlflow_url=mlflow_server.url, redis_url=private_redis.url, redis_retry_after="1")
    summary, detail = message_queue(service)
    assert summary == "healthy", detail
    assert detail["stream"].endswith(":events") and detail["backlog"] == 0
    private_redis.stop()
    deadline = time.monotonic() + DEADLINE_SECONDS
    while (summary := message_queue(service))[0] != "unhealthy":
        assert time.monotonic() < deadline, summary
        time.sleep(0.2)
    with httpx.Client(base_url=service.base_url) as client:
        assert client.get("/ready").status_code == 200  # not critical: the service still serves
        assert client.get("/health").json()["status"] == "degraded"


# --- hokusai events tail ------------------------------------------------------------------------------------


class TailProcess:
    """`hokusai events tail ...` with its output read line by line (by a thread per pipe, so a line already
    buffered is never waited for), each within a generous deadline."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hokusai.cli", "events", "tail", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: queue.Queue[str] = queue.Queue()
        self.stderr: queue.Queue[str] = queue.Queue()
        for pipe, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=self._pump, args=(pipe, lines), daemon=True).start()
        self.following = self._line(self.stderr)
        assert self.following.startswith("Following"), self.following

    @staticmethod
    def _pump(pipe: Any, lines: queue.Queue[str]) -> None:
        for line in pipe:
            lines.put(line.rstrip("\n"))
        lines.put("")  # the end of the output

    def _line(self, lines: queue.Queue[str]) -> str:
        try:
            line = lines.get(timeout=DEADLINE_SECONDS)
        except queue.Empty:
            raise AssertionError(f"no line within {DEADLINE_SECONDS}s") from None
        assert line, f"tail exited ({self.process.poll()}): {list(self.stderr.queue)}"
        return line

    def event(self) -> dict:
        return json.loads(self._line(self.stdout))

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(DEADLINE_SECONDS)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def test_events_tail_prints_each_matching_event_as_one_json_line(tmp_path, redis_url):
    home = tmp_path / "home"
    home.mkdir()
    settings = Settings(home=home)
    run_migrations(settings.database_dsn)
    database = Database(settings.async_database_dsn)
    stream = StreamWorld(database, redis_url)
    env = service_environment(
        HOKUSAI_HOME=str(home), HOKUSAI_REDIS_URL=redis_url, HOKUSAI_REDIS_PREFIX=stream.settings.redis_prefix
    )
    env["PYTHONUNBUFFERED"] = "1"
    publisher = stream.publisher("process-a")
    tail = TailProcess(env, "--type", "model_version.*", "--model", "followed")
    try:
        assert stream.stream in tail.following
        await stream.outbox.record(
            [
                NewEvent("registered_model.created", TEST_ACTOR, "followed"),  # another type
                NewEvent("model_version.created", TEST_ACTOR, "other", "1"),  # another model
                NewEvent("model_version.created", TEST_ACTOR, "followed", "1", payload={"source": "runs:/x"}),
            ]
        )
        assert await publisher.publish_pending() == 3
        shown = await asyncio.to_thread(tail.event)
        rows = await all_rows(database)
        assert shown["id"] == rows[2].id and shown["type"] == "model_version.created"
        assert shown["subject"] == {"model_name": "followed", "version": "1", "model_id": None}
        assert shown["payload"] == {"source": "runs:/x"} and shown["actor"]["name"] == "stream tests"
        assert tail.interrupt() == 0
        assert tail.stdout.get(timeout=DEADLINE_SECONDS) == ""  # nothing else was printed

        from_start = TailProcess(env, "--from-start")
        try:
            assert [(await asyncio.to_thread(from_start.event))["id"] for _ in rows] == [row.id for row in rows]
            assert from_start.interrupt() == 0
        finally:
            from_start.kill()
    finally:
        tail.kill()
        await stream.aclose()
        await database.dispose()


def test_tail_refuses_an_unknown_type_pattern(tmp_path, redis_url):
    env = service_environment(HOKUSAI_HOME=str(tmp_path), HOKUSAI_REDIS_URL=redis_url)
    result = subprocess.run(
        [sys.executable, "-m", "hokusai.cli", "events", "tail", "--type", "model_versoin.*"],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE_SECONDS,
    )
    assert result.returncode == 2 and "Unknown event type" in result.stderr, result.stderr
