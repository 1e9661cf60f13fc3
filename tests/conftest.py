"""Shared fixtures: one real MLflow server per session, real service processes, the machine's Postgres and Redis.

Outside CI the Postgres and Redis tests skip with a message saying how to enable them; under CI=true a missing
service fails the run instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator

import psycopg
import pytest
import redis

from hokusai.server.config import Settings
from hokusai.server.db import Database, run_migrations
from hokusai.server.mlflow.embedded import embedded_mlflow_command, free_loopback_port
from tests.fake_lm import FakeLanguageModel
from tests.support import (
    MlflowServer,
    PrivateRedis,
    Service,
    ServiceFactory,
    create_postgres_database,
    start_mlflow,
    unavailable,
)

POSTGRES_ADMIN_URL = os.environ.get("HOKUSAI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("HOKUSAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real MLflow server (SQLite store, one worker, jobs off) shared by the session."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_loopback_port()
    server = start_mlflow(embedded_mlflow_command(home, "127.0.0.1", port), port, home / "mlflow.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def start_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Service]]:
    """Starts services (in this process; `process=True` for a `hokusai serve` process); each is stopped at the end
    of the module that started it."""
    factory = ServiceFactory(tmp_path_factory)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer) -> Iterator[Service]:
    """The shared service (in this process): SQLite database, the session's MLflow, a 1 s key cache so revocations
    show quickly, and room for the many registrations the registry tests make (the 20/minute policy has tests of its
    own). One per session, so one per xdist worker."""
    factory = ServiceFactory(tmp_path_factory)
    yield factory(
        mlflow_url=mlflow_server.url,
        auth_cache_ttl="1",
        rate_limit_registration="1000/minute",
        webhook_allow_private="true",  # the tests' webhook receivers listen on loopback
    )
    factory.stop_all()


@pytest.fixture(scope="module")
def service_process(start_service: Callable[..., Service], mlflow_server: MlflowServer) -> Service:
    """A `hokusai serve` process with the shared service's settings, for tests about the process (its RSS)."""
    return start_service(
        process=True, mlflow_url=mlflow_server.url, auth_cache_ttl="1", rate_limit_registration="1000/minute"
    )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[list[str]]:
    """Checks the machine's PostgreSQL once; drops every database the tests created at the end."""
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute("SELECT 1")
    except psycopg.Error as exc:
        unavailable("PostgreSQL", "start it (see .ci/run) or set HOKUSAI_TEST_POSTGRES_URL", exc)
    created: list[str] = []
    yield created
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        for name in created:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_server: list[str]) -> str:
    """A fresh, empty database on the machine's PostgreSQL for this test."""
    name, url = create_postgres_database(POSTGRES_ADMIN_URL, "hokusai_test")
    postgres_server.append(name)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Database]:
    """A migrated service database, once on SQLite and once on the machine's PostgreSQL."""
    settings = Settings(home=tmp_path)
    if request.param == "postgresql":
        settings = Settings(home=tmp_path, database_url=request.getfixturevalue("postgres_url"))
    run_migrations(settings.database_dsn)
    migrated = Database(settings.async_database_dsn)
    yield migrated
    await migrated.dispose()


@pytest.fixture(scope="session")
def fake_lm() -> Iterator[FakeLanguageModel]:
    """The OpenAI-compatible language model server of the DSPy tests (tests/fake_lm.py)."""
    server = FakeLanguageModel()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        unavailable("Redis", "start it (see .ci/run) or set HOKUSAI_TEST_REDIS_URL", exc)
    return REDIS_TEST_URL


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def keys(service: Service, request: pytest.FixtureRequest) -> dict[str, str]:
    """A read key and a write key on the shared service, new for each test module."""
    made = {}
    with service.client(service.admin_key) as admin:
        for scope in ("read", "write"):
            answer = admin.post("/api/v1/keys", json={"name": f"{request.module.__name__} {scope}", "scopes": [scope]})
            made[scope] = answer.json()["key"]
    return made


@pytest.fixture(scope="module")
def writer(service: Service, keys: dict[str, str]):
    with service.client(keys["write"]) as client:
        yield client


@pytest.fixture(scope="module")
def reader(service: Service, keys: dict[str, str]):
    with service.client(keys["read"]) as client:
        yield client


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of this test alone (it may be stopped or paused), stopped at the end."""
    server = PrivateRedis()
    yield server
    server.stop()
