"""Which one-worker MLflow server should the embedded stack run: uvicorn (our launcher) or gunicorn sync?

Both serve the same kind of store, started side by side; small REST calls alternate between them over one
keep-alive client each. Also: time to /health, memory of the process tree, and whether the routes MLflow
serves only from its FastAPI app (native artifact streaming, OTLP traces, server info) are there.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import clean_env, median, mlflow_server_command, spawn, stop_group, tree_pss_mb, wait_for  # noqa: E402

from hokusai.server.mlflow.embedded import embedded_mlflow_command, free_loopback_port  # noqa: E402

CALLS = 300
# OTLP trace ingestion is one of the routers MLflow serves only from its FastAPI app (with jobs, gateway,
# assistant and native artifact streaming); Flask under gunicorn answers 404 there.
FASTAPI_ONLY_PROBE = "/v1/traces"


def gunicorn_command(home: Path, port: int) -> list[str]:
    return mlflow_server_command(home, port, 1, "--gunicorn-opts", "--worker-class sync --timeout 60")


def start(command: list[str], port: int) -> tuple[subprocess.Popen, float]:
    env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    started = time.perf_counter()
    process = spawn(command, env)
    wait_for(f"http://127.0.0.1:{port}/health")
    return process, time.perf_counter() - started


def one_call(client: httpx.Client) -> float:
    started = time.perf_counter()
    response = client.post("/api/2.0/mlflow/experiments/search", json={"max_results": 10})
    response.raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as uvicorn_home, tempfile.TemporaryDirectory() as gunicorn_home:
        ports = {"uvicorn": free_loopback_port(), "gunicorn": free_loopback_port()}
        commands = {
            "uvicorn": embedded_mlflow_command(Path(uvicorn_home), "127.0.0.1", ports["uvicorn"]),
            "gunicorn": gunicorn_command(Path(gunicorn_home), ports["gunicorn"]),
        }
        processes, startup = {}, {}
        try:
            for name, command in commands.items():
                processes[name], startup[name] = start(command, ports[name])
            clients = {name: httpx.Client(base_url=f"http://127.0.0.1:{port}") for name, port in ports.items()}
            for client in clients.values():
                for _ in range(20):
                    one_call(client)  # warm-up
            timings: dict[str, list[float]] = {name: [] for name in clients}
            for _ in range(CALLS):
                for name, client in clients.items():
                    timings[name].append(one_call(client))
            memory = {name: tree_pss_mb(process.pid) for name, process in processes.items()}
            probe = {name: client.post(FASTAPI_ONLY_PROBE, content=b"").status_code for name, client in clients.items()}
        finally:
            for process in processes.values():
                stop_group(process)

    print(f"one-worker MLflow, {CALLS} alternating experiments/search calls on keep-alive connections")
    for name in ("uvicorn", "gunicorn"):
        served = "missing (404)" if probe[name] == 404 else "served"
        print(
            f"  {name:8s}: median {median(timings[name]) * 1000:.2f} ms, start {startup[name]:.2f} s (cold store),"
            f" tree PSS {memory[name]:.0f} MB, POST {FASTAPI_ONLY_PROBE}: {served}"
        )
    ratio = median(timings["gunicorn"]) / median(timings["uvicorn"])
    print(f"  latency ratio gunicorn/uvicorn: {ratio:.2f} (above 1 means uvicorn is faster)")


if __name__ == "__main__":
    main()
