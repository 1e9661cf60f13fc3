"""The webhook dispatcher: one background loop per service process delivers pending deliveries.

Claiming. A delivery is claimable when it is pending and due, its lease is free or expired, its webhook is enabled,
and no delivery of the same webhook and lane (the event's model) with a smaller `event_seq` is still pending. The
last condition keeps the order per model: only the head of each lane is ever in flight, and the one behind it waits
until the head is delivered (or dead), through its retries. Models are independent lanes, so one failing receiver
path for one model does not hold back the others.

A process claims by writing its lease (`lease_owner`, `lease_expires_at`): on PostgreSQL the candidates are selected
`FOR UPDATE SKIP LOCKED` and updated in the same transaction, so N processes never take the same row and never wait
for each other; SQLite (one host, one writer at a time) claims with one conditional UPDATE. The process renews the
leases of what it has in flight every third of a lease, and every write after the claim is fenced: it applies only
while `lease_owner` is still this process. A process that dies mid-delivery leaves a lease that runs out, and the
next claim (another process, or this one after a restart) sends the delivery again: delivery is at-least-once, and
receivers deduplicate by `webhook-id` (the event id, the same on every attempt).

Attempts. A 2xx answer delivers. Anything else (another status, a timeout, a connection error, a redirect, which is
not followed) fails the attempt: the next is scheduled `webhook_retry_delays[attempts - 1]` seconds later with ±20%
jitter (so receivers coming back are not hit by every sender at once), and once the schedule is exhausted the
delivery is dead. When a lane's head goes dead, the deliveries queued behind it in that lane go dead with it: they
waited the whole schedule behind a receiver that never answered, and sending them now would deliver them out of
order after a gap. Each can be redelivered (POST .../redeliver), in order.

Everything here runs in the background with at most `webhook_concurrency` deliveries in flight and a timeout on each,
so a slow or dead receiver costs the API nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from yarl import URL

from hokusai import __version__
from hokusai.server.config import Settings
from hokusai.server.db import Database, utcnow
from hokusai.server.events.models import EventRow
from hokusai.server.events.schemas import Event, webhook_body
from hokusai.server.webhooks.addresses import (
    ALLOW_PRIVATE_HINT,
    PublicAddressResolver,
    described,
    literal_address,
    non_public_kind,
)
from hokusai.server.webhooks.metrics import WEBHOOK_ATTEMPT_DURATION, count_outcome
from hokusai.server.webhooks.models import DeliveryRow, WebhookRow
from hokusai.server.webhooks.signing import signed_headers

logger = logging.getLogger(__name__)

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
MAX_RESPONSE_BYTES = 4096  # of a receiver's answer: enough for an error message, never its whole body
MAX_ERROR_CHARS = 300
JITTER = (0.8, 1.2)
SHUTDOWN_GRACE_SECONDS = 5.0  # what aclose gives in-flight deliveries before it gives their leases back
USER_AGENT = f"Hokusai-Webhooks/{__version__}"
NO_SYNC = {"synchronize_session": False}  # these sessions hold no loaded rows to keep in step
_jitter = secrets.SystemRandom()


@dataclass(frozen=True)
class SendResult:
    """One attempt: delivered (2xx) or not, the status (None when no answer came), time taken, what went wrong."""

    success: bool
    status_code: int | None
    latency_ms: float
    error: str | None


@dataclass(frozen=True)
class ClaimedDelivery:
    id: int
    webhook_id: str
    event_seq: int
    lane: str
    attempts: int  # made before this one
    url: str
    secret: str
    event_id: str
    body: bytes | None  # None: the event is no longer in the log


@dataclass
class _Outcome:
    claimed: ClaimedDelivery
    result: SendResult
    give_up: bool
    done: asyncio.Future[None]
    retry_in: float | None = None


def event_body(event: EventRow) -> bytes:
    """The JSON body of a delivery, compact and ASCII-only (the bytes are the same however a receiver decodes
    them); signed exactly as sent."""
    return json.dumps(webhook_body(Event.of(event)), separators=(",", ":")).encode("ascii")


def _body_of(event: EventRow, bodies: dict[int, bytes]) -> bytes:
    if event.seq not in bodies:
        bodies[event.seq] = event_body(event)
    return bodies[event.seq]


def short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


class WebhookDispatcher:
    """Claims due deliveries (leases), sends them signed, records each outcome; `wake()` after new deliveries."""

    def __init__(self, database: Database, settings: Settings, owner: str) -> None:
        self._database = database
        self._settings = settings
        self.owner = owner
        self._postgres = database.engine.dialect.name == "postgresql"
        self._delays = settings.webhook_retry_delays
        self._woken = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._in_flight: dict[int, asyncio.Task] = {}
        self._session: aiohttp.ClientSession | None = None
        self._resolver: PublicAddressResolver | None = None
        self._last_renewal = 0.0
        self._closing = False
        self._sqlite_writes = asyncio.Lock()
        self._outcomes: list[_Outcome] = []
        self._recorder: asyncio.Task | None = None

    # Life cycle

    async def start(self) -> None:
        self._client()
        self._loop_task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    def wake(self) -> None:
        """Look for due deliveries now (called after each commit that made some, and when a retry falls due)."""
        self._woken.set()

    async def aclose(self) -> None:
        """Stop claiming; give in-flight deliveries a few seconds; give the leases of the rest back, so another
        process sends them at once (the interrupted attempt is not counted)."""
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._in_flight:
            await asyncio.wait(list(self._in_flight.values()), timeout=SHUTDOWN_GRACE_SECONDS)
        unfinished = {delivery_id: task for delivery_id, task in self._in_flight.items() if not task.done()}
        for task in unfinished.values():
            task.cancel()
        await asyncio.gather(*unfinished.values(), return_exceptions=True)
        if self._recorder is not None:  # outcomes already sent are written before the database goes
            await asyncio.wait([self._recorder], timeout=SHUTDOWN_GRACE_SECONDS)
        if unfinished:
            try:
                await self._release(list(unfinished))
            except Exception:  # the database is away at shutdown: the leases run out instead
                logger.warning("Webhooks: could not release %d leases at shutdown", len(unfinished), exc_info=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    def _client(self) -> aiohttp.ClientSession:
        """One pooled session for every delivery and test; its resolver refuses non-public addresses."""
        if self._session is None:
            resolver = None
            if not self._settings.webhook_allow_private:
                resolver = self._resolver = PublicAddressResolver()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=resolver),
                timeout=aiohttp.ClientTimeout(total=self._settings.webhook_timeout),
                headers={"User-Agent": USER_AGENT},
            )
        return self._session

    # Sending

    async def send(self, url: str, secret: str, message_id: str, body: bytes) -> SendResult:
        """POST one signed body to `url`; never raises for what the receiver or the network does."""
        if not self._settings.webhook_allow_private:
            host = URL(url).raw_host or ""
            address = literal_address(host)
            if address is not None and (kind := non_public_kind(address)) is not None:
                return SendResult(False, None, 0.0, f"Refused: {address} is {described(kind)}; {ALLOW_PRIVATE_HINT}")
        headers = {**signed_headers(secret, message_id, body), "Content-Type": "application/json"}
        started = time.monotonic()
        status, error = None, None
        try:
            async with self._client().post(url, data=body, headers=headers, allow_redirects=False) as response:
                status = response.status
                answer = await response.content.read(MAX_RESPONSE_BYTES)
                if not 200 <= status < 300:
                    text = answer.decode("utf-8", "replace").strip()
                    error = short(f"HTTP {status}" + (f": {text}" if text else ""))
        except TimeoutError:
            error = f"Timed out after {self._settings.webhook_timeout:g} s"
        except aiohttp.ClientError as exc:
            error = short(f"{type(exc).__name__}: {exc}")
        elapsed = time.monotonic() - started
        WEBHOOK_ATTEMPT_DURATION.observe(elapsed)
        success = error is None and status is not None
        return SendResult(success, status, round(elapsed * 1000, 1), error)

    # The loop

    async def _run(self) -> None:
        poll = self._settings.events_poll_seconds
        renew_every = self._settings.webhook_lease_seconds / 3
        while True:
            self._woken.clear()
            try:
                if self._in_flight and time.monotonic() - self._last_renewal >= renew_every:
                    await self._renew()
                await self._fill()
            except Exception:  # the database is away: logged; the next round tries again
                logger.exception("Webhook dispatcher round failed")
            wait = min(poll, renew_every) if self._in_flight else poll
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._woken.wait()

    async def _fill(self) -> None:
        """Claim as many due deliveries as there is room for, and start them."""
        room = self._settings.webhook_concurrency - len(self._in_flight)
        if room <= 0 or self._closing:
            return
        claimed_all = await self._claim(room)
        if claimed_all and not self._in_flight:
            self._last_renewal = time.monotonic()  # every lease in flight is fresh: the renewal clock starts now
        for claimed in claimed_all:
            task = asyncio.create_task(self._deliver(claimed), name=f"webhook-delivery-{claimed.id}")
            self._in_flight[claimed.id] = task
            task.add_done_callback(lambda _, delivery_id=claimed.id: self._finished(delivery_id))

    def _finished(self, delivery_id: int) -> None:
        self._in_flight.pop(delivery_id, None)
        if not self._closing:
            self.wake()  # room is free, and the next delivery of its lane may be due

    async def _deliver(self, claimed: ClaimedDelivery) -> None:
        try:
            if claimed.body is None:
                result = SendResult(False, None, 0.0, f"Event {claimed.event_id} is no longer in the event log")
                await self._record(claimed, result, give_up=True)
                return
            result = await self.send(claimed.url, claimed.secret, claimed.event_id, claimed.body)
            await self._record(claimed, result)
        except Exception:  # the lease runs out and the delivery is tried again
            logger.exception("Webhook delivery %s could not be recorded", claimed.id)

    # The database

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncSession]:
        """A write transaction. On SQLite this process's writes take turns here: SQLite has one writer at a time,
        and connections that wait for it inside SQLite poll with growing sleeps, which made each write of a burst
        of deliveries cost tens of milliseconds."""
        async with contextlib.AsyncExitStack() as stack:
            if not self._postgres:
                await stack.enter_async_context(self._sqlite_writes)
            session = await stack.enter_async_context(self._database.session())
            await stack.enter_async_context(session.begin())
            yield session

    def _now(self) -> Any:
        return func.now() if self._postgres else utcnow()

    def _claimable(self, room: int) -> Select:
        """Due lane heads, oldest first. A lane's head is its pending delivery with the smallest `event_seq`: found
        by grouping the pending deliveries (the `status, next_attempt_at` index finds them), so the cost follows
        the backlog, not the history of delivered rows, which only grows."""
        now = self._now()
        heads = (
            select(
                DeliveryRow.webhook_id.label("webhook_id"),
                DeliveryRow.lane.label("lane"),
                func.min(DeliveryRow.event_seq).label("event_seq"),
            )
            .where(DeliveryRow.status == PENDING)
            .group_by(DeliveryRow.webhook_id, DeliveryRow.lane)
            .subquery("lane_heads")
        )
        return (
            select(DeliveryRow.id)
            .join(
                heads,
                and_(
                    heads.c.webhook_id == DeliveryRow.webhook_id,
                    heads.c.lane == DeliveryRow.lane,
                    heads.c.event_seq == DeliveryRow.event_seq,
                ),
            )
            .where(
                DeliveryRow.status == PENDING,
                DeliveryRow.next_attempt_at <= now,
                or_(DeliveryRow.lease_expires_at.is_(None), DeliveryRow.lease_expires_at < now),
                DeliveryRow.webhook_id.in_(select(WebhookRow.id).where(WebhookRow.enabled.is_(True))),
            )
            .order_by(DeliveryRow.event_seq, DeliveryRow.id)
            .limit(room)
        )

    def _lease(self) -> dict[str, Any]:
        return {
            "lease_owner": self.owner,
            "lease_expires_at": self._now() + timedelta(seconds=self._settings.webhook_lease_seconds),
        }

    async def _anything_due(self) -> bool:
        """A read first: most polls find nothing, and on SQLite a claim takes the one write lock even then."""
        now = self._now()
        due = (
            select(DeliveryRow.id)
            .where(DeliveryRow.status == PENDING, DeliveryRow.next_attempt_at <= now)
            .where(or_(DeliveryRow.lease_expires_at.is_(None), DeliveryRow.lease_expires_at < now))
            .limit(1)
        )
        async with self._database.session() as session:
            return (await session.execute(due)).first() is not None

    async def _claim(self, room: int) -> list[ClaimedDelivery]:
        if not await self._anything_due():
            return []
        async with self._writing() as session:
            if self._postgres:
                # Rows another process is claiming are skipped, not waited for: it is taking them.
                candidates = self._claimable(room).with_for_update(skip_locked=True, of=DeliveryRow)
                ids = list((await session.execute(candidates)).scalars())
                if ids:
                    await session.execute(
                        update(DeliveryRow).where(DeliveryRow.id.in_(ids)).values(**self._lease()),
                        execution_options=NO_SYNC,
                    )
            else:
                # One statement: SQLite runs one writer at a time, so the choice and the claim cannot interleave
                # with another process's.
                claimed = await session.execute(
                    update(DeliveryRow)
                    .where(DeliveryRow.id.in_(self._claimable(room).correlate(None)))
                    .values(**self._lease())
                    .returning(DeliveryRow.id),
                    execution_options=NO_SYNC,
                )
                ids = list(claimed.scalars())
            if not ids:
                return []
            return await self._load(session, ids)

    async def _load(self, session: AsyncSession, ids: list[int]) -> list[ClaimedDelivery]:
        rows = await session.execute(
            select(DeliveryRow, WebhookRow.url, WebhookRow.secret, EventRow)
            .join(WebhookRow, WebhookRow.id == DeliveryRow.webhook_id)
            .outerjoin(EventRow, EventRow.seq == DeliveryRow.event_seq)
            .where(DeliveryRow.id.in_(ids))
            .order_by(DeliveryRow.event_seq)
        )
        bodies: dict[int, bytes] = {}  # an event claimed for several webhooks is serialized once
        return [
            ClaimedDelivery(
                id=delivery.id,
                webhook_id=delivery.webhook_id,
                event_seq=delivery.event_seq,
                lane=delivery.lane,
                attempts=delivery.attempts,
                url=url,
                secret=secret,
                event_id=delivery.event_id,
                body=_body_of(event, bodies) if event is not None else None,
            )
            for delivery, url, secret, event in rows.all()
        ]

    def _mine(self, delivery_id: int) -> Any:
        """The fence of every write after the claim: still pending, still leased by this process."""
        return and_(DeliveryRow.id == delivery_id, DeliveryRow.lease_owner == self.owner, DeliveryRow.status == PENDING)

    async def _record(self, claimed: ClaimedDelivery, result: SendResult, give_up: bool = False) -> None:
        """Record an attempt's outcome; attempts finishing together share one transaction (a group commit: on
        SQLite a burst of deliveries would otherwise take the one write lock once each, against the requests)."""
        done = asyncio.get_running_loop().create_future()
        self._outcomes.append(_Outcome(claimed, result, give_up, done))
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record_outcomes(), name="webhook-outcomes")
        await done

    async def _record_outcomes(self) -> None:
        while self._outcomes:
            batch, self._outcomes = self._outcomes, []
            try:
                async with self._writing() as session:
                    written = [await self._write_outcome(session, outcome) for outcome in batch]
            except Exception as exc:  # the attempts stay leased: their leases run out and they are tried again
                for outcome in batch:
                    if not outcome.done.done():
                        outcome.done.set_exception(exc)
                continue
            for outcome, behind in zip(batch, written, strict=True):
                if behind is not None:
                    self._after_commit(outcome, behind)
                outcome.done.set_result(None)

    def _values(self, outcome: _Outcome) -> tuple[dict[str, Any], float | None]:
        """The row's new values, and seconds until the retry (None: delivered or dead)."""
        claimed, result = outcome.claimed, outcome.result
        attempts = claimed.attempts + 1
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_status_code": result.status_code,
            "last_error": result.error,
            "last_latency_ms": result.latency_ms,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        retry_in = None
        if result.success:
            values.update(status=DELIVERED, delivered_at=utcnow())
        elif outcome.give_up or attempts > len(self._delays):
            values.update(status=DEAD)
        else:
            retry_in = self._delays[attempts - 1] * _jitter.uniform(*JITTER)
            values.update(next_attempt_at=self._now() + timedelta(seconds=retry_in))
        return values, retry_in

    async def _write_outcome(self, session: AsyncSession, outcome: _Outcome) -> int | None:
        """The fenced write of one outcome; how many deliveries went dead behind it (None: not this process's to
        record any more)."""
        claimed = outcome.claimed
        values, outcome.retry_in = self._values(outcome)
        written = await session.execute(
            update(DeliveryRow).where(self._mine(claimed.id)).values(**values), execution_options=NO_SYNC
        )
        if written.rowcount != 1:
            # Another process took it after this one's lease ran out (or the webhook was deleted): its outcome is
            # that process's to record.
            logger.warning(
                "Webhook delivery %s was taken over or deleted; this attempt's outcome is not recorded", claimed.id
            )
            return None
        if values.get("status") == DEAD:
            return await self._dead_letter_lane(session, claimed)
        return 0

    def _after_commit(self, outcome: _Outcome, behind: int) -> None:
        claimed, result = outcome.claimed, outcome.result
        if result.success:
            count_outcome("delivered")
        elif outcome.retry_in is not None:
            count_outcome("failed")
            asyncio.get_running_loop().call_later(outcome.retry_in, self.wake)
        else:
            count_outcome("dead", 1 + behind)
            logger.warning(
                "Webhook delivery %s (event %s, webhook %s) dead after %d attempts: %s (%d queued behind it too)",
                claimed.id,
                claimed.event_id,
                claimed.webhook_id,
                claimed.attempts + 1,
                result.error,
                behind,
            )

    async def _dead_letter_lane(self, session: AsyncSession, head: ClaimedDelivery) -> int:
        """The pending deliveries queued behind a dead head in its lane go dead too (see the module docstring)."""
        result = await session.execute(
            update(DeliveryRow)
            .where(
                DeliveryRow.webhook_id == head.webhook_id,
                DeliveryRow.lane == head.lane,
                DeliveryRow.status == PENDING,
                DeliveryRow.event_seq > head.event_seq,
            )
            .values(
                status=DEAD,
                last_error=f"Not sent: delivery {head.id} ahead of it for this model was dead-lettered",
                lease_owner=None,
                lease_expires_at=None,
            ),
            execution_options=NO_SYNC,
        )
        return result.rowcount

    async def _renew(self) -> None:
        """Extend the leases of the deliveries in flight (a receiver may take up to the timeout)."""
        ids = list(self._in_flight)
        self._last_renewal = time.monotonic()
        async with self._writing() as session:
            await session.execute(
                update(DeliveryRow)
                .where(DeliveryRow.id.in_(ids), DeliveryRow.lease_owner == self.owner, DeliveryRow.status == PENDING)
                .values(**self._lease()),
                execution_options=NO_SYNC,
            )

    async def _release(self, ids: list[int]) -> None:
        async with self._writing() as session:
            await session.execute(
                update(DeliveryRow)
                .where(DeliveryRow.id.in_(ids), DeliveryRow.lease_owner == self.owner, DeliveryRow.status == PENDING)
                .values(lease_owner=None, lease_expires_at=None),
                execution_options=NO_SYNC,
            )
