"""What does the gateway cost over talking to MLflow directly?

One MLflow server (one uvicorn worker), one `hokusai serve` in front of it. Alternating in one run, same upstream:
  1. the stock mlflow client's workflow (tests/mlflow_workflow.py, in this process),
  2. a burst of small REST calls (experiments/search) on keep-alive connections,
  3. artifact upload and download (streamed PUT/GET of 100 MB),
then the gateway's peak RSS. Finally the keep-alive question: against MLflow with 4 uvicorn workers, gateways with
reused upstream connections vs a new connection per call (HOKUSAI_MLFLOW_KEEPALIVE=false).
Targets: small-call latency ratio <= 1.10, artifact throughput ratio >= 0.90, flat memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from _common import HOKUSAI_SERVE, clean_env, median, mlflow_server_command, spawn, stop_group, wait_for  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402
from hokusai.server.mlflow.embedded import embedded_mlflow_command, free_loopback_port  # noqa: E402

SMALL_CALLS = 400
WORKFLOW_ROUNDS = 3
ARTIFACT_MB = 100
ARTIFACT_ROUNDS = 5


def start_mlflow(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_loopback_port()
    process = spawn(embedded_mlflow_command(home, "127.0.0.1", port))
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/health")
    return process, url


def start_gateway(home: Path, mlflow_url: str, key: str, **extra: str) -> tuple[subprocess.Popen, str]:
    port = free_loopback_port()
    env = clean_env(
        HOKUSAI_HOME=str(home),
        HOKUSAI_PORT=str(port),
        HOKUSAI_MLFLOW_URL=mlflow_url,
        HOKUSAI_BOOTSTRAP_ADMIN_KEY=key,
        HOKUSAI_LOG_LEVEL="WARNING",
        **extra,
    )
    process = spawn(HOKUSAI_SERVE, env)
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/ready")
    return process, url


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def small_calls(clients: dict[str, httpx.Client], paths: dict[str, str], rounds: int) -> dict[str, list[float]]:
    def one(name: str) -> None:
        clients[name].get(paths[name], params={"max_results": 10}).raise_for_status()

    for name in clients:
        for _ in range(20):
            one(name)
    timings: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(rounds):
        for name in clients:
            timings[name].append(timed(lambda name=name: one(name)))
    return timings


def artifact_throughput(clients: dict[str, httpx.Client], prefixes: dict[str, str], source: Path) -> dict:
    size_mb = source.stat().st_size / 2**20
    results: dict[str, dict[str, list[float]]] = {name: {"up": [], "down": []} for name in clients}

    def file_chunks():
        with open(source, "rb") as handle:
            yield from iter(lambda: handle.read(2**20), b"")

    for _ in range(ARTIFACT_ROUNDS):
        for name, client in clients.items():
            path = f"{prefixes[name]}/api/2.0/mlflow-artifacts/artifacts/bench/{uuid.uuid4().hex}/blob.bin"
            seconds = timed(
                lambda client=client, path=path: client.put(
                    path, content=file_chunks(), headers={"Content-Length": str(source.stat().st_size)}
                ).raise_for_status()
            )
            results[name]["up"].append(size_mb / seconds)

            def download(client=client, path=path) -> None:
                with client.stream("GET", path) as response:
                    response.raise_for_status()
                    for _ in response.iter_raw(2**20):
                        pass

            results[name]["down"].append(size_mb / timed(download))
    return results


def run_workflows(direct_url: str, gateway_url: str, key: str) -> dict[str, list[float]]:
    import logging
    import warnings

    import mlflow
    from tests.mlflow_workflow import main as workflow

    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    timings: dict[str, list[float]] = {"direct": [], "gateway": []}
    targets = {"direct": direct_url, "gateway": f"{gateway_url}/mlflow"}
    for round_index in range(WORKFLOW_ROUNDS + 1):
        for name, uri in targets.items():
            os.environ["MLFLOW_TRACKING_TOKEN"] = key
            mlflow.set_tracking_uri(uri)
            experiment = f"bench-{name}-{uuid.uuid4().hex[:8]}"
            seconds = timed(lambda experiment=experiment: workflow(experiment))
            if round_index:  # the first round warms imports and caches
                timings[name].append(seconds)
    return timings


def keepalive_penalty(home: Path, key: str) -> dict[str, float]:
    """MLflow as `mlflow server` runs it by default (4 uvicorn workers; uvicorn's h11 protocol, as in a plain
    `pip install mlflow` without httptools), behind two gateways: keep-alive on and off. POST runs/search."""
    port = free_loopback_port()
    process = spawn(
        mlflow_server_command(home, port, 4, "--uvicorn-opts", "--http h11 --loop asyncio"),
        clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )
    gateways = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/health")
        (home / "on").mkdir()
        (home / "off").mkdir()
        on_process, on_url = start_gateway(home / "on", url, key, HOKUSAI_MLFLOW_KEEPALIVE="true")
        gateways.append(on_process)
        off_process, off_url = start_gateway(home / "off", url, key)  # the default for an external MLflow
        gateways.append(off_process)
        headers = {"Authorization": f"Bearer {key}"}
        clients = {
            "direct, keep-alive": httpx.Client(base_url=url),
            "direct, new connection per call": httpx.Client(
                base_url=url, limits=httpx.Limits(max_keepalive_connections=0)
            ),
            "gateway, HOKUSAI_MLFLOW_KEEPALIVE=true": httpx.Client(base_url=on_url, headers=headers),
            "gateway, default (no upstream keep-alive)": httpx.Client(base_url=off_url, headers=headers),
        }
        paths = {name: "/mlflow" if name.startswith("gateway") else "" for name in clients}
        body = {"experiment_ids": ["0"], "max_results": 1}
        # Back-to-back calls on one client, as the mlflow client makes them: interleaving clients would let the
        # 40 ms delayed-ACK timer expire between two calls on a connection and hide the penalty.
        timings: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(2):
            for name, client in clients.items():
                for call_index in range(40):
                    seconds = timed(
                        lambda client=client, name=name: client.post(
                            f"{paths[name]}/api/2.0/mlflow/runs/search", json=body
                        ).raise_for_status()
                    )
                    if call_index >= 5:
                        timings[name].append(seconds)
        return {name: median(values) for name, values in timings.items()}
    finally:
        for gateway in gateways:
            stop_group(gateway)
        stop_group(process)


def main() -> None:
    key = generate_api_key()
    # In memory where possible: disk write-back of the uploaded artifacts otherwise lands on whichever side happens
    # to be uploading when it starts, and swamps the difference being measured.
    memory_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=memory_dir) as scratch:
        scratch_path = Path(scratch)
        (scratch_path / "mlflow").mkdir()
        (scratch_path / "gateway").mkdir()
        mlflow_process, mlflow_url = start_mlflow(scratch_path / "mlflow")
        # The upstream is a one-worker MLflow on httptools (like the embedded one): keep-alive is right for it.
        gateway_process, gateway_url = start_gateway(
            scratch_path / "gateway", mlflow_url, key, HOKUSAI_MLFLOW_KEEPALIVE="true"
        )
        peak_rss = [psutil.Process(gateway_process.pid).memory_info().rss]
        idle_rss = peak_rss[0]
        done = threading.Event()

        def sample() -> None:
            process = psutil.Process(gateway_process.pid)
            while not done.is_set():
                peak_rss[0] = max(peak_rss[0], process.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            headers = {"Authorization": f"Bearer {key}"}
            clients = {
                "direct": httpx.Client(base_url=mlflow_url, timeout=120),
                "gateway": httpx.Client(base_url=gateway_url, headers=headers, timeout=120),
            }
            prefixes = {"direct": "", "gateway": "/mlflow"}
            search = {name: f"{prefix}/api/2.0/mlflow/experiments/search" for name, prefix in prefixes.items()}
            small = small_calls(clients, search, SMALL_CALLS)
            source = scratch_path / "blob.bin"
            with open(source, "wb") as out:
                for _ in range(ARTIFACT_MB):
                    out.write(os.urandom(2**20))
            artifacts = artifact_throughput(clients, prefixes, source)
            workflows = run_workflows(mlflow_url, gateway_url, key)
        finally:
            done.set()
            sampler.join()
            stop_group(gateway_process)
            stop_group(mlflow_process)
        (scratch_path / "multi").mkdir()
        penalty = keepalive_penalty(scratch_path / "multi", key)

    direct_ms, gateway_ms = median(small["direct"]) * 1000, median(small["gateway"]) * 1000
    print(f"small REST calls ({SMALL_CALLS} alternating experiments/search, keep-alive):")
    print(
        f"  direct {direct_ms:.2f} ms, gateway {gateway_ms:.2f} ms median; ratio {gateway_ms / direct_ms:.2f}"
        f" (target <= 1.10); gateway adds {gateway_ms - direct_ms:.2f} ms"
    )
    print(f"artifacts ({ARTIFACT_MB} MB, {ARTIFACT_ROUNDS} rounds, median MB/s):")
    for way in ("up", "down"):
        direct_rate, gateway_rate = median(artifacts["direct"][way]), median(artifacts["gateway"][way])
        print(
            f"  {way:4s}: direct {direct_rate:.0f}, gateway {gateway_rate:.0f}; ratio {gateway_rate / direct_rate:.2f}"
            " (target >= 0.90)"
        )
    direct_s, gateway_s = median(workflows["direct"]), median(workflows["gateway"])
    print(
        f"stock mlflow client workflow ({WORKFLOW_ROUNDS} rounds): direct {direct_s:.2f} s, gateway {gateway_s:.2f} s;"
        f" ratio {gateway_s / direct_s:.2f}"
    )
    print(
        f"gateway RSS: idle {idle_rss / 2**20:.0f} MB, peak {peak_rss[0] / 2**20:.0f} MB over the whole run"
        f" (+{(peak_rss[0] - idle_rss) / 2**20:.0f} MB)"
    )
    print("MLflow with 4 uvicorn workers (h11), POST runs/search, median:")
    for name, seconds in penalty.items():
        print(f"  {name}: {seconds * 1000:.1f} ms")


if __name__ == "__main__":
    main()
