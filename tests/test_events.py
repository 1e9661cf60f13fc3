"""Lifecycle events of the registry: one event per change, whichever way it was made (/models, the stock mlflow client
through the gateway, MLflow directly), with the right actor; the snapshot diff is exactly once across processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from hokusai.server.config import Settings
from hokusai.server.db import Database, run_migrations, utcnow
from hokusai.server.events import types
from hokusai.server.events.changes import RegistryChanges
from hokusai.server.events.models import ChangeIntentRow, EventRow
from hokusai.server.events.outbox import MLFLOW_ACTOR, Actor, EventOutbox
from hokusai.server.events.snapshot import ModelState, diff
from hokusai.server.mlflow.breaker import CircuitBreaker
from hokusai.server.mlflow.embedded import embedded_mlflow_command, free_loopback_port
from hokusai.server.mlflow.registry_client import RegistryClient
from hokusai.server.mlflow.upstream import MlflowUpstream
from tests.support import start_mlflow, through_the_gateway
from tests.webhook_receiver import Receiver

EVENTS = "/api/v1/events"

# The stock client's registry calls, one change each, in a process of its own (through the gateway or straight to
# MLflow, whichever MLFLOW_TRACKING_URI names). argv: model name, model source.
STOCK_CLIENT_CHANGES = """
import sys, warnings
warnings.filterwarnings("ignore")
from mlflow import MlflowClient
name, source = sys.argv[1], sys.argv[2]
client = MlflowClient()
client.create_registered_model(name)
model_id = source.rsplit("/", 1)[-1]
version = client.create_model_version(name, source, tags={"team": "events"}, model_id=model_id).version
client.set_model_version_tag(name, version, "validated", "yes")
client.set_registered_model_alias(name, "champion", version)
client.transition_model_version_stage(name, version, "Staging")
client.delete_registered_model_alias(name, "champion")
client.update_model_version(name, version, description="checked")
client.delete_model_version(name, version)
client.delete_registered_model(name)
"""
STOCK_CLIENT_TYPES = [
    types.REGISTERED_MODEL_CREATED,
    types.VERSION_CREATED,
    types.VERSION_UPDATED,
    types.VERSION_ALIAS_SET,
    types.VERSION_STAGE_CHANGED,
    types.VERSION_ALIAS_DELETED,
    types.VERSION_UPDATED,
    types.VERSION_DELETED,
    types.REGISTERED_MODEL_DELETED,
]
LOG_MODEL = """
import json, warnings
warnings.filterwarnings("ignore")
import mlflow, numpy as np
from sklearn.linear_model import LogisticRegression
mlflow.set_experiment("events-sources")
with mlflow.start_run():
    info = mlflow.sklearn.log_model(LogisticRegression().fit(np.array([[0.0], [1.0]]), [0, 1]), name="model")
print(json.dumps({"model_id": info.model_id}))
"""


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.stop()
    assert not server.forged, f"deliveries that did not verify: {server.forged}"


def subscribe(service, receiver: Receiver, model: str) -> None:
    """A webhook for every event of one model, its deliveries verified by the receiver (standardwebhooks)."""
    with service.client(service.admin_key) as admin:
        made = admin.post(
            "/api/v1/webhooks", json={"url": receiver.url(model), "event_types": ["*"], "model_names": [model]}
        )
    assert made.status_code == 201, made.text
    receiver.secrets[model] = made.json()["secret"]


def delivered_as_logged(receiver: Receiver, model: str, logged: list[dict]) -> None:
    """Every logged event of the model arrived once, signed, in the log's order."""
    deadline = time.monotonic() + 60
    while len(receiver.delivered(model)) < len(logged) and time.monotonic() < deadline:
        time.sleep(0.1)
    arrived = receiver.delivered(model)
    assert [a.event_id for a in arrived] == [e["id"] for e in logged]
    assert [a.payload["data"] for a in arrived] == logged
    assert [a.payload["type"] for a in arrived] == [e["type"] for e in logged]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def events_of(client: httpx.Client, model: str, **params) -> list[dict]:
    response = client.get(EVENTS, params={"model": model, "limit": 500, **params})
    assert response.status_code == 200, response.text
    return response.json()["events"]


def wait_for_events(client: httpx.Client, model: str, count: int, timeout: float = 60.0) -> list[dict]:
    """The model's events once there are `count` of them; a moment longer, to see that no more come."""
    deadline = time.monotonic() + timeout
    while True:
        found = events_of(client, model)
        if len(found) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(1.5)
    return events_of(client, model)


def run_stock_client(env: dict[str, str], *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", STOCK_CLIENT_CHANGES, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def model_source(service, keys) -> str:
    result = subprocess.run(
        [sys.executable, "-c", LOG_MODEL],
        env=through_the_gateway(service, keys["write"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return f"models:/{json.loads(result.stdout.strip().splitlines()[-1])['model_id']}"


def test_each_change_through_models_is_one_event_with_its_actor(service, writer, reader, model_source, receiver):
    name = unique("events-models")
    subscribe(service, receiver, name)
    registered = writer.post(
        "/models/register", json={"model_data": model_source, "model_name": name, "model_type": "classification"}
    )
    assert registered.status_code == 201, registered.text
    patched = writer.patch(f"/models/{name}/1", json={"description": "first", "tags": {"a": "1", "b": "2"}})
    assert patched.status_code == 200, patched.text
    moved = writer.post(f"/models/{name}/1/transition", json={"stage": "Staging"})
    assert moved.status_code == 200, moved.text
    for action in ("set_alias", "delete_alias"):  # a batch of one, then another: each operation is one change
        batch = writer.post(
            "/models/batch", json={"operations": [{"action": action, "model": f"{name}:1", "alias": "champion"}]}
        )
        assert batch.status_code == 200 and batch.json()["successful"] == 1, batch.text
    assert writer.delete(f"/models/{name}/1").status_code == 200

    found = wait_for_events(reader, name, 8)
    assert [e["type"] for e in found] == [
        types.REGISTERED_MODEL_CREATED,
        types.VERSION_CREATED,
        types.VERSION_UPDATED,  # one PATCH: description and two tags, one event
        types.VERSION_STAGE_CHANGED,
        types.VERSION_ALIAS_SET,  # the "staging" alias the service keeps in step with the stage
        types.VERSION_ALIAS_SET,
        types.VERSION_ALIAS_DELETED,
        types.VERSION_DELETED,
    ]
    assert {e["actor"]["kind"] for e in found} == {"api_key"}
    assert len({e["actor"]["key_id"] for e in found}) == 1 and found[0]["actor"]["key_id"]
    assert len({e["id"] for e in found}) == len(found)
    assert [e["seq"] for e in found] == sorted(e["seq"] for e in found)
    update = found[2]["payload"]
    assert update["description"] == {"from": "", "to": "first"}
    assert update["tags"]["set"] == {"a": "1", "b": "2"}
    assert found[3]["payload"] == {"from": "None", "to": "Staging"}
    assert found[5]["payload"]["alias"] == "champion" and found[5]["subject"]["version"] == "1"
    assert found[1]["subject"]["model_id"].startswith("mdl_")
    assert "hokusai_model_id" not in json.dumps(found[0]["payload"])  # the service's own bookkeeping is no change
    delivered_as_logged(receiver, name, found)


def test_stock_client_through_the_gateway_one_event_per_call(service, keys, reader, model_source, receiver):
    name = unique("events-gateway")
    subscribe(service, receiver, name)
    run_stock_client(through_the_gateway(service, keys["write"]), name, model_source)
    found = wait_for_events(reader, name, len(STOCK_CLIENT_TYPES))
    assert [e["type"] for e in found] == STOCK_CLIENT_TYPES
    assert {e["actor"]["kind"] for e in found} == {"api_key"}
    assert found[3]["payload"]["alias"] == "champion"
    assert found[6]["payload"]["description"] == {"from": "", "to": "checked"}
    delivered_as_logged(receiver, name, found)


def test_direct_changes_in_mlflow_are_reconciled_as_mlflow(start_service, mlflow_server, model_source, receiver):
    reconciling = start_service(
        mlflow_url=mlflow_server.url, events_reconcile_seconds="0.5", webhook_allow_private="true"
    )
    with reconciling.client(reconciling.admin_key) as admin:
        step_name = unique("events-direct")
        subscribe(reconciling, receiver, step_name)
        with httpx.Client(base_url=mlflow_server.url + "/api/2.0/mlflow", timeout=30) as mlflow:
            assert mlflow.post("/registered-models/create", json={"name": step_name}).status_code == 200
            assert wait_for_events(admin, step_name, 1)[0]["type"] == types.REGISTERED_MODEL_CREATED
            created = mlflow.post(
                "/model-versions/create",
                json={"name": step_name, "source": model_source, "model_id": model_source.rsplit("/", 1)[-1]},
            )
            assert created.status_code == 200, created.text
            assert [e["type"] for e in wait_for_events(admin, step_name, 2)][-1] == types.VERSION_CREATED
            mlflow.post(
                "/model-versions/transition-stage",
                json={"name": step_name, "version": "1", "stage": "Production", "archive_existing_versions": False},
            )
            last = wait_for_events(admin, step_name, 3)[-1]
            assert last["type"] == types.VERSION_STAGE_CHANGED and last["payload"]["to"] == "Production"
            assert last["actor"] == {"kind": "mlflow", "name": "mlflow", "key_id": None}
            mlflow.request("DELETE", "/registered-models/delete", json={"name": step_name})
            found = wait_for_events(admin, step_name, 4)
            assert found[-1]["type"] == types.REGISTERED_MODEL_DELETED
        delivered_as_logged(receiver, step_name, found)


def test_mlflow_webhooks_announce_direct_changes_at_once(start_service, tmp_path_factory, model_source):
    """MLflow's own webhooks (subscribed by the service) name the changed model: seen without waiting for the
    reconciler (set to an hour here)."""
    home = tmp_path_factory.mktemp("mlflow-hooks")
    port = free_loopback_port()
    hooks_mlflow = start_mlflow(
        embedded_mlflow_command(home, "127.0.0.1", port),
        port,
        home / "mlflow.log",
        env={
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": FERNET_KEY,
        },
    )
    try:
        service_port = free_loopback_port()
        hooked = start_service(
            mlflow_url=hooks_mlflow.url,
            port=str(service_port),
            events_reconcile_seconds="3600",
            mlflow_webhook_url=f"http://127.0.0.1:{service_port}/api/v1/events/mlflow",
        )
        name = unique("events-hooked")
        with (
            hooked.client(hooked.admin_key) as admin,
            httpx.Client(base_url=hooks_mlflow.url + "/api/2.0/mlflow", timeout=30) as mlflow,
        ):
            deadline = time.monotonic() + 60
            while not mlflow.get("/webhooks").json().get("webhooks") and time.monotonic() < deadline:
                time.sleep(0.2)  # subscribed in the background at start
            assert mlflow.post("/registered-models/create", json={"name": name}).status_code == 200
            # The model predates nothing: the reconciler would see it only in an hour; the webhook says it now.
            found = wait_for_events(admin, name, 1, timeout=30)
            assert [e["type"] for e in found] == [types.REGISTERED_MODEL_CREATED], hooked.logs()[-3000:]
            assert found[0]["actor"]["kind"] == "mlflow"
            forged = httpx.post(
                f"{hooked.base_url}/api/v1/events/mlflow",
                content=b'{"data": {"name": "x"}}',
                headers={
                    "X-MLflow-Signature": "v1,AAAA",
                    "X-MLflow-Timestamp": str(int(time.time())),
                    "X-MLflow-Delivery-Id": "d",
                },
            )
            assert forged.status_code == 401
    finally:
        hooks_mlflow.stop()


FERNET_KEY = "q3oH7Ka9_-RRcAXrM7V5nGCyVgy8gQ6VDkJc2gUw5p0="


# The detector itself, on SQLite and PostgreSQL, against the session's MLflow.


@pytest.fixture
async def detector_parts(database: Database, mlflow_server):
    upstream = MlflowUpstream(mlflow_server.url, 30.0, breaker=CircuitBreaker())
    yield RegistryClient.over(upstream), database
    await upstream.aclose()


async def _events(database: Database, name: str) -> list[EventRow]:
    from sqlalchemy import select

    async with database.session() as session:
        return list(
            (
                await session.execute(select(EventRow).where(EventRow.model_name == name).order_by(EventRow.seq))
            ).scalars()
        )


@pytest.mark.anyio
async def test_intent_left_by_a_dead_writer_still_names_its_actor(detector_parts):
    mlflow, database = detector_parts
    changes = RegistryChanges(mlflow, database, EventOutbox(database), "test-owner", 3600)
    name = unique("events-intent")
    writer = Actor("api_key", "writer-key", "key123")
    await changes.intent(name, writer)
    await mlflow.create_registered_model(name)  # ... and the process dies before observing
    await changes.reconcile()  # a fresh intent: its writer may still observe, the reconciler leaves the model
    assert await _events(database, name) == []
    async with database.session() as session, session.begin():  # the writer never did: its intent grows stale
        await session.execute(update(ChangeIntentRow).values(created_at=utcnow() - timedelta(minutes=5)))
    assert await changes.reconcile() >= 1
    found = await _events(database, name)
    assert [(e.type, e.actor_kind, e.actor_key_id) for e in found] == [
        (types.REGISTERED_MODEL_CREATED, "api_key", "key123")
    ]
    await mlflow.set_model_tag(name, "later", "x")  # a direct change afterwards: no intent left to borrow
    await changes.reconcile()
    found = await _events(database, name)
    assert [(e.type, e.actor_kind) for e in found][-1] == (types.REGISTERED_MODEL_UPDATED, "mlflow")


@pytest.mark.anyio
async def test_concurrent_observers_announce_each_change_once(detector_parts):
    """Several processes (here: detectors with owners of their own) observing one model at once: compare-and-set on
    the snapshot makes each change one event."""
    mlflow, database = detector_parts
    observers = [RegistryChanges(mlflow, database, EventOutbox(database), f"owner-{i}", 3600) for i in range(4)]
    name = unique("events-race")
    await mlflow.create_registered_model(name)
    for round_ in range(5):
        await mlflow.set_model_tag(name, "round", str(round_))
        counts = await asyncio.gather(*(observer.observe(name) for observer in observers))
        assert sum(counts) == 1  # the first round: created (its tag in the payload), then one update a round
    found = await _events(database, name)
    assert [e.type for e in found] == [types.REGISTERED_MODEL_CREATED] + [types.REGISTERED_MODEL_UPDATED] * 4
    assert found[0].payload["tags"] == {"round": "0"}


def test_models_from_before_the_event_log_are_taken_in_silently():
    before = None
    after = ModelState(
        "old",
        created_ms=1_000,
        updated_ms=2_000,
        versions={
            "1": {"stage": "None", "status": "READY", "description": "", "tags": {}, "source": "s", "run_id": None}
        },
    )
    assert diff(before, after, MLFLOW_ACTOR, origin_ms=5_000) == []
    created = diff(before, after, MLFLOW_ACTOR, origin_ms=500)
    assert [e.type for e in created] == [types.REGISTERED_MODEL_CREATED, types.VERSION_CREATED]
    recreated = diff(after, ModelState("old", created_ms=9_000, updated_ms=9_000), MLFLOW_ACTOR, origin_ms=500)
    assert [e.type for e in recreated] == [types.REGISTERED_MODEL_DELETED, types.REGISTERED_MODEL_CREATED]


def test_event_filters_and_pages(service, reader, writer, model_source):
    name = unique("events-pages")
    assert (
        writer.post(
            "/models/register", json={"model_data": model_source, "model_name": name, "model_type": "classification"}
        ).status_code
        == 201
    )
    for i in range(3):
        assert writer.patch(f"/models/{name}/1", json={"tags": {"i": str(i)}}).status_code == 200
    wait_for_events(reader, name, 5)
    first = reader.get(EVENTS, params={"model": name, "limit": 2}).json()
    assert len(first["events"]) == 2 and first["next_cursor"]
    rest = reader.get(EVENTS, params={"model": name, "limit": 10, "cursor": first["next_cursor"]}).json()
    assert [e["type"] for e in first["events"] + rest["events"]] == [
        types.REGISTERED_MODEL_CREATED,
        types.VERSION_CREATED,
    ] + [types.VERSION_UPDATED] * 3
    only = reader.get(EVENTS, params={"model": name, "type": "registered_model.*"}).json()["events"]
    assert [e["type"] for e in only] == [types.REGISTERED_MODEL_CREATED]
    assert reader.get(EVENTS, params={"type": "nope.*"}).status_code == 400
    assert reader.get(EVENTS, params={"cursor": "abc"}).status_code == 400
    with service.client() as anonymous:
        assert anonymous.get(EVENTS).status_code == 401


def test_settings_know_the_event_options(tmp_path: Path):
    settings = Settings(home=tmp_path, webhook_retry_schedule="1,2")
    assert settings.webhook_retry_delays == (1.0, 2.0)
    with pytest.raises(ValueError):
        Settings(home=tmp_path, webhook_retry_schedule="soon")
    run_migrations(Settings(home=tmp_path).database_dsn)


@pytest.mark.anyio
async def test_reconciler_takes_in_models_from_before_the_log_silently_then_announces_their_changes(detector_parts):
    from sqlalchemy import update

    from hokusai.server.db import utcnow
    from hokusai.server.events.models import EventLogOriginRow, SnapshotModelRow

    mlflow, database = detector_parts
    names = [unique("events-old") for _ in range(3)]
    for name in names:
        await mlflow.create_registered_model(name)
    async with database.session() as session, session.begin():  # the log began after these models
        await session.execute(update(EventLogOriginRow).values(started_at=utcnow() + timedelta(seconds=1)))
    changes = RegistryChanges(mlflow, database, EventOutbox(database), "test-owner", 3600)
    await changes.reconcile()
    async with database.session() as session:
        for name in names:
            assert await session.get(SnapshotModelRow, name) is not None
    assert [await _events(database, name) for name in names] == [[], [], []]
    await mlflow.set_model_tag(names[0], "later", "x")
    await changes.reconcile()
    assert [e.type for e in await _events(database, names[0])] == [types.REGISTERED_MODEL_UPDATED]


def test_a_rename_through_the_gateway_is_the_old_name_deleted_and_the_new_one_created(service, writer, reader):
    old, new = unique("events-rename"), unique("events-renamed")
    api = "/mlflow/api/2.0/mlflow/registered-models"
    assert writer.post(f"{api}/create", json={"name": old}).status_code == 200
    renamed = writer.post(f"{api}/rename", json={"name": old, "new_name": new})
    assert renamed.status_code == 200, renamed.text
    before, after = wait_for_events(reader, old, 2), wait_for_events(reader, new, 1)
    assert [e["type"] for e in before] == [types.REGISTERED_MODEL_CREATED, types.REGISTERED_MODEL_DELETED]
    assert [e["type"] for e in after] == [types.REGISTERED_MODEL_CREATED]
    assert {e["actor"]["kind"] for e in before + after} == {"api_key"}
