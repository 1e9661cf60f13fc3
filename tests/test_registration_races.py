"""Registrations racing across service processes (issue 14): abandoned Idempotency-Keys, a new model's id, and
`hokusai doctor`.

Real MLflow (the session's server) and real databases: SQLite and a fresh PostgreSQL database. Two service
processes are two `RegistryService`s, each with its own database engine and MLflow client, sharing the database
and MLflow; their calls interleave at every await, as two processes' requests do.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update

from hokusai.server.auth.caller import Caller
from hokusai.server.auth.keys import Scope
from hokusai.server.config import Settings
from hokusai.server.db import Database, run_migrations, utcnow
from hokusai.server.errors import Conflict
from hokusai.server.mlflow.breaker import CircuitBreaker
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.registry.cache import RegistryReadCache
from hokusai.server.registry.models import IdempotencyRow, ModelIdRow
from hokusai.server.registry.registration import (
    MODEL_ID_TAG,
    REQUEST_TAG,
    IdempotencyStore,
    Reservation,
    request_tag,
)
from hokusai.server.registry.schemas import RegisterRequest
from hokusai.server.registry.service import RegistryService
from tests.support import run_cli, service_environment

pytestmark = pytest.mark.anyio
API = "/api/2.0/mlflow"
WRITER = Caller(id="key_races", name="races", scopes=frozenset({Scope.WRITE}))


def mlflow_call(mlflow_url: str, method: str, path: str, **kwargs) -> dict:
    answer = httpx.request(method, f"{mlflow_url}{API}{path}", timeout=30, **kwargs)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def source(mlflow_server) -> str:
    """A logged model (MLflow 3) to register versions of: `models:/m-...`."""
    made = mlflow_call(mlflow_server.url, "POST", "/logged-models", json={"experiment_id": "0", "name": "races"})
    return f"models:/{made['model']['info']['model_id']}"


def versions(mlflow_url: str, name: str) -> list[dict]:
    found = mlflow_call(mlflow_url, "GET", "/model-versions/search", params={"filter": f"name = '{name}'"})
    return found.get("model_versions", [])


def model_tag(mlflow_url: str, name: str) -> str | None:
    model = mlflow_call(mlflow_url, "GET", "/registered-models/get", params={"name": name})["registered_model"]
    return {tag["key"]: tag["value"] for tag in model.get("tags", [])}.get(MODEL_ID_TAG)


def database_url(database: Database) -> str:
    return database.engine.url.render_as_string(hide_password=False)


class Services:
    """Registry services over one database and one MLflow, each with engines and clients of its own."""

    def __init__(self, mlflow_url: str, url: str) -> None:
        self.mlflow_url, self.url = mlflow_url, url
        self._opened: list[Database | MlflowUpstream] = []

    def __call__(self, pending_seconds: float = 300.0) -> RegistryService:
        database = Database(self.url)
        upstream = MlflowUpstream(self.mlflow_url, 30.0, breaker=CircuitBreaker())
        self._opened += [database, upstream]
        return RegistryService(upstream, database, RegistryReadCache(0), idempotency_pending_seconds=pending_seconds)

    async def close(self) -> None:
        for opened in self._opened:
            await (opened.dispose() if isinstance(opened, Database) else opened.aclose())


@pytest.fixture
async def services(mlflow_server, database) -> AsyncIterator[Services]:
    made = Services(mlflow_server.url, database_url(database))
    yield made
    await made.close()


def request_for(source: str, name: str) -> RegisterRequest:
    return RegisterRequest(model_data=source, model_type="classifier", model_name=name, metadata={"team": "races"})


async def backdate(database: Database, idempotency_key: str, seconds: float) -> None:
    """Time passing for a pending reservation: its created_at moved into the past."""
    async with database.session() as session, session.begin():
        await session.execute(
            update(IdempotencyRow)
            .where(IdempotencyRow.idempotency_key == idempotency_key)
            .values(created_at=utcnow() - timedelta(seconds=seconds))
        )


# --- an Idempotency-Key left pending by a process that died ----------------------------------------------------


async def test_a_pending_key_answers_409_until_it_expires_then_one_retry_registers_once(
    services, database, source, mlflow_server
):
    service = services(pending_seconds=60)
    name, key = f"races-pending-{secrets.token_hex(3)}", secrets.token_hex(8)
    request = request_for(source, name)
    # The killed process: it reserved the key and never answered.
    dead = await IdempotencyStore(database).reserve(WRITER.id, key, IdempotencyStore.fingerprint(request.model_dump()))
    assert isinstance(dead, Reservation) and not dead.taken_over

    with pytest.raises(Conflict, match="still being processed"):
        await service.register(request, WRITER, key)  # the first attempt may still be running
    await backdate(database, key, 61)

    answer = await service.register(request, WRITER, key)
    assert answer.model_name == name and answer.version == "1"
    assert await service.register(request, WRITER, key) == answer  # kept: later retries get it again
    made = versions(mlflow_server.url, name)
    assert len(made) == 1
    assert {t["key"]: t["value"] for t in made[0]["tags"]}[REQUEST_TAG] == request_tag(WRITER.id, key)
    assert key not in json.dumps(made)  # the raw Idempotency-Key is never written to MLflow


async def test_a_retry_after_expiry_answers_with_the_version_the_dead_attempt_made(
    services, database, source, mlflow_server
):
    service = services(pending_seconds=60)
    name, key = f"races-made-{secrets.token_hex(3)}", secrets.token_hex(8)
    request = request_for(source, name)
    await IdempotencyStore(database).reserve(WRITER.id, key, IdempotencyStore.fingerprint(request.model_dump()))
    # The dead attempt got as far as making the version (tagged with its request) and died before answering.
    mlflow_call(mlflow_server.url, "POST", "/registered-models/create", json={"name": name})
    made = mlflow_call(
        mlflow_server.url,
        "POST",
        "/model-versions/create",
        json={
            "name": name,
            "source": source,
            "model_id": source.removeprefix("models:/"),
            "tags": [{"key": REQUEST_TAG, "value": request_tag(WRITER.id, key)}],
        },
    )["model_version"]
    await backdate(database, key, 61)

    answer = await service.register(request, WRITER, key)
    assert answer.version == made["version"] == "1"
    assert len(versions(mlflow_server.url, name)) == 1  # no second version
    async with database.session() as session:
        assert answer.model_id == await session.scalar(select(ModelIdRow.model_id).where(ModelIdRow.name == name))
    assert await service.register(request, WRITER, key) == answer


async def test_two_retries_taking_over_at_once_one_proceeds(database):
    stores = [IdempotencyStore(Database(database_url(database)), pending_seconds=60) for _ in range(2)]
    try:
        for _ in range(10):
            key = secrets.token_hex(8)
            await stores[0].reserve(WRITER.id, key, "f" * 64)  # left pending by a dead process
            await backdate(database, key, 61)
            outcomes = await asyncio.gather(
                *(store.reserve(WRITER.id, key, "f" * 64) for store in stores), return_exceptions=True
            )
            taken = [o for o in outcomes if isinstance(o, Reservation)]
            refused = [o for o in outcomes if isinstance(o, Conflict)]
            assert len(taken) == 1 and taken[0].taken_over, outcomes
            assert len(refused) == 1 and "still being processed" in refused[0].detail, outcomes
    finally:
        for store in stores:
            await store._database.dispose()


async def test_two_registrations_retrying_an_expired_key_at_once_make_one_version(
    services, database, source, mlflow_server
):
    first, second = services(pending_seconds=60), services(pending_seconds=60)
    name, key = f"races-retries-{secrets.token_hex(3)}", secrets.token_hex(8)
    request = request_for(source, name)
    await IdempotencyStore(database).reserve(WRITER.id, key, IdempotencyStore.fingerprint(request.model_dump()))
    await backdate(database, key, 61)
    outcomes = await asyncio.gather(
        first.register(request, WRITER, key), second.register(request, WRITER, key), return_exceptions=True
    )
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(answered) == 1 and sum(isinstance(o, Conflict) for o in outcomes) == 1, outcomes
    assert len(versions(mlflow_server.url, name)) == 1
    assert await second.register(request, WRITER, key) == answered[0]


async def test_a_failed_attempt_whose_key_was_taken_over_leaves_the_successor_holding_it(database):
    store = IdempotencyStore(database, pending_seconds=60)
    key = secrets.token_hex(8)
    slow = await store.reserve(WRITER.id, key, "f" * 64)
    await backdate(database, key, 61)
    successor = await store.reserve(WRITER.id, key, "f" * 64)
    assert isinstance(successor, Reservation) and successor.taken_over
    await store.release(slow)  # the slow first attempt fails at last: it must not free its successor's key
    with pytest.raises(Conflict, match="still being processed"):
        await store.reserve(WRITER.id, key, "f" * 64)
    await store.complete(successor, {"version": "1"})
    assert await store.reserve(WRITER.id, key, "f" * 64) == {"version": "1"}


async def test_the_pending_window_comes_from_the_setting(start_service, mlflow_server, source):
    """Through HTTP: a 30 s window (HOKUSAI_IDEMPOTENCY_PENDING_SECONDS) takes over a key left 60 s ago, which the
    default 300 s would still refuse; a fresh one is refused."""
    service = start_service(mlflow_url=mlflow_server.url, idempotency_pending_seconds="30")
    with service.client(service.admin_key) as admin:
        made = admin.post("/api/v1/keys", json={"name": "pending window", "scopes": ["write"]}).json()
    settings = Settings(home=service.home)
    database = Database(settings.async_database_dsn)
    request = request_for(source, f"races-http-{secrets.token_hex(3)}")
    body = request.model_dump(exclude_none=True)
    try:
        with service.client(made["key"]) as writer:
            for key in ("fresh", "abandoned"):
                await IdempotencyStore(database).reserve(
                    made["id"], key, IdempotencyStore.fingerprint(request.model_dump())
                )
            await backdate(database, "abandoned", 60)
            refused = writer.post("/models/register", json=body, headers={"Idempotency-Key": "fresh"})
            assert refused.status_code == 409 and "still being processed" in refused.json()["detail"]
            taken = writer.post("/models/register", json=body, headers={"Idempotency-Key": "abandoned"})
            assert taken.status_code == 201, taken.text
    finally:
        await database.dispose()


# --- a new model registered by two processes at once ----------------------------------------------------------


async def test_two_services_registering_a_new_model_at_once_agree_on_its_id(services, database, source, mlflow_server):
    first, second = services(), services()
    for attempt in range(10):
        name = f"races-new-{attempt}-{secrets.token_hex(3)}"
        answers = await asyncio.gather(
            first.register(request_for(source, name), WRITER, None),
            second.register(request_for(source, name), WRITER, None),
        )
        async with database.session() as session:
            row = await session.scalar(select(ModelIdRow.model_id).where(ModelIdRow.name == name))
        assert {a.model_id for a in answers} == {row}, attempt
        assert model_tag(mlflow_server.url, name) == row, attempt
        made = versions(mlflow_server.url, name)
        assert len(made) == 2
        assert all({t["key"]: t["value"] for t in v["tags"]}[MODEL_ID_TAG] == row for v in made), attempt


async def test_metadata_cannot_replace_the_service_tags(services, source, mlflow_server):
    name = f"races-forged-{secrets.token_hex(3)}"
    forged = RegisterRequest(
        model_data=source,
        model_type="c",
        model_name=name,
        metadata={MODEL_ID_TAG: "mdl_forged", REQUEST_TAG: "forged"},
    )
    answer = await services().register(forged, WRITER, "forging")
    tags = {t["key"]: t["value"] for t in versions(mlflow_server.url, name)[0]["tags"]}
    assert tags[MODEL_ID_TAG] == answer.model_id and tags[REQUEST_TAG] == request_tag(WRITER.id, "forging")


# --- hokusai doctor --------------------------------------------------------------------------------------------


def doctor(env: dict[str, str], *args: str) -> tuple[int, dict, str]:
    ran = run_cli("doctor", "--json", *args, env=env)
    assert "Traceback" not in ran.stderr, ran.stderr
    return ran.returncode, json.loads(ran.stdout) if ran.stdout.strip() else {}, ran.stderr


def mine(report: dict, names: set[str]) -> dict[str, dict]:
    """The findings about this test's models (the session's MLflow holds other tests' models too)."""
    return {f["name"]: f for f in report["findings"] if f["name"] in names}


@pytest.mark.postgres
async def test_doctor_finds_a_planted_mismatch_and_repair_fixes_it(postgres_url, tmp_path, source, mlflow_server):
    """On PostgreSQL, the deployment the issue is about (the CLI reads the rows with the same code on SQLite)."""
    settings = Settings(home=tmp_path, database_url=postgres_url)
    run_migrations(settings.database_dsn)
    env = service_environment(
        HOKUSAI_HOME=str(tmp_path), HOKUSAI_MLFLOW_URL=mlflow_server.url, HOKUSAI_DATABASE_URL=postgres_url
    )
    made = Services(mlflow_server.url, settings.async_database_dsn)
    try:
        service = made()
        suffix = secrets.token_hex(3)
        good, planted, gone, untracked = (
            f"doctor-{what}-{suffix}" for what in ("good", "planted", "gone", "untracked")
        )
        for name in (good, planted):
            await service.register(request_for(source, name), WRITER, None)
        async with service._database.session() as session, session.begin():
            session.add(ModelIdRow(model_id="mdl_" + "0" * 24, name=gone, created_at=utcnow()))
    finally:
        await made.close()
    mlflow_call(
        mlflow_server.url,
        "POST",
        "/registered-models/set-tag",
        json={"name": planted, "key": MODEL_ID_TAG, "value": "mdl_wrong"},
    )
    mlflow_call(mlflow_server.url, "POST", "/registered-models/create", json={"name": untracked})
    mlflow_call(
        mlflow_server.url,
        "POST",
        "/registered-models/set-tag",
        json={"name": untracked, "key": MODEL_ID_TAG, "value": "mdl_" + "1" * 24},
    )
    names = {good, planted, gone, untracked}

    code, report, stderr = doctor(env)
    assert code == 1 and stderr.strip() == "Run `hokusai doctor --repair` to set those tags to the database's ids"
    found = mine(report, names)
    assert set(found) == {planted, gone, untracked}  # the good one agrees
    assert found[planted]["kind"] == "mismatch" and found[planted]["mlflow_tag"] == "mdl_wrong"
    assert not found[planted]["repaired"] and model_tag(mlflow_server.url, planted) == "mdl_wrong"
    assert found[gone]["kind"] == "no_model" and found[untracked]["kind"] == "no_row"

    repaired = run_cli("doctor", "--repair", env=env)
    assert repaired.returncode == 0, repaired.stderr
    assert f"mismatch  {planted}: database {found[planted]['database_id']}, MLflow tag mdl_wrong (repaired)" in (
        repaired.stdout
    )
    assert f"no model  {gone}: database mdl_{'0' * 24}" in repaired.stdout and "Checked " in repaired.stdout
    assert model_tag(mlflow_server.url, planted) == found[planted]["database_id"]

    code, report, _ = doctor(env)
    assert code == 0 and set(mine(report, names)) == {gone, untracked}  # still reported, but not mismatches


def test_doctor_says_in_one_line_when_mlflow_cannot_be_reached(tmp_path):
    settings = Settings(home=tmp_path)
    run_migrations(settings.database_dsn)
    env = service_environment(HOKUSAI_HOME=str(tmp_path), HOKUSAI_MLFLOW_URL="http://127.0.0.1:9")
    ran = run_cli("doctor", env=env)
    assert ran.returncode == 2 and ran.stderr.startswith("error: MLflow is not reachable")
    assert len(ran.stderr.strip().splitlines()) == 1 and "Traceback" not in ran.stderr


def test_doctor_refuses_a_home_without_a_database(tmp_path):
    env = service_environment(HOKUSAI_HOME=str(tmp_path), HOKUSAI_MLFLOW_URL="http://127.0.0.1:9")
    ran = run_cli("doctor", env=env)
    assert ran.returncode == 2 and "no Hokusai database" in ran.stderr
