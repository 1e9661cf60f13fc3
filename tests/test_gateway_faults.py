"""Faults with a real MLflow: stopped under a stream of requests, then started again; and a 200 MB artifact."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from hokusai.server.mlflow.embedded import embedded_mlflow_command, free_loopback_port
from tests.support import stop_process_group, wait_for_status

pytestmark = pytest.mark.slow

SEARCH = "/mlflow/api/2.0/mlflow/experiments/search?max_results=1"
TIMEOUT = 5
THRESHOLD = 3


@dataclass
class Outcome:
    status: int
    detail: str | None


class OwnMlflow:
    """An MLflow server this test may stop and start again on the same port and store."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.home / "mlflow.log", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            embedded_mlflow_command(self.home, "127.0.0.1", self.port),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for_status(f"{self.url}/health", process=self.process, log=self.home / "mlflow.log")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


@pytest.fixture
def own_mlflow(tmp_path):
    server = OwnMlflow(tmp_path)
    server.start()
    yield server
    server.stop()


def test_breaker_opens_when_mlflow_stops_and_closes_by_itself_when_it_returns(start_service, own_mlflow):
    service = start_service(  # a process: the breaker gauges are process-wide
        process=True,
        mlflow_url=own_mlflow.url,
        mlflow_timeout=str(TIMEOUT),
        breaker_failure_threshold=str(THRESHOLD),
        breaker_recovery_timeout="1",
        breaker_max_recovery_timeout="2",
        breaker_success_threshold="1",
    )
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def stream_of_requests() -> None:
        with service.client(service.admin_key) as client:
            while not stop.is_set():
                response = client.get(SEARCH)
                detail = response.json().get("detail") if response.status_code != 200 else None
                outcomes.append(Outcome(response.status_code, detail))
                time.sleep(0.05)

    worker = threading.Thread(target=stream_of_requests)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while not any(o.status == 200 for o in outcomes):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        own_mlflow.stop()
        while sum(o.status == 503 for o in outcomes) < 5:
            assert time.monotonic() < deadline + 30, [o.status for o in outcomes]
            time.sleep(0.05)

        with httpx.Client(base_url=service.base_url) as public:
            assert public.get("/health").json()["status"] == "degraded"
            breaker = public.get("/health/mlflow")
            assert breaker.status_code == 503 and breaker.json()["connected"] is False
            assert breaker.json()["circuit_breaker_state"] in ("OPEN", "HALF_OPEN")

        failures = [o for o in outcomes if o.status != 200]
        assert [o.status for o in failures[: THRESHOLD + 1]] == [502] * THRESHOLD + [503]
        assert failures[0].detail == f"Failed to connect to MLflow server at {own_mlflow.url}"
        assert {o.detail for o in failures if o.status == 503} == {"MLflow server unavailable (circuit breaker open)"}

        failed_so_far = len(outcomes)
        own_mlflow.start()
        recovered_at = time.monotonic()
        while outcomes[-1].status != 200:  # no manual reset: the breaker probes and closes by itself
            assert time.monotonic() < recovered_at + 30, [o.status for o in outcomes[failed_so_far:]]
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join()

    # every request was answered by MLflow, refused at connect (502) or by the open breaker (503): none waited for
    # the upstream timeout (a 504)
    assert {o.status for o in outcomes} <= {200, 502, 503}, [o.status for o in outcomes]
    with httpx.Client(base_url=service.base_url) as public:
        state = public.get("/health/mlflow")
        assert state.status_code == 200 and state.json()["circuit_breaker_state"] == "CLOSED"
        status = public.get("/health/status").json()
        assert status["mlflow"]["circuit_breaker"]["times_opened"] >= 1
        metrics = public.get("/metrics").text
    assert re.search(r'mlflow_circuit_breaker_transitions_total\{from_state="CLOSED",to_state="OPEN"\} [1-9]', metrics)
    assert re.search(
        r'mlflow_circuit_breaker_transitions_total\{from_state="HALF_OPEN",to_state="CLOSED"\} [1-9]', metrics
    )
    assert "mlflow_circuit_breaker_state 0.0" in metrics


def test_manual_reset_needs_an_admin_key(service):
    with httpx.Client(base_url=service.base_url) as anonymous:
        assert anonymous.post("/health/mlflow/reset").status_code == 401
    with service.client(service.admin_key) as admin:
        read_key = admin.post("/api/v1/keys", json={"name": "r", "scopes": ["write"]}).json()["key"]
        response = admin.post("/health/mlflow/reset")
    assert response.status_code == 200
    body = response.json()
    assert body["message"] == "Circuit breaker reset successfully" and body["reset_by"] == "manual_api_call"
    with service.client(read_key) as client:
        assert client.post("/health/mlflow/reset").status_code == 403


def _sample_peak_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.02)


def test_200_mb_artifact_streams_through_the_gateway_with_flat_memory(service_process, tmp_path):
    service = service_process
    size = 200 * 2**20
    source = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(source, "wb") as out:
        chunk = os.urandom(2**20)
        for index in range(size // len(chunk)):
            block = bytes([index % 256]) + chunk[1:]
            digest.update(block)
            out.write(block)
    with service.client(service.admin_key) as admin:
        key = admin.post("/api/v1/keys", json={"name": "big", "scopes": ["write"]}).json()["key"]

    service_pid = service.process.pid
    baseline = psutil.Process(service_pid).memory_info().rss
    peak = [baseline]
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_peak_rss, args=(service_pid, stop, peak))
    sampler.start()
    script = f"""
import mlflow, hashlib, sys
mlflow.set_experiment("big-artifact")
with mlflow.start_run() as run:
    mlflow.log_artifact({str(source)!r}, artifact_path="blobs")
path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="blobs/big.bin",
                                           dst_path={str(tmp_path / "down")!r})
digest = hashlib.sha256()
with open(path, "rb") as handle:
    for block in iter(lambda: handle.read(2**20), b""):
        digest.update(block)
print(digest.hexdigest())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HOKUSAI_"))}
    env.update(MLFLOW_TRACKING_URI=f"{service.base_url}/mlflow", MLFLOW_TRACKING_TOKEN=key)
    try:
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop.set()
        sampler.join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == digest.hexdigest()
    growth_mb = (peak[0] - baseline) / 2**20
    print(f"gateway RSS growth during 200 MB up+down: {growth_mb:.1f} MB")
    assert growth_mb < 50, f"the gateway's RSS grew by {growth_mb:.1f} MB during a 200 MB transfer"
