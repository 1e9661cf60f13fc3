"""Webhooks: subscriptions over HTTP, and deliveries signed (Standard Webhooks), retried, dead-lettered, redelivered,
in order per model, exactly once per event across dispatchers, and not lost when a dispatcher dies mid-delivery.

A receiver in this module (a threaded HTTP server) verifies EVERY delivery it gets with the independent
`standardwebhooks` package. The delivery tests drive the real WebhookDispatcher on real databases (SQLite and the
machine's PostgreSQL); events are written with the real outbox, which makes the deliveries as the registry does.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select
from standardwebhooks import Webhook as StandardWebhook
from standardwebhooks import WebhookVerificationError

from hokusai.server.config import Settings
from hokusai.server.db import Database, utcnow
from hokusai.server.errors import InvalidRequest
from hokusai.server.events import types
from hokusai.server.events.models import EventRow
from hokusai.server.events.outbox import Actor, EventOutbox, NewEvent
from hokusai.server.webhooks.addresses import literal_address, non_public_kind
from hokusai.server.webhooks.dispatch import WebhookDispatcher
from hokusai.server.webhooks.models import DeliveryRow, WebhookRow
from hokusai.server.webhooks.service import WebhookService
from hokusai.server.webhooks.signing import new_secret, secret_key, sign
from tests.support import eventually
from tests.webhook_receiver import Arrival, Receiver

pytestmark = pytest.mark.anyio

WEBHOOKS = "/api/v1/webhooks"
PATIENCE = 120.0  # seconds a poll waits before the test fails instead of hanging (not a timing assertion)
FAST_RETRIES = "0.2,0.2,0.2,0.2"  # five attempts, then dead
TEST_ACTOR = Actor("service", "webhook tests")


@pytest.fixture
def receiver() -> Any:
    server = Receiver()
    yield server
    server.stop()
    assert not server.forged, f"deliveries that did not verify: {server.forged}"


# Helpers


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values = {
        "webhook_allow_private": True,
        "webhook_retry_schedule": FAST_RETRIES,
        "events_poll_seconds": 0.2,
        **overrides,
    }
    return Settings(home=tmp_path, **values)


@asynccontextmanager
async def dispatching(database: Database, settings: Settings, owner: str = "test-process") -> AsyncIterator[Any]:
    """A started dispatcher (as every service process runs one), closed at the end of the block."""
    dispatcher = WebhookDispatcher(database, settings, owner=owner)
    await dispatcher.start()
    try:
        yield dispatcher
    finally:
        await dispatcher.aclose()


async def subscribe(
    service: WebhookService, receiver: Receiver, path: str, event_types: list[str] | None = None, **options: Any
) -> WebhookRow:
    row, secret = await service.create(receiver.url(path), event_types or ["*"], **options)
    receiver.secrets[path] = secret
    return row


async def record(outbox: EventOutbox, model: str | None, *kinds: str) -> list[EventRow]:
    """One event per kind, of `model`, in one transaction (so in this order)."""
    events = [
        NewEvent(kind, TEST_ACTOR, model, version=str(number), payload={"number": number})
        for number, kind in enumerate(kinds, 1)
    ]
    return await outbox.record(events)


async def deliveries(service: WebhookService, webhook_id: str, status: str | None = None) -> list[DeliveryRow]:
    views, _ = await service.deliveries(webhook_id, status, 500, None)
    return [view.row for view in views]


def all_settled(service: WebhookService, webhook_id: str, count: int) -> Callable[[], Any]:
    async def check() -> list[DeliveryRow] | None:
        rows = await deliveries(service, webhook_id)
        done = [row for row in rows if row.status != "pending"]
        return rows if len(rows) == count and len(done) == count else None

    return check


def counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("webhook_deliveries_total", {"outcome": outcome}) or 0.0


# Signatures and addresses


def test_signature_is_what_standard_webhooks_verifies() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and 24 <= len(secret_key(secret)) <= 64
    body = b'{"type":"model_version.created"}'
    now = int(time.time())
    headers = {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret, "evt_1", now, body),
    }
    assert StandardWebhook(secret).verify(body, headers) == {"type": "model_version.created"}
    with pytest.raises(WebhookVerificationError):
        StandardWebhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        StandardWebhook(secret).verify(body + b" ", headers)


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("172.16.5.4", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-public"),
        ("93.184.215.14", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_kinds(host: str, kind: str | None) -> None:
    address = literal_address(host)
    assert address is not None
    assert non_public_kind(address) == kind


async def test_private_destinations_are_refused_unless_allowed(database: Database, tmp_path: Path) -> None:
    strict = settings_for(tmp_path, webhook_allow_private=False)
    async with dispatching(database, strict) as dispatcher:
        service = WebhookService(database, strict, dispatcher)
        for url in (
            "http://127.0.0.1:9/hook",
            "http://localhost:9/hook",
            "http://10.0.0.7/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:127.0.0.1]/hook",
            "http://[::1]:8080/hook",
        ):
            with pytest.raises(InvalidRequest, match="public addresses only") as refused:
                await service.create(url, ["*"])
            assert "HOKUSAI_WEBHOOK_ALLOW_PRIVATE" in refused.value.detail
        # A public IP literal needs no resolution and is taken.
        row, _ = await service.create("https://93.184.215.14/hook", ["*"])
        assert row.url == "https://93.184.215.14/hook"
        for url, why in (
            ("ftp://example.com/hook", "http:// or https://"),
            ("https://user:pass@93.184.215.14/hook", "credentials"),
            ("not a url", "spaces"),
            ("https:///hook", "host"),
        ):
            with pytest.raises(InvalidRequest, match=why):
                await service.create(url, ["*"])
    relaxed = settings_for(tmp_path)
    async with dispatching(database, relaxed) as dispatcher:
        row, _ = await WebhookService(database, relaxed, dispatcher).create("http://localhost:9/hook", ["*"])
        assert row.url == "http://localhost:9/hook"


async def test_connections_to_private_addresses_are_refused_at_connect_time(
    database: Database, tmp_path: Path, receiver: Receiver
) -> None:
    """A name that resolves to a private address when the delivery is made (DNS rebinding: it resolved to a public
    one when the webhook was saved) is refused by the dispatcher's resolver; so is an IP literal."""
    port = receiver.server.server_address[1]
    async with dispatching(database, settings_for(tmp_path, webhook_allow_private=False)) as dispatcher:
        for url in (f"http://localhost:{port}/rebound", f"http://127.0.0.1:{port}/rebound"):
            result = await dispatcher.send(url, new_secret(), "evt_rebound", b"{}")
            assert not result.success and result.status_code is None
            assert "non-public" in result.error or "loopback" in result.error, result.error
    assert receiver.arrivals == [] and receiver.forged == []


# Deliveries


async def test_events_are_delivered_signed_to_the_webhooks_whose_filters_match(
    database: Database, tmp_path: Path, receiver: Receiver
) -> None:
    settings = settings_for(tmp_path)
    outbox = EventOutbox(database)
    async with dispatching(database, settings) as dispatcher:
        outbox.add_listener(dispatcher.wake)
        service = WebhookService(database, settings, dispatcher)
        everything = await subscribe(service, receiver, "all")
        versions_of_m1 = await subscribe(service, receiver, "m1-versions", ["model_version.*"], model_names=["m1"])
        created = await subscribe(service, receiver, "created", [types.REGISTERED_MODEL_CREATED])
        idle = await subscribe(service, receiver, "idle", ["*"], enabled=False)

        rows = await record(
            outbox, "m1", types.REGISTERED_MODEL_CREATED, types.VERSION_CREATED, types.EVALUATION_COMPLETED
        )
        rows += await record(outbox, "m2", types.VERSION_CREATED)
        await eventually(all_settled(service, everything.id, 4), "the four events delivered to 'all'")
        await eventually(all_settled(service, versions_of_m1.id, 1), "m1's version event delivered")
        await eventually(all_settled(service, created.id, 1), "the creation delivered")

    # Each model's events in order; the models are independent lanes.
    assert [a.event_id for a in receiver.at("all") if a.model == "m1"] == [row.id for row in rows[:3]]
    assert sorted(a.event_id for a in receiver.at("all")) == sorted(row.id for row in rows)
    assert [a.payload["type"] for a in receiver.at("m1-versions")] == [types.VERSION_CREATED]
    assert [a.model for a in receiver.at("m1-versions")] == ["m1"]
    assert [a.payload["type"] for a in receiver.at("created")] == [types.REGISTERED_MODEL_CREATED]
    assert receiver.at("idle") == [] and await deliveries(service, idle.id) == []

    # m1's first event (m2's, in a lane of its own, may have arrived before it)
    first = next(arrival for arrival in receiver.at("all") if arrival.event_id == rows[0].id)
    # The Standard Webhooks body: type, timestamp, data (the event as GET /api/v1/events shows it).
    assert first.payload["type"] == types.REGISTERED_MODEL_CREATED
    assert first.payload["data"]["id"] == first.event_id == rows[0].id
    assert first.payload["data"]["actor"] == {"kind": "service", "name": "webhook tests", "key_id": None}
    assert first.payload["data"]["subject"]["model_name"] == "m1" and first.payload["data"]["seq"] == rows[0].seq
    assert first.headers["content-type"] == "application/json"
    assert abs(int(first.headers["webhook-timestamp"]) - time.time()) < 300
    assert first.body == json.dumps(first.payload, separators=(",", ":")).encode()  # compact JSON, signed as sent
    for row in await deliveries(service, everything.id):
        assert row.status == "delivered" and row.attempts == 1 and row.last_status_code == 200
        assert row.delivered_at is not None and row.last_latency_ms is not None and row.last_error is None
        assert row.lease_owner is None


async def test_a_receiver_failing_three_times_gets_the_event_four_times(
    database: Database, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.respond = lambda arrival, nth: 500 if nth <= 3 else 204
    settings = settings_for(tmp_path)
    outbox = EventOutbox(database)
    failed_before, delivered_before = counted("failed"), counted("delivered")
    async with dispatching(database, settings) as dispatcher:
        outbox.add_listener(dispatcher.wake)
        service = WebhookService(database, settings, dispatcher)
        webhook = await subscribe(service, receiver, "flaky")
        [event] = await record(outbox, "flaky-model", types.VERSION_CREATED)
        [delivery] = await eventually(all_settled(service, webhook.id, 1), "the delivery settled")
        await asyncio.sleep(2 * settings.events_poll_seconds)  # a few more rounds: nothing else is sent

    assert [a.status for a in receiver.at("flaky")] == [500, 500, 500, 204]
    assert {a.event_id for a in receiver.at("flaky")} == {event.id}  # one webhook-id on every attempt
    assert delivery.status == "delivered" and delivery.attempts == 4
    assert delivery.last_status_code == 204 and delivery.last_error is None
    # At least: another service of this pytest process may be delivering too (the counters are process-wide).
    assert counted("failed") - failed_before >= 3 and counted("delivered") - delivered_before >= 1


async def test_a_receiver_down_for_the_whole_schedule_dead_letters_then_redelivery_succeeds(
    database: Database, tmp_path: Path, receiver: Receiver
) -> None:
    down = {"value": True}
    receiver.respond = lambda arrival, nth: 503 if down["value"] and arrival.model == "down-model" else 200
    settings = settings_for(tmp_path)
    outbox = EventOutbox(database)
    async with dispatching(database, settings) as dispatcher:
        outbox.add_listener(dispatcher.wake)
        service = WebhookService(database, settings, dispatcher)
        webhook = await subscribe(service, receiver, "down")
        # Three events of the failing model in one go: the first is the lane's head, the two others queue behind.
        head, second, third = await record(
            outbox, "down-model", types.VERSION_CREATED, types.VERSION_UPDATED, types.VERSION_STAGE_CHANGED
        )
        [other] = await record(outbox, "healthy-model", types.VERSION_CREATED)
        settled = await eventually(all_settled(service, webhook.id, 4), "every delivery settled")
        by_event = {row.event_id: row for row in settled}

        attempts = len(settings.webhook_retry_delays) + 1
        dead = by_event[head.id]
        assert dead.status == "dead" and dead.attempts == attempts and dead.last_status_code == 503
        assert dead.last_error.startswith("HTTP 503")
        assert [a.event_id for a in receiver.at("down") if a.model == "down-model"] == [head.id] * attempts
        for queued in (second, third):  # never sent: they waited behind the head the whole schedule
            row = by_event[queued.id]
            assert row.status == "dead" and row.attempts == 0 and f"delivery {dead.id}" in row.last_error
        assert by_event[other.id].status == "delivered"  # another model's lane is not held back

        down["value"] = False
        again = [await service.redeliver(webhook.id, by_event[event.id].id) for event in (head, second, third)]
        assert all(view.row.status == "pending" and view.row.redelivery_of for view in again)
        await eventually(all_settled(service, webhook.id, 7), "the redeliveries settled")
        rows = {row.id: row for row in await deliveries(service, webhook.id)}

    for view in again:
        row = rows[view.row.id]
        assert row.status == "delivered" and row.attempts == 1 and row.event_id == rows[row.redelivery_of].event_id
    delivered = [a.event_id for a in receiver.delivered("down") if a.model == "down-model"]
    assert delivered == [head.id, second.id, third.id]  # the same webhook-ids, in order


async def test_events_of_one_model_arrive_in_order_through_failures(
    database: Database, tmp_path: Path, receiver: Receiver
) -> None:
    """The second event of `ordered` fails until every event of `other` has arrived (at least twice): `ordered`'s
    later events wait behind it, while `other`'s lane goes on (were it held back too, the second event would fail
    the whole schedule and go dead)."""

    def respond(arrival: Arrival, nth: int) -> int:
        if arrival.model == "ordered" and arrival.payload["type"] == types.VERSION_UPDATED:  # its second event
            others = sum(1 for a in receiver.arrivals if a.model == "other")
            return 500 if nth <= 2 or others < 5 else 200
        return 200

    receiver.respond = respond
    settings = settings_for(tmp_path, webhook_retry_schedule="0.2,0.2,0.2,0.2,0.2,0.2,0.2,0.2")
    outbox = EventOutbox(database)
    async with dispatching(database, settings) as dispatcher:
        outbox.add_listener(dispatcher.wake)
        service = WebhookService(database, settings, dispatcher)
        webhook = await subscribe(service, receiver, "ordered")
        kinds = [types.VERSION_CREATED, types.VERSION_UPDATED, types.VERSION_ALIAS_SET, types.VERSION_STAGE_CHANGED]
        ordered, other = [], []
        for kind in [*kinds, types.VERSION_DELETED]:  # interleaved, one transaction each
            ordered += await record(outbox, "ordered", kind)
            other += await record(outbox, "other", kind)
        settled = await eventually(all_settled(service, webhook.id, 10), "every delivery settled")

    assert all(row.status == "delivered" for row in settled)
    arrivals = [a.seq for a in receiver.at("ordered") if a.model == "ordered"]
    second = ordered[1].seq
    retries = arrivals.count(second)
    assert retries >= 3
    assert arrivals == [ordered[0].seq] + [second] * retries + [row.seq for row in ordered[2:]]
    assert [a.seq for a in receiver.at("ordered") if a.model == "other"] == [row.seq for row in other]


async def test_disabled_webhooks_hold_their_deliveries_until_enabled(
    database: Database, tmp_path: Path, receiver: Receiver
) -> None:
    settings = settings_for(tmp_path)
    outbox = EventOutbox(database)
    async with dispatching(database, settings) as dispatcher:
        service = WebhookService(database, settings, dispatcher)
        webhook = await subscribe(service, receiver, "paused")
        await service.update(webhook.id, {"enabled": False})
        async with database.session() as session, session.begin():  # queued while it was enabled
            events = await outbox.append(session, [NewEvent(types.VERSION_CREATED, TEST_ACTOR, "paused-model")])
            session.add(
                DeliveryRow(
                    webhook_id=webhook.id,
                    event_seq=events[0].seq,
                    event_id=events[0].id,
                    lane="paused-model",
                    status="pending",
                    attempts=0,
                    next_attempt_at=utcnow(),
                    created_at=utcnow(),
                )
            )
        dispatcher.wake()
        await asyncio.sleep(5 * settings.events_poll_seconds)  # several rounds of the dispatcher
        [waiting] = await deliveries(service, webhook.id)
        assert waiting.status == "pending" and waiting.attempts == 0 and receiver.at("paused") == []

        await service.update(webhook.id, {"enabled": True})
        [delivered] = await eventually(all_settled(service, webhook.id, 1), "delivered once enabled")
    assert delivered.status == "delivered" and [a.event_id for a in receiver.at("paused")] == [events[0].id]


async def test_two_dispatchers_deliver_each_event_once(database: Database, tmp_path: Path, receiver: Receiver) -> None:
    """Two dispatchers (as two service processes: their own owner and connection pool) on one database."""
    receiver.delay = 0.01  # slow enough for the two to overlap
    settings = settings_for(tmp_path, webhook_concurrency=4)
    second_pool = Database(database.engine.url.render_as_string(hide_password=False))
    outbox = EventOutbox(database)
    try:
        async with (
            dispatching(database, settings, owner="process-a") as first,
            dispatching(second_pool, settings, owner="process-b") as second,
        ):
            outbox.add_listener(first.wake)
            outbox.add_listener(second.wake)
            service = WebhookService(database, settings, first)
            hooks = [await subscribe(service, receiver, path) for path in ("left", "right")]
            recorded = []
            for round_number in range(6):
                for model in ("alpha", "beta", "gamma", "delta", "epsilon"):
                    recorded += await record(outbox, f"{model}-{round_number % 2}", types.VERSION_UPDATED)
            for hook in hooks:
                await eventually(all_settled(service, hook.id, len(recorded)), "every delivery settled")
    finally:
        await second_pool.dispose()

    for path in ("left", "right"):
        arrived = [a.event_id for a in receiver.at(path)]
        assert sorted(arrived) == sorted(row.id for row in recorded), "each event exactly once per webhook"
        by_model: dict[str, list[int]] = {}
        for arrival in receiver.at(path):
            by_model.setdefault(arrival.model, []).append(arrival.seq)
        assert all(seqs == sorted(seqs) for seqs in by_model.values()), "in order per model"


async def test_a_closed_dispatcher_gives_its_in_flight_deliveries_back(
    database: Database, tmp_path: Path, receiver: Receiver
) -> None:
    """Closed while a receiver hangs: after a short grace it gives the lease back (the lease here is ten minutes,
    so only the release lets another process send it within the test's patience), and the attempt is not counted."""
    settings = settings_for(tmp_path, webhook_lease_seconds=600, webhook_timeout=60)
    outbox = EventOutbox(database)
    receiver.gate.clear()
    first = WebhookDispatcher(database, settings, owner="stopping-process")
    await first.start()
    outbox.add_listener(first.wake)
    service = WebhookService(database, settings, first)
    webhook = await subscribe(service, receiver, "hanging")
    [event] = await record(outbox, "hanging-model", types.VERSION_CREATED)
    await eventually(lambda: receiver.waiting == 1, "the first attempt is in flight")
    await first.aclose()
    receiver.gate.set()
    [released] = await deliveries(service, webhook.id)
    assert released.status == "pending" and released.lease_owner is None and released.attempts == 0

    async with dispatching(database, settings, owner="next-process"):
        [row] = await eventually(all_settled(service, webhook.id, 1), "delivered by the next process")
    assert row.status == "delivered" and row.attempts == 1
    assert [a.event_id for a in receiver.at("hanging")] == [event.id, event.id]  # at-least-once: same webhook-id


DOOMED_DISPATCHER = """
import asyncio, sys
from hokusai.server.config import Settings
from hokusai.server.db import Database
from hokusai.server.webhooks.dispatch import WebhookDispatcher

async def main():
    settings = Settings(
        home=sys.argv[2], webhook_allow_private=True, webhook_lease_seconds=2, events_poll_seconds=0.2
    )
    dispatcher = WebhookDispatcher(Database(sys.argv[1]), settings, owner="doomed-process")
    await dispatcher.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_dispatcher_killed_mid_delivery_loses_nothing(
    database: Database, tmp_path: Path, receiver: Receiver
) -> None:
    """A process killed (SIGKILL) while its delivery waits for the receiver: its lease runs out and another process
    sends the delivery again, with the same webhook-id."""
    settings = settings_for(tmp_path)
    service = WebhookService(database, settings, WebhookDispatcher(database, settings, owner="unstarted"))
    webhook = await subscribe(service, receiver, "crash")
    [event] = await record(EventOutbox(database), "crash-model", types.VERSION_CREATED)
    receiver.gate.clear()
    env = {name: value for name, value in os.environ.items() if not name.startswith("HOKUSAI_")}
    url = database.engine.url.render_as_string(hide_password=False)
    doomed = await asyncio.create_subprocess_exec(sys.executable, "-c", DOOMED_DISPATCHER, url, str(tmp_path), env=env)
    try:
        await eventually(lambda: receiver.waiting == 1 or doomed.returncode is not None, "the doomed process sends")
        assert doomed.returncode is None, "the dispatcher process exited early"
        async with database.session() as session:
            row = await session.scalar(select(DeliveryRow).where(DeliveryRow.webhook_id == webhook.id))
        assert row.lease_owner == "doomed-process" and row.status == "pending"
    finally:
        if doomed.returncode is None:
            doomed.kill()  # SIGKILL: no shutdown, the lease is left to run out
        await doomed.wait()
    receiver.gate.set()

    async with dispatching(database, settings, owner="surviving-process"):
        [row] = await eventually(all_settled(service, webhook.id, 1), "delivered after the lease ran out")
    assert row.status == "delivered" and row.attempts == 1  # the killed attempt left no record
    assert [a.event_id for a in receiver.at("crash")] == [event.id, event.id]


# The HTTP API


@pytest.fixture(scope="module")
def webhook_service(start_service, mlflow_server):
    """A service that may send to loopback receivers, with a fast retry schedule."""
    return start_service(
        mlflow_url=mlflow_server.url,
        webhook_allow_private="true",
        webhook_retry_schedule=FAST_RETRIES,
        events_poll_seconds="0.2",
    )


@pytest.fixture
async def service_database(webhook_service) -> AsyncIterator[Database]:
    """The service's own SQLite database, to write events into its outbox as the registry does."""
    database = Database(f"sqlite+aiosqlite:///{webhook_service.home / 'hokusai.db'}")
    yield database
    await database.dispose()


def test_webhook_crud_shows_the_secret_once(webhook_service, receiver: Receiver) -> None:
    with webhook_service.client(webhook_service.admin_key) as admin:
        created = admin.post(
            WEBHOOKS,
            json={
                "url": receiver.url("crud"),
                "event_types": ["model_version.*", "registered_model.created", "model_version.*"],
                "model_names": ["crud-model"],
                "description": "CRUD",
            },
        )
        assert created.status_code == 201, created.text
        webhook = created.json()
        assert webhook["secret"].startswith("whsec_") and webhook["enabled"] is True
        assert webhook["event_types"] == ["model_version.*", "registered_model.created"]
        assert webhook["id"].startswith("wh_") and webhook["created_by"]
        hook_url = f"{WEBHOOKS}/{webhook['id']}"

        shown = admin.get(hook_url).json()
        assert "secret" not in shown and shown["url"] == receiver.url("crud")
        listed = admin.get(WEBHOOKS).json()["webhooks"]
        assert webhook["id"] in [item["id"] for item in listed]
        assert all("secret" not in item for item in listed)
        assert webhook["secret"] not in admin.get(WEBHOOKS).text

        patched = admin.patch(hook_url, json={"enabled": False, "model_names": None, "description": "paused"})
        assert patched.status_code == 200, patched.text
        body = patched.json()
        assert body["enabled"] is False and body["model_names"] is None and body["secret"] is None
        assert body["event_types"] == webhook["event_types"]  # not given: unchanged

        rotated = admin.patch(hook_url, json={"rotate_secret": True})
        assert rotated.status_code == 200 and rotated.json()["secret"].startswith("whsec_")
        assert rotated.json()["secret"] != webhook["secret"]

        assert admin.delete(hook_url).status_code == 204
        gone = admin.get(hook_url)
        assert gone.status_code == 404 and gone.json() == {"detail": f"Webhook {webhook['id']} not found"}
        assert admin.delete(hook_url).status_code == 404
        assert admin.get(f"{hook_url}/deliveries").status_code == 404


def test_webhook_requests_are_validated(webhook_service) -> None:
    with webhook_service.client(webhook_service.admin_key) as admin:
        unknown = admin.post(WEBHOOKS, json={"url": "https://93.184.215.14/", "event_types": ["model.exploded"]})
        assert unknown.status_code == 400 and "model.exploded" in unknown.json()["detail"]
        family = admin.post(WEBHOOKS, json={"url": "https://93.184.215.14/", "event_types": ["nothing.*"]})
        assert family.status_code == 400
        scheme = admin.post(WEBHOOKS, json={"url": "file:///etc/passwd", "event_types": ["*"]})
        assert scheme.status_code == 400 and "http" in scheme.json()["detail"]
        assert admin.post(WEBHOOKS, json={"url": "https://93.184.215.14/", "event_types": []}).status_code == 422
        extra = admin.post(WEBHOOKS, json={"url": "https://93.184.215.14/", "event_types": ["*"], "secret": "x"})
        assert extra.status_code == 422  # the secret is the service's to make
        assert admin.patch(f"{WEBHOOKS}/wh_missing", json={"enabled": True}).status_code == 404


def test_webhooks_are_for_admins_only(webhook_service) -> None:
    with webhook_service.client(webhook_service.admin_key) as admin:
        writer_key = admin.post("/api/v1/keys", json={"name": "webhook writer", "scopes": ["write"]}).json()["key"]
    with webhook_service.client(writer_key) as writer:
        assert writer.get(WEBHOOKS).status_code == 403
        assert writer.post(WEBHOOKS, json={"url": "https://93.184.215.14/", "event_types": ["*"]}).status_code == 403
    with webhook_service.client() as anonymous:
        assert anonymous.get(WEBHOOKS).status_code == 401


def test_test_send_is_signed_and_not_logged(webhook_service, receiver: Receiver) -> None:
    with webhook_service.client(webhook_service.admin_key) as admin:
        webhook = admin.post(WEBHOOKS, json={"url": receiver.url("probe"), "event_types": ["*"]}).json()
        receiver.secrets["probe"] = webhook["secret"]
        answered = admin.post(f"{WEBHOOKS}/{webhook['id']}/test")
        assert answered.status_code == 200, answered.text
        result = answered.json()
        assert result["success"] is True and result["status_code"] == 200 and result["error"] is None
        [probe] = receiver.at("probe")
        assert probe.payload["type"] == types.WEBHOOK_TEST and probe.payload["data"]["seq"] == 0
        assert probe.payload["data"]["payload"]["webhook_id"] == webhook["id"]

        receiver.respond = lambda arrival, nth: 500
        failing = admin.post(f"{WEBHOOKS}/{webhook['id']}/test").json()
        assert failing["success"] is False and failing["status_code"] == 500 and failing["error"].startswith("HTTP 500")

        logged = admin.get("/api/v1/events", params={"limit": 500}).json()["events"]
        assert probe.event_id not in [event["id"] for event in logged]
        assert admin.get(f"{WEBHOOKS}/{webhook['id']}/deliveries").json()["deliveries"] == []
        admin.delete(f"{WEBHOOKS}/{webhook['id']}")


async def test_deliveries_over_http_pages_filters_and_redelivery(
    webhook_service, service_database: Database, receiver: Receiver
) -> None:
    model = f"http-model-{os.getpid()}-{time.monotonic_ns()}"
    with webhook_service.client(webhook_service.admin_key) as admin:
        webhook = admin.post(
            WEBHOOKS, json={"url": receiver.url("http"), "event_types": ["*"], "model_names": [model]}
        ).json()
        receiver.secrets["http"] = webhook["secret"]
        hook_url = f"{WEBHOOKS}/{webhook['id']}"
        events = await record(EventOutbox(service_database), model, *[types.VERSION_UPDATED] * 5)

        def settled() -> list[dict] | None:
            page = admin.get(f"{hook_url}/deliveries", params={"status": "delivered"}).json()["deliveries"]
            return page if len(page) == 5 else None

        delivered = await eventually(settled, "five deliveries")
        assert [d["event_id"] for d in delivered] == [row.id for row in reversed(events)]  # newest first
        first = delivered[-1]
        assert first["event_type"] == types.VERSION_UPDATED and first["attempts"] == 1
        assert first["last_status_code"] == 200 and first["next_attempt_at"] is None and first["delivered_at"]

        pages, cursor = [], None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = admin.get(f"{hook_url}/deliveries", params=params).json()
            pages.append([d["id"] for d in page["deliveries"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [[d["id"] for d in delivered[i : i + 2]] for i in range(0, 5, 2)]
        assert admin.get(f"{hook_url}/deliveries", params={"status": "dead"}).json()["deliveries"] == []
        assert admin.get(f"{hook_url}/deliveries", params={"status": "lost"}).status_code == 422
        assert admin.get(f"{hook_url}/deliveries", params={"cursor": "x"}).status_code == 400

        # Paused, so the redelivery stays pending while the second request is made.
        assert admin.patch(hook_url, json={"enabled": False}).status_code == 200
        again = admin.post(f"{hook_url}/deliveries/{first['id']}/redeliver")
        assert again.status_code == 202, again.text
        assert again.json()["status"] == "pending" and again.json()["redelivery_of"] == first["id"]
        assert again.json()["event_id"] == first["event_id"]
        twice = admin.post(f"{hook_url}/deliveries/{first['id']}/redeliver")
        assert twice.status_code == 409 and "pending" in twice.json()["detail"]
        assert admin.post(f"{hook_url}/deliveries/999999999/redeliver").status_code == 404
        assert admin.patch(hook_url, json={"enabled": True}).status_code == 200

        def redelivered() -> dict | None:
            page = admin.get(f"{hook_url}/deliveries", params={"limit": 1}).json()["deliveries"]
            return page[0] if page and page[0]["status"] == "delivered" else None

        row = await eventually(redelivered, "the redelivery delivered")
        assert row["id"] == again.json()["id"]
        assert [a.event_id for a in receiver.at("http")].count(first["event_id"]) == 2

        assert admin.delete(hook_url).status_code == 204
    async with service_database.session() as session:
        left = await session.scalars(select(DeliveryRow.id).where(DeliveryRow.webhook_id == webhook["id"]))
        assert list(left) == []  # deleted with its webhook
