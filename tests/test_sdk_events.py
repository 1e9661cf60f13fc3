"""The SDK's side of lifecycle events: `verify_webhook` accepts what an independent Standard Webhooks implementation
(the `standardwebhooks` package) signs and refuses anything else; the event log and webhooks through a real
service with ModelRegistry and AsyncModelRegistry; `hokusai events tail` following the HTTP log."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import standardwebhooks

from hokusai import AsyncModelRegistry, ModelRegistry, NotFound, WebhookVerificationError, verify_webhook
from hokusai.server.config import Settings
from hokusai.server.db import Database
from hokusai.server.events.models import EventRow
from hokusai.server.events.outbox import Actor, EventOutbox, NewEvent
from tests.support import service_environment

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
BODY = json.dumps({"type": "model_version.improved", "timestamp": "2026-11-29T12:00:00.000Z", "data": {"seq": 7}})
DEADLINE_SECONDS = 60.0  # generous: for what is expected within a poll or two
TEST_ACTOR = Actor("service", "sdk event tests")


def signed(body: str, secret: str = SECRET, message_id: str = "evt_1", at: datetime | None = None) -> dict[str, str]:
    """Headers as an independent implementation signs them."""
    at = at or datetime.now(UTC)
    signature = standardwebhooks.Webhook(secret).sign(message_id, at, body)
    return {"webhook-id": message_id, "webhook-timestamp": str(int(at.timestamp())), "webhook-signature": signature}


# --- verify_webhook ------------------------------------------------------------------------------------------


def test_verify_webhook_accepts_what_standard_webhooks_signs():
    headers = signed(BODY)
    assert verify_webhook(BODY, headers, SECRET) == json.loads(BODY)
    assert verify_webhook(BODY.encode(), headers, SECRET) == json.loads(BODY)  # the raw bytes, as received
    capitalised = {name.title(): value for name, value in headers.items()}  # Webhook-Id, as some servers pass
    assert verify_webhook(BODY, capitalised, SECRET)["data"] == {"seq": 7}
    # During a secret rotation the sender signs with both: one valid v1 signature is enough.
    other = signed(BODY, secret="whsec_" + base64.b64encode(os.urandom(32)).decode())["webhook-signature"]
    rotating = headers | {"webhook-signature": f"{other} v2,abc {headers['webhook-signature']}"}
    assert verify_webhook(BODY, rotating, SECRET)["type"] == "model_version.improved"
    # The library's own verifier agrees on the same headers.
    assert standardwebhooks.Webhook(SECRET).verify(BODY, headers) == json.loads(BODY)


def test_verify_webhook_accepts_the_services_own_signature():
    from hokusai.server.webhooks.signing import new_secret, signed_headers

    secret = new_secret()
    body = BODY.encode()
    headers = signed_headers(secret, "evt_abc", body)
    assert verify_webhook(body, headers, secret) == standardwebhooks.Webhook(secret).verify(body, headers)


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda body, headers: (body.replace("7", "8"), headers), "no valid signature"),
        (lambda body, headers: (body, headers | {"webhook-id": "evt_2"}), "no valid signature"),
        (
            lambda body, headers: (body, headers | {"webhook-signature": "v2," + headers["webhook-signature"][3:]}),
            "no valid",
        ),
        (lambda body, headers: (body, {k: v for k, v in headers.items() if k != "webhook-timestamp"}), "missing"),
        (lambda body, headers: (body, headers | {"webhook-timestamp": "yesterday"}), "Unix seconds"),
    ],
    ids=["tampered-body", "another-id", "not-v1", "no-timestamp", "bad-timestamp"],
)
def test_verify_webhook_refuses_what_was_changed(change, reason):
    body, headers = change(BODY, signed(BODY))
    with pytest.raises(WebhookVerificationError, match=reason):
        verify_webhook(body, headers, SECRET)


def test_verify_webhook_refuses_another_secret_and_a_stale_or_future_timestamp():
    wrong = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(WebhookVerificationError, match="no valid signature"):
        verify_webhook(BODY, signed(BODY), wrong)
    stale = signed(BODY, at=datetime.now(UTC) - timedelta(seconds=301))
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify_webhook(BODY, stale, SECRET)
    assert verify_webhook(BODY, stale, SECRET, tolerance_seconds=600)["data"] == {"seq": 7}
    future = signed(BODY, at=datetime.now(UTC) + timedelta(seconds=301))
    with pytest.raises(WebhookVerificationError, match="future"):
        verify_webhook(BODY, future, SECRET)
    with pytest.raises(WebhookVerificationError, match="whsec_"):
        verify_webhook(BODY, signed(BODY), "whsec_not base64!")


# --- the event log through a service ------------------------------------------------------------------------


def record(service, events: list[NewEvent]) -> list[EventRow]:
    """Events written into the service's database, as its own writes make them (this process, another engine)."""

    async def write() -> list[EventRow]:
        database = Database(Settings(home=service.home).async_database_dsn)
        try:
            return await EventOutbox(database).record(events)
        finally:
            await database.dispose()

    return asyncio.run(write())


@pytest.fixture(scope="module")
def logged(service) -> dict[str, Any]:
    """Five events of one model of this module, of three types."""
    model = f"sdk-events-{uuid.uuid4().hex[:8]}"
    types = ["registered_model.created", "model_version.created", "model_version.stage_changed"]
    events = [NewEvent(types[0], TEST_ACTOR, model)]
    events += [NewEvent(types[1 + n % 2], TEST_ACTOR, model, str(n + 1), payload={"n": n}) for n in range(4)]
    rows = record(service, events)
    return {"model": model, "ids": [row.id for row in rows], "types": [row.type for row in rows]}


def test_events_page_through_the_log_in_order(service, keys, logged):
    with ModelRegistry(service.base_url, keys["read"]) as registry:
        first = registry.events(model=logged["model"], limit=2)
        assert [event.id for event in first.events] == logged["ids"][:2] and first.next_cursor
        assert first.events[0].subject.model_name == logged["model"] and first.events[0].actor.name == TEST_ACTOR.name
        everything = list(registry.iter_events(model=logged["model"], page_size=2))
        assert [event.id for event in everything] == logged["ids"]
        assert [event.seq for event in everything] == sorted(event.seq for event in everything)
        versions = list(registry.iter_events(type="model_version.*", model=logged["model"], page_size=2))
        assert [event.id for event in versions] == logged["ids"][1:]
        stages = registry.events(type=["model_version.stage_changed"], model=logged["model"])
        assert [event.payload["n"] for event in stages.events] == [1, 3]
        later = registry.events(model=logged["model"], since=datetime.now(UTC) + timedelta(minutes=1))
        assert later.events == [] and later.next_cursor is None
    # The reference's URL form (the MLflow URL, .../api/mlflow) reaches the same log under /api/v1.
    with ModelRegistry(f"{service.base_url}/api/mlflow", keys["read"]) as registry:
        assert [e.id for e in registry.iter_events(model=logged["model"])] == logged["ids"]


@pytest.mark.anyio
async def test_async_registry_iterates_the_same_events(service, keys, logged):
    async with AsyncModelRegistry(service.base_url, keys["read"]) as registry:
        seen = [event.id async for event in registry.iter_events(model=logged["model"], page_size=3)]
        page = await registry.events(type="registered_model.*", model=logged["model"])
    assert seen == logged["ids"]
    assert [event.type for event in page.events] == ["registered_model.created"]


# --- webhooks through a service ----------------------------------------------------------------------------


class Receiver:
    """A webhook receiver: records each request (headers, body) and answers 200."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.put((dict(self.headers.items()), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self) -> tuple[dict[str, str], bytes]:
        try:
            return self.received.get(timeout=DEADLINE_SECONDS)
        except queue.Empty:
            raise AssertionError(f"no delivery within {DEADLINE_SECONDS}s") from None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_webhooks_are_managed_and_their_deliveries_verified_with_the_sdk(start_service, mlflow_server):
    service = start_service(mlflow_url=mlflow_server.url, webhook_allow_private="true", events_poll_seconds="0.2")
    receiver = Receiver()
    model = f"hooked-{uuid.uuid4().hex[:8]}"
    try:
        with ModelRegistry(service.base_url, service.admin_key) as registry:
            created = registry.create_webhook(receiver.url, ["model_version.*"], [model], description="sdk test")
            assert created.secret.startswith("whsec_") and created.model_names == [model]
            assert created.id in [hook.id for hook in registry.list_webhooks()]
            fetched = registry.get_webhook(created.id)
            assert fetched.secret is None and fetched.event_types == ["model_version.*"]

            tested = registry.test_webhook(created.id)
            assert tested.success and tested.status_code == 200
            headers, body = receiver.next()
            assert verify_webhook(body, headers, created.secret)["type"] == "webhook.test"

            row = record(service, [NewEvent("model_version.created", TEST_ACTOR, model, "1")])[0]
            headers, body = receiver.next()
            delivered = verify_webhook(body, headers, created.secret)
            assert headers["webhook-id"] == row.id and delivered["data"]["id"] == row.id
            page = _eventually(lambda: _delivered(registry, created.id), "the delivery recorded as delivered")
            first = page.deliveries[0]
            assert first.event_id == row.id and first.attempts == 1 and first.last_status_code == 200

            again = registry.redeliver(created.id, first.id)
            assert again.redelivery_of == first.id and again.event_id == row.id
            headers, body = receiver.next()
            assert headers["webhook-id"] == row.id  # the same webhook-id: receivers deduplicate by it
            verify_webhook(body, headers, created.secret)

            paused = registry.update_webhook(created.id, enabled=False, model_names=None)
            assert paused.enabled is False and paused.model_names is None and paused.description == "sdk test"
            rotated = registry.update_webhook(created.id, rotate_secret=True)
            assert rotated.secret and rotated.secret != created.secret

            registry.delete_webhook(created.id)
            with pytest.raises(NotFound):
                registry.get_webhook(created.id)
    finally:
        receiver.close()


def _delivered(registry: ModelRegistry, webhook_id: str) -> Any:
    page = registry.webhook_deliveries(webhook_id, status="delivered")
    return page if page.deliveries else None


def _eventually(check: Any, what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not (result := check()):
        assert time.monotonic() < deadline, f"not within {DEADLINE_SECONDS}s: {what}"
        time.sleep(0.1)
    return result


# --- hokusai events tail, over HTTP ---------------------------------------------------------------------------


def test_events_tail_follows_the_http_log_without_redis(service, keys):
    model = f"tailed-{uuid.uuid4().hex[:8]}"
    before = record(service, [NewEvent("model_version.created", TEST_ACTOR, model, "1")])[0]
    time.sleep(1.1)  # the tail starts from the service's clock, to the second: after this event
    command = [sys.executable, "-m", "hokusai.cli", "events", "tail", "--model", model, "--interval", "0.2"]
    command += ["--url", service.base_url, "--api-key", keys["read"]]
    env = service_environment(HOKUSAI_CONFIG=str(service.home / f"no-config-{secrets.token_hex(3)}"))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: dict[str, queue.Queue[str]] = {"out": queue.Queue(), "err": queue.Queue()}
    for name, pipe in (("out", process.stdout), ("err", process.stderr)):
        threading.Thread(target=lambda p=pipe, q=lines[name]: [q.put(line) for line in p], daemon=True).start()
    try:
        assert lines["err"].get(timeout=DEADLINE_SECONDS).startswith("Following the event log")
        rows = record(
            service,
            [
                NewEvent("model_version.created", TEST_ACTOR, f"{model}-other", "1"),
                NewEvent("model_version.stage_changed", TEST_ACTOR, model, "1", payload={"to": "Production"}),
            ],
        )
        shown = json.loads(lines["out"].get(timeout=DEADLINE_SECONDS))
        assert shown["id"] == rows[1].id != before.id and shown["payload"] == {"to": "Production"}
        process.send_signal(signal.SIGINT)
        assert process.wait(DEADLINE_SECONDS) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
