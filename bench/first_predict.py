"""How long does the first predict of a freshly registered version take, and where does the time go?

One MLflow server, one small scikit-learn classifier logged once, and two `hokusai serve` in front of it, run side by
side: "on demand" (HOKUSAI_MODEL_SPARE_WORKERS=0, HOKUSAI_MODEL_PREFETCH=false: a worker process starts, imports
MLflow and the flavour, and the files are fetched, all inside the first call, as before issue 17) and "ahead" (the
defaults: files fetched when the version is registered, a spare worker with MLflow and the common flavours imported
waiting). Each round registers a new version on each side (POST /models/register) and predicts it twice: once at
once after the registration, once after a pause (a new version again, predicted `SETTLE_SECONDS` later), then once
more (warm). The sides alternate. Then, in this process, the parts of a first call: fetching the files, starting a
worker (to its greeting), loading the model in it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _common import HOKUSAI_SERVE, clean_env, median, spawn, stop_group, wait_for  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402
from hokusai.server.mlflow.embedded import embedded_mlflow_command, free_loopback_port  # noqa: E402

ROUNDS = 3
SETTLE_SECONDS = 20.0  # between registering a version and its first call: time for the work done ahead
ROWS = [{"a": 0.1 * index, "b": -0.2 * index, "c": 0.3, "d": 1.0} for index in range(10)]
SIDES = {
    "on demand": {"HOKUSAI_MODEL_SPARE_WORKERS": "0", "HOKUSAI_MODEL_PREFETCH": "false"},
    "ahead": {},
}

LOG_MODEL = """
import sys, warnings
warnings.filterwarnings("ignore")
import mlflow, numpy as np, pandas as pd
from sklearn.linear_model import LogisticRegression
mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("first-predict-bench")
x = np.random.default_rng(1).normal(size=(500, 4))
frame = pd.DataFrame(x, columns=list("abcd"))
with mlflow.start_run():
    info = mlflow.sklearn.log_model(LogisticRegression().fit(frame, x[:, 0] > x[:, 2]), name="model",
                                    input_example=frame.head(2))
print(info.model_id)
"""


def start_mlflow(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_loopback_port()
    process = spawn(embedded_mlflow_command(home, "127.0.0.1", port))
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/health")
    return process, url


def start_service(home: Path, mlflow_url: str, key: str, extra: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_loopback_port()
    env = clean_env(
        HOKUSAI_HOME=str(home),
        HOKUSAI_PORT=str(port),
        HOKUSAI_MLFLOW_URL=mlflow_url,
        HOKUSAI_BOOTSTRAP_ADMIN_KEY=key,
        HOKUSAI_LOG_LEVEL="WARNING",
        HOKUSAI_RATE_LIMIT_REGISTRATION="10000/minute",
        **extra,
    )
    process = spawn(HOKUSAI_SERVE, env)
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/ready")
    return process, url


def register(client: httpx.Client, name: str, model_id: str) -> str:
    answer = client.post(
        "/models/register", json={"model_data": f"models:/{model_id}", "model_type": "classifier", "model_name": name}
    )
    answer.raise_for_status()
    return answer.json()["version"]


def predict(client: httpx.Client, name: str, version: str) -> tuple[float, dict]:
    started = time.perf_counter()
    answer = client.post(f"/models/{name}/{version}/predict", json={"inputs": ROWS})
    answer.raise_for_status()
    return (time.perf_counter() - started) * 1000, answer.json()


def main() -> None:
    key = generate_api_key()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "mlflow").mkdir()
        mlflow_process, mlflow_url = start_mlflow(root / "mlflow")
        processes = [mlflow_process]
        try:
            logged = subprocess.run(
                [sys.executable, "-c", LOG_MODEL, mlflow_url], capture_output=True, text=True, check=True
            )
            model_id = logged.stdout.strip().splitlines()[-1]
            clients = {}
            for index, (side, extra) in enumerate(SIDES.items()):
                process, url = start_service(root / f"service-{index}", mlflow_url, key, extra)
                processes.append(process)
                clients[side] = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
            service_rounds(clients, model_id)
            parts_of_a_first_call(mlflow_url, model_id, root / "parts")
        finally:
            for process in reversed(processes):
                stop_group(process)


def service_rounds(clients: dict[str, httpx.Client], model_id: str) -> None:
    results: dict[str, dict[str, list[float]]] = {
        side: {"at once": [], "after pause": [], "load_ms": [], "warm": []} for side in clients
    }
    for round_number in range(1, ROUNDS + 1):
        pending = {}
        for side, client in clients.items():
            name = f"first-predict-{side.replace(' ', '-')}"
            wall, answer = predict(client, name, register(client, name, model_id))
            assert answer["loaded"], answer
            results[side]["at once"].append(wall)
            results[side]["load_ms"].append(answer["load_ms"])
            pending[side] = (name, register(client, name, model_id))
        time.sleep(SETTLE_SECONDS)
        for side, client in clients.items():
            name, version = pending[side]
            wall, answer = predict(client, name, version)
            assert answer["loaded"], answer
            results[side]["after pause"].append(wall)
            results[side]["load_ms"].append(answer["load_ms"])
            results[side]["warm"].append(predict(client, name, version)[0])
            print(
                f"round {round_number} {side}: at once {results[side]['at once'][-1]:.0f} ms, "
                f"after {SETTLE_SECONDS:g} s {wall:.0f} ms (load_ms {answer['load_ms']:.0f}), "
                f"warm {results[side]['warm'][-1]:.1f} ms",
                flush=True,
            )
    print(f"first predict of a new version, 10 rows, medians of {ROUNDS} rounds (ms):")
    for side, values in results.items():
        print(
            f"  {side:9}: right after registering {median(values['at once']):8.0f}, "
            f"{SETTLE_SECONDS:g} s after {median(values['after pause']):8.0f}, "
            f"load_ms {median(values['load_ms']):8.0f}, warm call {median(values['warm']):6.1f}"
        )
    if len(results) == 2:
        before, after = results.values()
        for moment in ("at once", "after pause"):
            print(f"  ratio ahead / on demand, {moment}: {median(after[moment]) / median(before[moment]):.3f}")


def parts_of_a_first_call(mlflow_url: str, model_id: str, home: Path) -> None:
    """Fetch, worker start and load timed apart, with the service's own classes, in this process."""
    asyncio.run(_parts(mlflow_url, model_id, home))


async def _parts(mlflow_url: str, model_id: str, home: Path) -> None:
    from hokusai.server.mlflow.breaker import CircuitBreaker
    from hokusai.server.mlflow.upstream import MlflowUpstream
    from hokusai.server.models.files import ModelFiles
    from hokusai.server.models.pool import ModelSource, ModelWorkerPool, WorkerLimits

    name = "first-predict-ahead"
    upstream = MlflowUpstream(mlflow_url, 60, breaker=CircuitBreaker())
    cache = home / "model-cache"
    pool = ModelWorkerPool(1, cache, home, WorkerLimits(4 * 2**30, 60, 300, "nobody"), spare_workers=1)
    await pool.start()
    files = ModelFiles(upstream, cache, 10**10, in_use=pool.loaded_directories)
    try:
        started = time.perf_counter()
        directory = await files.local_copy(name, "1")
        fetch_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        pool.warm()
        (spare,) = await pool.spares_ready()
        start_ms = (time.perf_counter() - started) * 1000
        spare_mb = psutil.Process(spare["pid"]).memory_full_info().pss / 2**20
        payload = json.dumps(ROWS).encode()
        started = time.perf_counter()
        answer = await pool.run(ModelSource(f"{name}:1", directory), "predict", "json", payload)
        first_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        await pool.run(ModelSource(f"{name}:1", directory), "predict", "json", payload)
        warm_ms = (time.perf_counter() - started) * 1000
    finally:
        await pool.aclose()
        await upstream.aclose()
    print(
        f"parts of a first call: fetch the files {fetch_ms:.0f} ms; start a worker and import MLflow and the "
        f"flavours {start_ms:.0f} ms (done ahead by a spare, which holds {spare_mb:.0f} MB PSS while it waits); "
        f"load + predict on that worker {first_ms:.0f} ms (load_ms {answer.load_ms:.0f}); warm predict {warm_ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
