"""Helpers for tests that start services (in this process or as real processes), MLflow, the CLI."""

from __future__ import annotations

import asyncio
import contextvars
import http.server
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from hokusai.server.auth.keys import generate_api_key
from hokusai.server.mlflow.embedded import free_loopback_port

IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(service: str, how: str, error: Exception) -> None:
    """Skip outside CI, fail under CI (where the service must be there)."""
    message = f"{service} is not reachable ({error}); {how}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def wait_for_status(
    url: str, status: int = 200, timeout: float = 90.0, process: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            output = log.read_text() if log and log.exists() else ""
            raise RuntimeError(f"process exited with {process.returncode} while waiting for {url}:\n{output[-4000:]}")
        try:
            last = httpx.get(url, timeout=2).status_code
            if last == status:
                return
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last: {last})")


def stop_process_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen

    def stop(self) -> None:
        stop_process_group(self.process)


def start_mlflow(command: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> MlflowServer:
    """An MLflow server command in its own process group (stopped as a whole), output to `log`; returned once its
    /health answers."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_status(f"{url}/health", process=process, log=log)
    except BaseException:
        stop_process_group(process)
        raise
    return MlflowServer(url, process)


def create_postgres_database(admin_url: str, prefix: str) -> tuple[str, str]:
    """A fresh, empty database `<prefix>_<random>` on the PostgreSQL server of `admin_url` (a libpq URL):
    its name, and its `postgresql+psycopg://` URL. The caller drops it."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


@dataclass
class ServiceProcess:
    """A `hokusai serve` process started the way a user starts it."""

    base_url: str
    home: Path
    log_path: Path
    process: subprocess.Popen
    env: dict[str, str]
    admin_key: str | None = None

    def client(self, key: str | None = None, timeout: float | httpx.Timeout = 30, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, **kwargs)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run the `hokusai` CLI against this service's database."""
        return run_cli(*args, env=self.env)

    def stop(self) -> None:
        stop_process_group(self.process)


# Which in-process service a log record belongs to: set in the thread that runs the service's event loop, so its
# tasks and the worker threads they start (anyio and asyncio copy the context) carry it.
_RUNNING_SERVICE: contextvars.ContextVar[object | None] = contextvars.ContextVar("running_service", default=None)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"  # hokusai.server.logs's


class _OwnRecords(logging.Filter):
    def __init__(self, owner: object) -> None:
        super().__init__()
        self.owner = owner

    def filter(self, record: logging.LogRecord) -> bool:
        return _RUNNING_SERVICE.get() is self.owner


@dataclass
class InProcessService:
    """`create_app(settings)` served by uvicorn, as `hokusai serve` serves it (same protocol class, connection
    limit, no access log), on a loopback port from a thread of the test process: the same HTTP contract without a
    process start. Its settings come from HOKUSAI_* variables written to a dotenv file, parsed as the environment
    of `hokusai serve` is; its log records (the formatter and filter of `configure_logging`) go to `log_path`.

    Not for what is about processes: signals, RSS, process-wide state read back (the Prometheus breaker gauges),
    the embedded MLflow child, several service processes on one Redis. `process` is None."""

    base_url: str
    home: Path
    log_path: Path
    env: dict[str, str]
    admin_key: str | None = None
    process: None = None
    _server: object | None = None
    _thread: threading.Thread | None = None
    _handler: logging.Handler | None = None

    client = ServiceProcess.client
    logs = ServiceProcess.logs
    cli = ServiceProcess.cli

    def start(self, overrides: dict[str, str], timeout: float = 90.0) -> None:
        import uvicorn

        from hokusai.server.config import Settings
        from hokusai.server.logs import RedactingFormatter, RequestContextFilter
        from hokusai.server.serving import uvicorn_config

        env_file = self.home / "service.env"
        lines = []
        for name, value in overrides.items():
            assert "'" not in value and "\n" not in value, (name, value)
            lines.append(f"{name}='{value}'\n")
        env_file.write_text("".join(lines))
        settings = Settings(_env_file=env_file)

        handler = logging.FileHandler(self.log_path, encoding="utf-8")
        handler.setLevel(settings.log_level)
        handler.addFilter(_OwnRecords(self))
        handler.addFilter(RequestContextFilter())
        handler.setFormatter(RedactingFormatter(LOG_FORMAT))
        root = logging.getLogger()
        if root.level > logging.getLevelName(settings.log_level):
            root.setLevel(settings.log_level)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # as configure_logging does
        root.addHandler(handler)
        self._handler = handler

        server = uvicorn.Server(uvicorn_config(settings))  # as `hokusai serve` runs it
        self._server = server

        def serve() -> None:
            _RUNNING_SERVICE.set(self)
            server.run()

        self._thread = threading.Thread(target=serve, name=f"service-{settings.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                self._detach_log()
                raise RuntimeError(f"in-process service did not start:\n{self.logs()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"in-process service did not start within {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join(60)
        self._detach_log()

    def _detach_log(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None


def service_environment(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOKUSAI_")}
    env.update(overrides)
    return env


def through_the_gateway(service: ServiceProcess, key: str) -> dict[str, str]:
    """The environment of a stock mlflow client that talks to MLflow through the service's gateway."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HOKUSAI_"))}
    env.update(MLFLOW_TRACKING_URI=f"{service.base_url}/mlflow", MLFLOW_TRACKING_TOKEN=key)
    return env


def run_analytics_scenario(service: ServiceProcess, key: str, experiment: str) -> dict:
    """tests/analytics_scenario.py through the gateway: two trained, logged (unregistered) versions; its datasets
    are written to the service's datasets directory. Returns what the script logged."""
    datasets = service.home / "datasets"
    datasets.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("analytics_scenario.py")), experiment, str(datasets)],
        env=through_the_gateway(service, key),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def mlflow_model_with_versions(mlflow_url: str, prefix: str, versions: int = 2) -> str:
    """A registered model `<prefix>-<random>` made in MLflow directly (not through the service), with `versions`
    versions of one run; returns its name."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    with httpx.Client(base_url=f"{mlflow_url}/api/2.0/mlflow", timeout=30) as mlflow:
        run = mlflow.post("/runs/create", json={"experiment_id": "0"}).json()["run"]["info"]
        assert mlflow.post("/registered-models/create", json={"name": name}).status_code == 200
        for _ in range(versions):
            created = mlflow.post(
                "/model-versions/create",
                json={"name": name, "source": f"{run['artifact_uri']}/model", "run_id": run["run_id"]},
            )
            assert created.status_code == 200, created.text
    return name


def benchmark_metadata(version: dict, contributor: str | None = None) -> dict:
    """Register metadata of a scenario version: its validation accuracy as the benchmark, and a contributor."""
    metadata = {"benchmark_metric": "val_accuracy", "benchmark_value": version["metrics"]["val_accuracy"]}
    if contributor:
        metadata["contributor_address"] = contributor
    return metadata


def spawn_service(env: dict[str, str], log_path: Path | None = None, args: tuple[str, ...] = ()) -> subprocess.Popen:
    """`hokusai serve [args]` in its own process group, output to `log_path` (or nowhere)."""
    command = [sys.executable, "-m", "hokusai.cli", "serve", *args]
    if log_path is None:
        return subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
    with open(log_path, "wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def run_cli(
    *args: str, env: dict[str, str], input: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hokusai.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        input=input,
        cwd=cwd,
    )


Service = ServiceProcess | InProcessService


@dataclass
class ServiceFactory:
    """Starts services: in this process unless `process=True` (what the test is about is the process)."""

    tmp_path_factory: pytest.TempPathFactory
    started: list[Service] = field(default_factory=list)

    def __call__(
        self, wait_until: str = "ready", bootstrap: bool = True, process: bool = False, **settings: str
    ) -> Service:
        home = self.tmp_path_factory.mktemp("hokusai-home")
        # A port given: the test needed the service's address before it started (a callback URL).
        port = int(settings.pop("port")) if "port" in settings else free_loopback_port()
        admin_key = generate_api_key() if bootstrap else None
        overrides = {"HOKUSAI_HOME": str(home), "HOKUSAI_PORT": str(port), "HOKUSAI_ENVIRONMENT": "test"}
        if admin_key:
            overrides["HOKUSAI_BOOTSTRAP_ADMIN_KEY"] = admin_key
        # A spare model worker (~10 s of CPU to import MLflow and scikit-learn) for every test service that registers
        # a version would cost the 2-core suite minutes: the tests of spares ask for them.
        settings.setdefault("model_spare_workers", "0")
        overrides.update({f"HOKUSAI_{name.upper()}": value for name, value in settings.items()})
        env = service_environment(**overrides)
        log_path = home / "service.log"
        base_url = f"http://127.0.0.1:{port}"
        path = {"ready": "/ready", "live": "/live"}[wait_until]
        if process:
            spawned = spawn_service(env, log_path)
            service: Service = ServiceProcess(base_url, home, log_path, spawned, env, admin_key)
            self.started.append(service)
            wait_for_status(base_url + path, process=spawned, log=log_path)
            return service
        service = InProcessService(base_url, home, log_path, env, admin_key)
        self.started.append(service)
        service.start(overrides)
        wait_for_status(base_url + path)
        return service

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)


class RecordingUpstream:
    """A stand-in for MLflow that records every request reaching it.

    Only for what a real MLflow cannot show: which headers arrive upstream, and an upstream that hangs.
    """

    def __init__(self, delay_seconds: float = 0.0) -> None:
        import http.server
        import json
        import threading

        recorder = self
        self.requests: list[RecordedRequest] = []
        self.answered: list[str] = []  # paths whose handling ended (answered, or the client had gone)
        self.delay_seconds = delay_seconds

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append(RecordedRequest(self.command, self.path, list(self.headers.items()), body))
                if "/slow" in self.path:  # any route the gateway forwards, e.g. .../artifacts/slow
                    time.sleep(recorder.delay_seconds)
                payload = b"OK" if self.path == "/health" else json.dumps({"path": self.path}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the gateway gave up first (the timeout test): that is the point
                finally:
                    recorder.answered.append(self.path)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def paths(self) -> list[str]:
        return [request.path for request in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ScriptedServer:
    """Answers each request with the next scripted (status, headers, body); records what arrived."""

    def __init__(self, script: list[tuple[int, dict[str, str], dict]]) -> None:
        recorder = self
        self.script = list(script)
        self.requests: list[tuple[str, str, dict[str, str], float]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                recorder.requests.append((self.command, self.path, dict(self.headers), time.monotonic()))
                status, headers, body = recorder.script.pop(0)
                payload = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()


class PrivateRedis:
    """A redis-server of one test alone, which it may stop or pause: the machine's shared one (other tests use it)
    is never touched."""

    def __init__(self) -> None:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server", "install Redis (Debian: redis-server)", FileNotFoundError("redis-server"))
        self.port = free_loopback_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def restart(self) -> None:
        """Killed and started again on the same port, empty: clients' connections break as in a Redis restart."""
        import redis

        self.stop()
        self.process = subprocess.Popen(self.process.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start again"
                time.sleep(0.05)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.resume()
            self.process.kill()
            self.process.wait()


async def eventually(check: Callable[[], Any], what: str, patience: float = 120.0) -> Any:
    """Polls `check` (sync or async) until it returns something truthy; fails after `patience` seconds (a bound
    against hanging, not a timing assertion)."""
    deadline = time.monotonic() + patience
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {patience:g} s: {what}")
        await asyncio.sleep(0.05)
