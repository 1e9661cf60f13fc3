"""Helpers for tests that start real processes: the service, MLflow, the CLI."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class ServiceProcess:
    """A `hokusai serve` process started the way a user starts it."""

    base_url: str
    home: Path
    log_path: Path
    process: subprocess.Popen
    env: dict[str, str]
    admin_key: str | None = None

    def client(self, key: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30, **kwargs)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run the `hokusai` CLI against this service's database."""
        return run_cli(*args, env=self.env)

    def stop(self) -> None:
        stop_process_group(self.process)


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


def benchmark_metadata(version: dict, contributor: str | None = None) -> dict:
    """Register metadata of a scenario version: its validation accuracy as the benchmark, and a contributor."""
    metadata = {"benchmark_metric": "val_accuracy", "benchmark_value": version["metrics"]["val_accuracy"]}
    if contributor:
        metadata["contributor_address"] = contributor
    return metadata


def spawn_service(env: dict[str, str], log_path: Path | None = None) -> subprocess.Popen:
    """`hokusai serve` in its own process group, output to `log_path` (or nowhere)."""
    command = [sys.executable, "-m", "hokusai.cli", "serve"]
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


@dataclass
class ServiceFactory:
    tmp_path_factory: pytest.TempPathFactory
    started: list[ServiceProcess] = field(default_factory=list)

    def __call__(self, wait_until: str = "ready", bootstrap: bool = True, **settings: str) -> ServiceProcess:
        home = self.tmp_path_factory.mktemp("hokusai-home")
        port = free_loopback_port()
        admin_key = generate_api_key() if bootstrap else None
        overrides = {"HOKUSAI_HOME": str(home), "HOKUSAI_PORT": str(port), "HOKUSAI_ENVIRONMENT": "test"}
        if admin_key:
            overrides["HOKUSAI_BOOTSTRAP_ADMIN_KEY"] = admin_key
        overrides.update({f"HOKUSAI_{name.upper()}": value for name, value in settings.items()})
        env = service_environment(**overrides)
        log_path = home / "service.log"
        process = spawn_service(env, log_path)
        service = ServiceProcess(f"http://127.0.0.1:{port}", home, log_path, process, env, admin_key)
        self.started.append(service)
        path = {"ready": "/ready", "live": "/live"}[wait_until]
        wait_for_status(service.base_url + path, process=process, log=log_path)
        return service

    def stop_all(self) -> None:
        for service in self.started:
            service.stop()


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
