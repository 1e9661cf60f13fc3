"""The README's production topology, for real: several `hokusai serve` processes on one PostgreSQL database and one
Redis, in front of an external `mlflow server` (itself on PostgreSQL), with no load balancer (the test is the
client and picks a process).

`running_cluster(...)` starts it and stops it; a test module wraps it in a module-scoped fixture:

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory, postgres_server, redis_url):
        with running_cluster(tmp_path_factory, redis_url, members=3) as started:
            yield started

`cluster.a` / `.b` / `.c` (or `cluster.members[i]`) are `ClusterMember`s: `.url`, `.client(key)`, `.kill()` (SIGKILL
of its process group), `.stop()`, `.restart(**settings)`, `.logs()`; `cluster.add("d", **settings)` starts one more.
Settings are given as in `start_service`: `registry_cache_ttl="60"` is HOKUSAI_REGISTRY_CACHE_TTL=60.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from hokusai.server.auth.keys import generate_api_key
from hokusai.server.mlflow.embedded import free_loopback_port
from tests.conftest import POSTGRES_ADMIN_URL
from tests.support import (
    MlflowServer,
    ServiceProcess,
    create_postgres_database,
    service_environment,
    spawn_service,
    start_mlflow,
    stop_process_group,
    wait_for_status,
)


def as_variables(settings: dict[str, str]) -> dict[str, str]:
    """`registry_cache_ttl="60"` -> `HOKUSAI_REGISTRY_CACHE_TTL=60` (names already in that form are kept)."""
    return {
        name if name.startswith("HOKUSAI_") else f"HOKUSAI_{name.upper()}": value for name, value in settings.items()
    }


def libpq_url(sqlalchemy_url: str) -> str:
    """`postgresql+psycopg://...` -> `postgresql://...`, for psycopg.connect."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


@dataclass
class ClusterMember(ServiceProcess):
    """One `hokusai serve` of the cluster: its own HOME and port, the cluster's database, Redis and MLflow.

    `process` is None until `start()`; `restart()` keeps the port (clients keep their URL) and the HOME."""

    name: str = ""
    args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return self.base_url

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Spawn without waiting (several members then start at the same moment); `wait_ready()` after."""
        assert not self.running, f"{self.name} is already running"
        self.process = spawn_service(self.env, self.log_path, self.args)

    def wait_ready(self, timeout: float = 120.0) -> None:
        wait_for_status(f"{self.url}/ready", timeout=timeout, process=self.process, log=self.log_path)

    def kill(self) -> None:
        """SIGKILL to the whole process group (the service and its model workers): no shutdown code runs."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, SIGKILL after `grace` seconds (requests still running keep a process that long)."""
        if self.process is not None:
            stop_process_group(self.process, grace)

    def restart(self, kill: bool = False, wait: bool = True, args: tuple[str, ...] | None = None, **settings: str):
        """Stop (SIGTERM; SIGKILL with `kill=True`), apply `settings` (and `args`) on top of its environment, start
        again on the same port and HOME, and wait for /ready unless `wait=False`."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.env = {**self.env, **as_variables(settings)}
        if args is not None:
            self.args = args
        self.start()
        if wait:
            self.wait_ready()
        return self


@dataclass
class Cluster:
    mlflow: MlflowServer
    database_url: str  # postgresql+psycopg://, as HOKUSAI_DATABASE_URL takes it
    redis_url: str
    redis_prefix: str
    admin_key: str
    root: Path
    settings: dict[str, str]  # HOKUSAI_* shared by every member
    members: list[ClusterMember] = field(default_factory=list)

    @property
    def a(self) -> ClusterMember:
        return self.members[0]

    @property
    def b(self) -> ClusterMember:
        return self.members[1]

    @property
    def c(self) -> ClusterMember:
        return self.members[2]

    def member(self, name: str, args: tuple[str, ...] = (), **settings: str) -> ClusterMember:
        """A new member (not started): its own HOME and port, the shared settings, then its own `settings`."""
        home = self.root / name
        home.mkdir()
        port = free_loopback_port()
        env = service_environment(
            HOKUSAI_HOME=str(home), HOKUSAI_PORT=str(port), **self.settings, **as_variables(settings)
        )
        member = ClusterMember(
            f"http://127.0.0.1:{port}", home, home / "service.log", None, env, self.admin_key, name=name, args=args
        )
        self.members.append(member)
        return member

    def add(self, name: str, args: tuple[str, ...] = (), **settings: str) -> ClusterMember:
        """Start one more member and wait until it is ready."""
        member = self.member(name, args, **settings)
        member.start()
        member.wait_ready()
        return member

    def create_key(self, scopes: list[str], via: ClusterMember | None = None, **body) -> dict:
        """A key made through the API (of `via`, else the first member) with the bootstrap admin key: the 201 body
        (`key`, `id`, ...)."""
        with (via or self.a).client(self.admin_key) as admin:
            made = admin.post(
                "/api/v1/keys", json={"name": f"cluster {secrets.token_hex(3)}", "scopes": scopes, **body}
            )
        assert made.status_code == 201, made.text
        return made.json()

    def new_key(self, scopes: list[str], via: ClusterMember | None = None, **body) -> str:
        return self.create_key(scopes, via, **body)["key"]

    def query(self, sql: str, *params) -> list[tuple]:
        """Rows of a query on the cluster's service database."""
        with psycopg.connect(libpq_url(self.database_url)) as connection:
            return connection.execute(sql, params).fetchall()

    def mlflow_client(self) -> httpx.Client:
        """MLflow's own REST API, straight (not through a member)."""
        return httpx.Client(base_url=f"{self.mlflow.url}/api/2.0/mlflow", timeout=30)

    def logged_model(self) -> str:
        """A logged model (MLflow 3) made straight in MLflow, for versions to point at: its id (`m-...`)."""
        with self.mlflow_client() as mlflow:
            made = mlflow.post("/logged-models", json={"experiment_id": "0", "name": "cluster-model"})
        made.raise_for_status()
        return made.json()["model"]["info"]["model_id"]

    def registered_model(self, name: str, versions: int = 1) -> str:
        """A registered model with `versions` versions of one logged model, made straight in MLflow (no service
        process is involved, so none has it cached). Returns the logged model's id."""
        model_id = self.logged_model()
        with self.mlflow_client() as mlflow:
            mlflow.post("/registered-models/create", json={"name": name}).raise_for_status()
            for _ in range(versions):
                body = {"name": name, "source": f"models:/{model_id}", "model_id": model_id}
                mlflow.post("/model-versions/create", json=body).raise_for_status()
        return model_id

    def version_in_mlflow(self, name: str, version: str = "1") -> dict:
        """What MLflow itself holds for a version (tags as a dict), read straight from it."""
        with self.mlflow_client() as mlflow:
            got = mlflow.get("/model-versions/get", params={"name": name, "version": version})
        got.raise_for_status()
        found = got.json()["model_version"]
        found["tags"] = {tag["key"]: tag["value"] for tag in found.get("tags", [])}
        return found


def stock_mlflow_server_command(backend_store_uri: str, artifacts: Path, port: int) -> list[str]:
    """`mlflow server` as an operator runs an external MLflow: SQL store, proxied artifacts; one worker here (two
    cores). Jobs are turned off through the environment (MLFLOW_SERVER_ENABLE_JOB_EXECUTION), as in our launcher."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def _drop_databases(names: list[str]) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        for name in names:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _delete_prefixed(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


@contextlib.contextmanager
def running_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    members: int = 3,
    per_member: Sequence[dict[str, str]] = (),
    **settings: str,
) -> Iterator[Cluster]:
    """An external MLflow on a fresh PostgreSQL database, a fresh service database, and `members` `hokusai serve`
    processes started at the same moment on it (migrations and the first admin key race, as in a rollout), all
    ready when this yields. Everything (processes, both databases, the Redis keys) is gone afterwards. `settings`
    apply to every member; `per_member[i]`, to the i-th only (e.g. `[{}, {"cache_single_flight": "false"}]`).

    Needs the `postgres_server` and `redis_url` fixtures (which skip or fail when the services are missing)."""
    root = tmp_path_factory.mktemp("cluster")
    created: list[str] = []
    prefix = f"hokusai-cluster-{secrets.token_hex(4)}:"
    processes: list[ClusterMember] = []
    mlflow: MlflowServer | None = None
    try:
        mlflow_database, mlflow_url = create_postgres_database(POSTGRES_ADMIN_URL, "mlflow")
        created.append(mlflow_database)
        service_database, service_url = create_postgres_database(POSTGRES_ADMIN_URL, "hokusai_cluster")
        created.append(service_database)
        (root / "mlflow").mkdir()
        port = free_loopback_port()
        mlflow = start_mlflow(
            stock_mlflow_server_command(mlflow_url, root / "mlflow" / "artifacts", port),
            port,
            root / "mlflow" / "mlflow.log",
            env={**service_environment(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        admin_key = generate_api_key()
        shared = {
            "HOKUSAI_ENVIRONMENT": "production",  # the profile checks what the topology is: PostgreSQL, Redis, MLflow
            "HOKUSAI_DATABASE_URL": service_url,
            "HOKUSAI_MLFLOW_URL": mlflow.url,
            "HOKUSAI_REDIS_URL": redis_url,
            "HOKUSAI_REDIS_PREFIX": prefix,
            "HOKUSAI_BOOTSTRAP_ADMIN_KEY": admin_key,
            **as_variables(settings),
        }
        cluster = Cluster(mlflow, service_url, redis_url, prefix, admin_key, root, shared)
        processes = cluster.members
        for index in range(members):
            cluster.member("abcdefgh"[index], **(per_member[index] if index < len(per_member) else {}))
        for member in cluster.members:  # spawned back to back: their starts (imports, migrations, bootstrap) overlap
            member.start()
        for member in cluster.members:
            member.wait_ready()
        yield cluster
    finally:
        for member in processes:  # a test may leave requests waiting (on a dead member's model lock): no long grace
            member.stop(grace=3.0)
        if mlflow is not None:
            mlflow.stop()
        if created:
            _drop_databases(created)
        _delete_prefixed(redis_url, prefix)
