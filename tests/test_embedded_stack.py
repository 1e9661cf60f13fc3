"""`hokusai serve` with no configuration: the embedded MLflow child, its supervision, and the first admin key."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import psutil
import pytest

from hokusai.server.mlflow.embedded import free_loopback_port
from tests.support import service_environment, spawn_service, stop_process_group, wait_for_status

pytestmark = pytest.mark.slow


def mlflow_children(service_pid: int) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(service_pid).children(recursive=True)
        if "hokusai.server.mlflow.launcher" in _command_line(p)
    ]


def _command_line(process: psutil.Process) -> str:
    """A child that has just exited (the `git` that reads the build info, say) has no command line left to read."""
    try:
        return " ".join(process.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return ""


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def embedded_service(tmp_path_factory):
    home = tmp_path_factory.mktemp("embedded-home")
    port = free_loopback_port()
    env = service_environment(HOKUSAI_HOME=str(home), HOKUSAI_PORT=str(port))
    log_path = home / "service.log"
    process = spawn_service(env, log_path)
    base_url = f"http://127.0.0.1:{port}"
    wait_for_status(f"{base_url}/ready", 200, timeout=120, process=process, log=log_path)
    yield {"base_url": base_url, "home": home, "process": process, "log_path": log_path}
    stop_process_group(process)


def test_first_start_creates_and_prints_one_admin_key(embedded_service):
    key_file = embedded_service["home"] / "admin-key"
    key = key_file.read_text().strip()
    assert key.startswith("hk_live_")
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert embedded_service["log_path"].read_text().count(key) == 1  # printed once, on stdout
    response = httpx.get(f"{embedded_service['base_url']}/api/v1/keys", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200 and len(response.json()) == 1


def test_everything_lives_under_home(embedded_service):
    home = embedded_service["home"]
    assert (home / "hokusai.db").exists() and (home / "mlflow.db").exists() and (home / "mlflow.log").exists()
    body = httpx.get(f"{embedded_service['base_url']}/health").json()
    assert body["status"] == "healthy" and body["services"]["mlflow"] == "healthy"


def test_ready_is_503_while_mlflow_is_down_and_the_child_is_restarted(embedded_service):
    base_url, service_pid = embedded_service["base_url"], embedded_service["process"].pid
    [child] = mlflow_children(service_pid)
    child.kill()
    wait_until(lambda: httpx.get(f"{base_url}/ready", timeout=5).status_code == 503, 30, "/ready to turn 503")
    body = httpx.get(f"{base_url}/ready", timeout=5).json()
    assert body["ready"] is False and not next(c for c in body["checks"] if c["name"] == "mlflow")["passed"]
    assert httpx.get(f"{base_url}/health", timeout=5).json()["status"] == "degraded"
    wait_for_status(f"{base_url}/ready", 200, timeout=120)
    [new_child] = mlflow_children(service_pid)
    assert new_child.pid != child.pid
    assert "Embedded MLflow exited" in embedded_service["log_path"].read_text()


def start_with_mlflow_child(home) -> tuple[int, subprocess.Popen, psutil.Process]:
    port = free_loopback_port()
    process = spawn_service(service_environment(HOKUSAI_HOME=str(home), HOKUSAI_PORT=str(port)))
    try:
        wait_until(lambda: mlflow_children(process.pid), 60, "the MLflow child to start")
        [child] = mlflow_children(process.pid)
    except BaseException:  # the caller's cleanup never starts: stop the service (and its MLflow) here
        stop_process_group(process)
        raise
    return port, process, child


def test_stopping_the_service_stops_mlflow(tmp_path):
    port, process, child = start_with_mlflow_child(tmp_path)
    try:
        wait_for_status(f"http://127.0.0.1:{port}/ready", 200, timeout=120, process=process)
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert process.wait(30) in (0, -signal.SIGTERM)
        wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 15, "MLflow to stop")
    finally:
        stop_process_group(process)


def test_mlflow_dies_with_a_killed_service(tmp_path):
    """Even SIGKILL of the service (no chance to clean up) takes the MLflow child down with it."""
    port, process, child = start_with_mlflow_child(tmp_path)
    try:
        time.sleep(1)  # let the launcher arm its parent-death signal
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 30, "MLflow to exit")
    finally:
        stop_process_group(process)
