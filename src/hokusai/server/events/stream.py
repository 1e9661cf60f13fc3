"""StreamPublisher: every event appended once, in `seq` order, to the Redis stream `<HOKUSAI_REDIS_PREFIX>events`.

Other services read the stream with consumer groups (XREADGROUP); `hokusai events tail` follows it. The outbox
table is the source: an event is written there unpublished (`published = false`) in the transaction that makes it,
and this publisher copies it to the stream, then marks it published.

Exactly once, in order:
- One process at a time publishes: the holder of the named lease "events-stream", renewed on every pass; a
  process that stops releases it, one that dies leaves it to expire (`lease_seconds`), then another takes over.
- Each event is appended with the explicit stream id `<seq>-0`. Redis refuses an id not greater than the stream's
  last one, so an event appended before a crash (or by a holder whose lease ran out while it was stalled) is never
  appended twice: the refusal, with the entry at that id carrying the same event id, means "already there", and
  the event is marked published.
- A batch is appended by one Lua script that stops at the first failure, so the stream never holds an event after
  one it is missing (which Redis would then refuse forever).

Redis failing is not an error here: the call goes through the service's Redis breaker, the events stay unpublished
in the database, and the next pass (woken by `wake()` or every `events_poll_seconds`) tries again. Nothing is lost.

Bounded: each XADD trims the stream with `MAXLEN ~ events_stream_maxlen`. A backlog longer than that (Redis down
for long, or Redis configured on a service that has been keeping events without it) is not replayed in full: only
the newest `events_stream_maxlen` unpublished events are appended, the older ones are marked published without
being appended (MAXLEN would have trimmed them at once anyway). Without Redis the publisher is idle and events stay
unpublished, so a service that gains Redis later fills its stream with its recent history. The complete log is
always `GET /api/v1/events`.

A stream that already holds a greater id than an event's seq, at another event (another database's events under
the same prefix, or a database recreated from scratch), is a conflict: publishing stops there, /health reports
`message_queue` degraded, and the operator deletes the stream key or sets HOKUSAI_REDIS_PREFIX.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import false, func, select, update

from hokusai.server.config import Settings
from hokusai.server.db import Database, utcnow
from hokusai.server.events.leases import NamedLease
from hokusai.server.events.models import EventRow
from hokusai.server.events.schemas import Event
from hokusai.server.redis_breaker import RedisBreaker

logger = logging.getLogger(__name__)

STREAM_KEY = "events"  # after the service's Redis prefix
LEASE_NAME = "events-stream"
# How long a publisher that died keeps the others waiting: at least this, and at least a few of the holder's passes
# (it renews the lease on each, every `events_poll_seconds`, and between the batches of a long catch-up).
MIN_LEASE_SECONDS = 10.0
LEASE_RENEWALS = 3
# Passes a new holder gets to catch up, beyond the lease, before a waiting event makes the backlog "not draining".
DRAIN_GRACE_POLLS = 5
# Events appended by one script call. At most a quarter of MAXLEN, so the entries a crashed holder appended but did
# not mark (at most a batch or two) are never trimmed before the next holder finds them there.
BATCH_SIZE = 200

StreamStatus = Literal["healthy", "degraded", "unhealthy", "disabled"]

# KEYS[1]: the stream. ARGV[1]: MAXLEN; then, per event: its stream id, its event id, the number of further
# arguments, those arguments (field, value, ...). Appends in order and stops at the first failure. Returns one
# outcome per event handled: "added", "duplicate" (Redis refused the id and the entry there is this event), then
# possibly "conflict:<the stream's last id>" or "error:<Redis's message>" for the event it stopped at.
APPEND_SCRIPT = """
local stream = KEYS[1]
local maxlen = ARGV[1]
local outcomes = {}
local i = 2
while i <= #ARGV do
  local stream_id, event_id, count = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local command = {'XADD', stream, 'MAXLEN', '~', maxlen, stream_id, 'id', event_id}
  for j = 1, count do command[#command + 1] = ARGV[i + 2 + j] end
  local added = redis.pcall(unpack(command))
  if type(added) == 'table' and added.err then
    if not string.find(added.err, 'equal or smaller', 1, true) then
      outcomes[#outcomes + 1] = 'error:' .. added.err
      return outcomes
    end
    local found = redis.call('XRANGE', stream, stream_id, stream_id)
    if #found == 1 and found[1][2][1] == 'id' and found[1][2][2] == event_id then
      outcomes[#outcomes + 1] = 'duplicate'
    else
      local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
      outcomes[#outcomes + 1] = 'conflict:' .. (top[1] and top[1][1] or '?')
      return outcomes
    end
  else
    outcomes[#outcomes + 1] = 'added'
  end
  i = i + 3 + count
end
return outcomes
"""


@dataclass(frozen=True)
class StreamState:
    """What /health reports as `message_queue` (and /health/status in full)."""

    status: StreamStatus
    stream: str | None  # the stream's key; None without Redis
    backlog: int | None  # events not yet in the stream (counted up to MAXLEN + 1); None without Redis
    last_published_at: datetime | None  # when this process last appended an event
    detail: str | None  # why it is not healthy, or what "disabled" means
    publishing: bool = False  # whether this process holds the lease (one process publishes at a time)
    stream_length: int | None = None
    last_stream_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        shown = asdict(self)
        if self.last_published_at is not None:
            shown["last_published_at"] = _iso(self.last_published_at)
        return shown


class StreamPublisher:
    def __init__(
        self,
        database: Database,
        redis: Redis | None,
        redis_breaker: RedisBreaker | None,
        settings: Settings,
        owner: str,
        lease_seconds: float | None = None,
    ) -> None:
        """`redis` None (no HOKUSAI_REDIS_URL): the publisher stays idle and reports "disabled". `owner`: this
        process's identity (`instance.instance_id()`), the holder name of the lease."""
        self._database = database
        self._redis = redis
        self._breaker = redis_breaker or RedisBreaker(settings.redis_failure_threshold, settings.redis_retry_after)
        self.stream = f"{settings.redis_key_prefix}{STREAM_KEY}"
        self.maxlen = settings.events_stream_maxlen
        self._poll_seconds = settings.events_poll_seconds
        self._batch_size = max(1, min(BATCH_SIZE, self.maxlen // 4))
        if lease_seconds is None:
            lease_seconds = max(MIN_LEASE_SECONDS, LEASE_RENEWALS * self._poll_seconds)
        # A backlog older than this is not draining: the lease is free again after a holder died, and taken at the
        # next poll.
        self._drain_grace = lease_seconds + DRAIN_GRACE_POLLS * self._poll_seconds
        self._lease = NamedLease(database, LEASE_NAME, owner, lease_seconds)
        self._append = redis.register_script(APPEND_SCRIPT) if redis is not None else None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        # Every event up to this seq is published (events commit in seq order and are published in that order):
        # the lower bound of the search for unpublished ones.
        self._published_through = 0
        self._holding = False
        self._problem: str | None = None  # the last failure to publish, until a pass succeeds
        self._conflict: str | None = None  # the stream holds another event log: publishing waits for the operator
        self.last_published_at: datetime | None = None

    @property
    def enabled(self) -> bool:
        return self._redis is not None

    async def start(self) -> None:
        if self._redis is None or self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name="events-stream")

    def wake(self) -> None:
        """Publish now (the outbox calls this, on the event loop, after a commit that appended events in this
        process; events other processes append are found by the next poll)."""
        self._wakeup.set()

    async def aclose(self) -> None:
        """Stop, and hand the lease on at once, so another process publishes without waiting for it to expire."""
        if self._task is None:
            return
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._holding:
            try:
                await self._lease.release()
            except Exception as exc:  # the database is going away too: the lease then simply expires
                logger.warning("Could not release the events-stream lease (%s); it expires on its own", exc)
            self._holding = False

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                self._holding = await self._lease.acquire()
                if self._holding:
                    await self.publish_pending()
            except Exception as exc:  # a database error must not end publishing: the next pass retries
                problem = f"publishing failed: {_describe(exc)}"
                if problem != self._problem:  # once per kind of failure, not on every pass
                    logger.exception("Events stream: publishing failed; retrying every %gs", self._poll_seconds)
                self._problem = problem
            with suppress(TimeoutError):
                async with asyncio.timeout(self._poll_seconds):
                    await self._wakeup.wait()

    async def publish_pending(self) -> int:
        """Append every unpublished event, in order, until none is left or Redis fails; returns how many were
        appended now. The caller holds the lease (the stream ids keep the stream right even when two run at once)."""
        if self._redis is None:
            return 0
        appended = 0
        while True:
            rows = await self._unpublished()
            if not rows:
                self._problem = self._conflict = None
                return appended
            if len(rows) == self._batch_size and await self._skip_beyond_maxlen():
                continue
            added, complete = await self._append_rows(rows)
            appended += added
            if not complete:
                return appended
            if len(rows) < self._batch_size:
                return appended
            if not await self._lease.acquire():  # renewed between batches of a long catch-up
                self._holding = False
                return appended

    async def _unpublished(self) -> list[EventRow]:
        statement = (
            select(EventRow)
            .where(EventRow.published == false(), EventRow.seq > self._published_through)
            .order_by(EventRow.seq)
            .limit(self._batch_size)
        )
        async with self._database.session() as session:
            return list((await session.execute(statement)).scalars())

    async def _skip_beyond_maxlen(self) -> int:
        """Mark published, without appending, the unpublished events older than the newest MAXLEN (the stream
        would trim them at once); returns how many. Seqs may have gaps (rolled-back inserts), so at most MAXLEN are
        left."""
        async with self._database.session() as session, session.begin():
            newest = (await session.execute(select(func.max(EventRow.seq)))).scalar() or 0
            cutoff = newest - self.maxlen
            if cutoff <= self._published_through:
                return 0
            skipped = (
                await session.execute(
                    update(EventRow)
                    .where(EventRow.published == false(), EventRow.seq <= cutoff)
                    .values(published=True)
                    .execution_options(synchronize_session=False)
                )
            ).rowcount
        self._published_through = max(self._published_through, cutoff)
        if skipped:
            logger.warning(
                "Events stream: %d unpublished events older than the newest %d were not appended to %s "
                "(beyond its MAXLEN; GET /api/v1/events keeps them)",
                skipped,
                self.maxlen,
                self.stream,
            )
        return skipped

    async def _append_rows(self, rows: list[EventRow]) -> tuple[int, bool]:
        """Append `rows` (through the breaker) and mark published those now in the stream. Returns how many were
        appended and whether all of them are in the stream."""
        assert self._append is not None
        if not self._breaker.allow():
            retry_in = self._breaker.seconds_until_retry
            self._problem = f"Redis skipped after repeated failures; retrying in {retry_in:.1f}s"
            return 0, False
        arguments: list[Any] = [self.maxlen]
        for row in rows:
            fields = stream_fields(row)
            event_id = fields.pop("id")
            flat = [part for pair in fields.items() for part in pair]
            arguments += [f"{row.seq}-0", event_id, len(flat), *flat]
        try:
            outcomes = [_text(outcome) for outcome in await self._append(keys=[self.stream], args=arguments)]
        except (RedisError, OSError) as exc:
            self._breaker.record_failure(exc)
            if self._problem is None:
                logger.warning("Events stream: Redis failed (%s); %d+ events wait in the database", exc, len(rows))
            self._problem = f"Redis failed: {_describe(exc)}"
            return 0, False
        self._breaker.record_success()
        in_stream = [row for row, outcome in zip(rows, outcomes, strict=False) if outcome in ("added", "duplicate")]
        await self._mark_published(in_stream)
        added = sum(1 for outcome in outcomes if outcome == "added")
        if added:
            self.last_published_at = utcnow()
        if len(in_stream) == len(rows):
            self._problem = self._conflict = None
            return added, True
        stopped_at = rows[len(in_stream)]
        failure = outcomes[len(in_stream)] if len(outcomes) > len(in_stream) else "error:no answer for it"
        kind, _, said = failure.partition(":")
        if kind == "conflict":
            problem = (
                f"the stream's last id is {said}, at another event than seq {stopped_at.seq} ({stopped_at.id}): it "
                "holds another event log (another database under this prefix, or a recreated one); delete the key "
                f"{self.stream} or set HOKUSAI_REDIS_PREFIX"
            )
        else:
            problem = f"Redis refused seq {stopped_at.seq}: {said}"
        if problem != self._problem:
            logger.error("Events stream: publishing stopped: %s", problem)
        self._problem = problem
        self._conflict = problem if kind == "conflict" else None
        return added, False

    async def _mark_published(self, rows: list[EventRow]) -> None:
        if not rows:
            return
        async with self._database.session() as session, session.begin():
            await session.execute(
                update(EventRow)
                .where(EventRow.seq.in_([row.seq for row in rows]))
                .values(published=True)
                .execution_options(synchronize_session=False)
            )
        self._published_through = max(self._published_through, rows[-1].seq)

    async def state(self) -> StreamState:
        """The publisher as /health sees it: the stream's reachability (one call, through the breaker), the
        backlog in the database (shared by every process, whichever holds the lease) and how old it is."""
        if self._redis is None:
            return StreamState(
                "disabled",
                None,
                None,
                None,
                "HOKUSAI_REDIS_URL is not set: events are kept in the database (GET /api/v1/events) only",
            )
        backlog, oldest = await self._backlog()
        base = {
            "stream": self.stream,
            "backlog": backlog,
            "last_published_at": self.last_published_at,
            "publishing": self._holding,
        }
        waiting = f"{backlog} event(s) wait in the database and are appended when it answers"
        if not self._breaker.allow():
            detail = f"Redis is skipped after repeated failures: {waiting}"
            return StreamState("unhealthy", detail=detail, **base)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xlen(self.stream)
                pipe.xrevrange(self.stream, count=1)
                length, top = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._breaker.record_failure(exc)
            return StreamState("unhealthy", detail=f"Redis failed ({_describe(exc)}): {waiting}", **base)
        self._breaker.record_success()
        base |= {"stream_length": int(length), "last_stream_id": _text(top[0][0]) if top else None}
        if self._conflict is not None:
            return StreamState("degraded", detail=self._conflict, **base)
        if backlog == 0 or oldest is None:
            return StreamState("healthy", detail=None, **base)
        age = (utcnow() - oldest).total_seconds()
        if age <= self._drain_grace:
            return StreamState("healthy", detail=None, **base)
        detail = f"{backlog} event(s) not yet appended, the oldest {age:.0f}s ago"
        if self._problem is not None:
            detail += f" ({self._problem})"
        return StreamState("degraded", detail=detail, **base)

    async def _backlog(self) -> tuple[int, datetime | None]:
        unpublished = select(EventRow.seq, EventRow.occurred_at).where(EventRow.published == false())
        bounded = unpublished.order_by(EventRow.seq).limit(self.maxlen + 1).subquery()
        async with self._database.session() as session:
            count, oldest = (
                await session.execute(select(func.count(), func.min(bounded.c.occurred_at)).select_from(bounded))
            ).one()
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        return int(count), oldest


def stream_fields(row: EventRow) -> dict[str, str]:
    """The fields of an event's stream entry: a few to filter on without parsing, and `event`, the whole Event as
    the API shows it (JSON). Redis has no null: a missing model or version is ""."""
    event = Event.of(row)
    return {
        "id": row.id,
        "seq": str(row.seq),
        "type": row.type,
        "model": row.model_name or "",
        "version": row.version or "",
        "occurred_at": event.occurred_at,
        "event": event.model_dump_json(),
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _describe(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:300]
