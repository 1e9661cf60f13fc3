"""The audit log: every write request recorded with who, when and what (never a key, body or query string),
readable by admins over `GET /api/v1/audit` and with `hokusai audit`; the server commands record themselves."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import signal
import sqlite3
import uuid
from datetime import timedelta

import pytest

from hokusai.server.audit.store import AuditEntry, AuditFilter, AuditLog, AuditStore
from hokusai.server.db import utcnow

AUDIT_URL = "/api/v1/audit"
BODY_MARKER = "body-text-that-must-not-be-kept"


def make_key(service, scopes: list[str], name: str) -> dict:
    with service.client(service.admin_key) as admin:
        response = admin.post("/api/v1/keys", json={"name": name, "scopes": scopes})
    assert response.status_code == 201, response.text
    return response.json()


def audit_page(service, **params) -> dict:
    with service.client(service.admin_key) as admin:
        response = admin.get(AUDIT_URL, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def stored_rows(service) -> str:
    """Every stored audit row, as text: what a database reader would see."""
    with sqlite3.connect(service.home / "hokusai.db") as connection:
        return repr(connection.execute("SELECT * FROM audit_log").fetchall())


@pytest.fixture(scope="module")
def auditor(service) -> dict:
    return make_key(service, ["admin"], f"auditor-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def writes(service, auditor) -> dict:
    """One write of each kind, made with the auditor key; returns what the tests look for."""
    suffix = uuid.uuid4().hex[:8]
    made: dict = {}
    with service.client(auditor["key"]) as client:
        made["patch"] = client.patch(f"/models/audit-model-{suffix}/1", json={"description": BODY_MARKER})
        created = client.post("/api/v1/keys", json={"name": f"audited-{suffix}", "scopes": ["read"]})
        assert created.status_code == 201, created.text
        made["created"] = created.json()
        assert client.delete(f"/api/v1/keys/{made['created']['id']}").status_code == 200
        assert client.post("/health/mlflow/reset").status_code == 200
        program = {
            "program_id": f"audit-program-{suffix}",
            "name": "Audited",
            "version": "1.0.0",
            "module": "Predict",
            "signature": "question -> answer",
            "instructions": BODY_MARKER,
            "demos": [],
        }
        declared = client.post("/api/v1/dspy/programs", json=program)
        assert declared.status_code == 201, declared.text
        made["program_id"] = program["program_id"]
        experiment = client.post("/mlflow/api/2.0/mlflow/experiments/create", json={"name": f"audit-{suffix}"})
        assert experiment.status_code == 200, experiment.text
        # Reads: a GET and a POST the scope table classifies as a read.
        assert client.get("/models").status_code == 200
        assert client.post("/mlflow/api/2.0/mlflow/experiments/search", json={"max_results": 1}).status_code == 200
    with service.client() as anonymous:
        made["unauthenticated"] = anonymous.post(
            f"/api/v1/keys?api_key=hk_live_{suffix}notakey", json={"name": BODY_MARKER}
        )
    return made


def test_every_kind_of_write_is_recorded_with_its_actor_route_and_targets(service, auditor, writes):
    records = audit_page(service, key_id=auditor["id"], limit=50)["records"]
    seen = {(record["method"], record["route"]): record for record in records}
    assert all(record["actor"] == auditor["name"] and record["key_id"] == auditor["id"] for record in records)
    assert all(record["address"] == "127.0.0.1" for record in records)

    patch = seen[("PATCH", "/models/{model_name}/{version}")]
    assert patch["targets"]["model_name"].startswith("audit-model-") and patch["targets"]["version"] == "1"
    assert patch["status"] == writes["patch"].status_code
    assert seen[("POST", "/api/v1/keys")]["status"] == 201
    revoked = seen[("DELETE", "/api/v1/keys/{key_id}")]
    assert revoked["targets"] == {"key_id": writes["created"]["id"]} and revoked["status"] == 200
    assert seen[("POST", "/health/mlflow/reset")]["status"] == 200
    assert seen[("POST", "/api/v1/dspy/programs")]["status"] == 201
    gateway = seen[("POST", "/mlflow/api/2.0/mlflow/experiments/create")]
    assert gateway["status"] == 200 and gateway["targets"] == {}

    # Reads are not recorded: neither the GET nor the POST the MLflow scope table calls a read.
    assert not any(record["method"] == "GET" for record in records)
    assert not any(record["route"].endswith("/experiments/search") for record in records)
    assert len(records) == 6


def test_an_unauthenticated_write_is_recorded_without_a_key(service, writes):
    assert writes["unauthenticated"].status_code == 401
    records = audit_page(service, route="/api/v1/keys", status=401)["records"]
    assert records and records[0]["key_id"] is None and records[0]["actor"] == "anonymous"
    assert records[0]["address"] == "127.0.0.1" and records[0]["method"] == "POST"


def test_no_key_body_or_query_string_is_stored(service, auditor, writes):
    stored = stored_rows(service)
    assert auditor["id"] in stored  # the rows are there
    for secret in (auditor["key"], writes["created"]["key"], service.admin_key, BODY_MARKER, "api_key", "notakey"):
        assert secret not in stored


def test_filters_and_cursor_pagination(service, auditor, writes):
    everything = audit_page(service, key_id=auditor["id"], limit=50)["records"]
    pages, cursor = [], None
    while True:
        params = {"key_id": auditor["id"], "limit": 2} | ({"cursor": cursor} if cursor else {})
        page = audit_page(service, **params)
        pages.extend(page["records"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [record["id"] for record in pages] == [record["id"] for record in everything]
    times = [record["at"] for record in everything]
    assert times == sorted(times, reverse=True)  # newest first

    deletes = audit_page(service, key_id=auditor["id"], method="DELETE")["records"]
    assert [record["route"] for record in deletes] == ["/api/v1/keys/{key_id}"]
    created = audit_page(service, key_id=auditor["id"], status=201)["records"]
    assert {record["route"] for record in created} == {"/api/v1/keys", "/api/v1/dspy/programs"}
    newest = everything[0]["at"]
    assert audit_page(service, key_id=auditor["id"], since=newest)["records"][0]["id"] == everything[0]["id"]
    assert all(
        r["id"] != everything[0]["id"] for r in audit_page(service, key_id=auditor["id"], until=newest)["records"]
    )
    with service.client(service.admin_key) as admin:
        assert admin.get(AUDIT_URL, params={"cursor": "not-a-cursor"}).status_code == 400
        assert admin.get(AUDIT_URL, params={"limit": 501}).status_code == 422


def test_only_admins_read_the_audit_log(service):
    writer = make_key(service, ["read", "write"], "audit-writer")
    with service.client(writer["key"]) as client:
        assert client.get(AUDIT_URL).status_code == 403
    with service.client() as anonymous:
        assert anonymous.get(AUDIT_URL).status_code == 401


def test_the_cli_lists_the_log_and_records_its_own_writes(service):
    created = service.cli("keys", "create", "--name", "cli-audited", "--json")
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout)["id"]
    assert service.cli("keys", "revoke", key_id).returncode == 0

    listed = service.cli("audit", "--json", "--limit", "5")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    actor = f"cli:{getpass.getuser()}"
    assert [(row["actor"], row["route"], row["targets"]) for row in rows[:2]] == [
        (actor, "keys revoke", {"key_id": key_id}),
        (actor, "keys create", {"key_id": key_id}),
    ]
    assert json.loads(created.stdout)["key"] not in listed.stdout
    human = service.cli("audit", "--limit", "1")
    assert human.returncode == 0 and actor in human.stdout and "keys revoke" in human.stdout
    failed = service.cli("keys", "revoke", "key_unknown")
    assert failed.returncode == 1
    last = json.loads(service.cli("audit", "--json", "--limit", "1").stdout)[0]
    assert last["route"] == "keys revoke" and last["status"] == 404


def entry(key_id: str, age: timedelta, route: str = "/models/{model_name}") -> AuditEntry:
    return AuditEntry(
        key_id=key_id,
        actor="k",
        address="10.0.0.1",
        method="PATCH",
        route=route,
        targets={},
        status=200,
        at=utcnow() - age,
    )


@pytest.mark.anyio
async def test_retention_deletes_old_rows_only(database):
    store = AuditStore(database)
    await store.add_many([entry("key_old", timedelta(days=3)), entry("key_new", timedelta(hours=1))])
    log = AuditLog(store, retention_days=2)
    assert await log.apply_retention() == 1
    assert await log.apply_retention() == 0  # idempotent: every process may run it
    rows, _ = await store.list(AuditFilter(), limit=10)
    assert [row.key_id for row in rows] == ["key_new"]


@pytest.mark.anyio
async def test_buffered_rows_are_written_on_close_and_paged_by_time(database):
    log = AuditLog(AuditStore(database), retention_days=90)
    await log.start()
    for minutes in range(5):
        log.record(entry(f"key_{minutes}", timedelta(minutes=minutes)))
    await log.aclose()  # a clean shutdown loses nothing
    first, cursor = await log.store.list(AuditFilter(), limit=3)
    second, end = await log.store.list(AuditFilter(), limit=3, cursor=cursor)
    assert [row.key_id for row in first + second] == [f"key_{minutes}" for minutes in range(5)]
    assert end is None
    only, _ = await log.store.list(AuditFilter(key_id="key_2", method="patch"), limit=10)
    assert [row.key_id for row in only] == ["key_2"]


def test_an_acknowledged_write_keeps_its_row_through_kill_9(start_service, mlflow_server):
    """The row of a 2xx write is committed before the answer ends: a process killed right after keeps it."""
    process = start_service(process=True, mlflow_url=mlflow_server.url)
    with process.client(process.admin_key) as admin:
        names = [f"durable-audit-{i}" for i in range(5)]
        for name in names:
            assert admin.post("/api/v1/keys", json={"name": name, "scopes": ["read"]}).status_code == 201
    os.killpg(process.process.pid, signal.SIGKILL)
    process.process.wait(30)
    listed = process.cli("audit", "--json", "--limit", "50")
    assert listed.returncode == 0, listed.stderr
    created = [row for row in json.loads(listed.stdout) if row["route"] == "/api/v1/keys" and row["method"] == "POST"]
    assert len(created) == len(names) and {row["status"] for row in created} == {201}


@pytest.mark.anyio
async def test_durable_rows_share_a_commit(database):
    log = AuditLog(AuditStore(database), retention_days=90)
    await log.start()
    try:
        await asyncio.gather(*(log.record_durably(entry(f"key_{i}", timedelta(0))) for i in range(20)))
        rows, _ = await log.store.list(AuditFilter(), limit=50)  # committed: visible without a flush
        assert sorted(row.key_id for row in rows) == sorted(f"key_{i}" for i in range(20))
    finally:
        await log.aclose()
