"""How fast are registry reads through the service, against MLflow's own search/get on the same data?

1,000 model versions (100 models x 10) in one MLflow. Alternating in one run:
  - repeated reads (warm cache): requests/s with 8 concurrent connections, GET /models/?max_results=100 against
    MLflow's model-versions/search?max_results=100, and GET /models/{n}/{v} against model-versions/get;
  - cold reads: median latency through a second service whose cache is off (HOKUSAI_REGISTRY_CACHE_TTL=0).
The lists are read as they are by default (one MLflow call) and with `include=aliases` (a second MLflow call for
the aliases, which MLflow's version search does not return: what every list cost before issue 17), side by side.
Targets: at least 5x MLflow's requests/s on repeated reads; cold, no slower than 1.2x MLflow's latency for a list
and 1.1x for a get.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import clean_env, median, stop_group  # noqa: E402
from gateway import start_gateway, start_mlflow  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402

MODELS, VERSIONS = 100, 10
CONCURRENCY = 8
BURST_SECONDS = 2.0
ROUNDS = 3
LATENCY_CALLS = 150


def log_one_model(mlflow_url: str) -> str:
    """One logged model (MLflow 3) for every version to point at."""
    script = """
import sys, warnings
warnings.filterwarnings("ignore")
import mlflow
class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input
mlflow.set_experiment("registry-bench")
with mlflow.start_run():
    model_id = mlflow.pyfunc.log_model(name="echo", python_model=Echo()).model_id
print("MODEL_ID=" + model_id)
"""
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", script],
        env=clean_env(MLFLOW_TRACKING_URI=mlflow_url),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return next(line for line in result.stdout.splitlines() if line.startswith("MODEL_ID=")).removeprefix("MODEL_ID=")


async def fill_registry(mlflow_url: str, model_id: str) -> None:
    async with aiohttp.ClientSession(mlflow_url) as session:

        async def post(path: str, body: dict) -> None:
            async with session.post(f"/api/2.0/mlflow/{path}", json=body) as response:
                await response.read()
                if response.status >= 400 and path != "registered-models/create":
                    raise RuntimeError(f"{path}: {response.status} {await response.text()}")

        async def model(index: int) -> None:
            name = f"bench-model-{index:03d}"
            await post("registered-models/create", {"name": name})
            for _ in range(VERSIONS):
                await post(
                    "model-versions/create", {"name": name, "source": f"models:/{model_id}", "model_id": model_id}
                )

        for index in range(MODELS):  # one at a time: MLflow's SQLite store refuses concurrent version numbering
            await model(index)


async def throughput(base_url: str, paths: list[str], headers: dict[str, str]) -> float:
    deadline = time.perf_counter() + BURST_SECONDS
    done = [0]

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            async with session.get(random.choice(paths), headers=headers) as response:  # noqa: S311
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{response.url} answered {response.status}")
            done[0] += 1

    async with aiohttp.ClientSession(base_url, connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
        return done[0] / (time.perf_counter() - started)


def latencies(clients: dict[str, tuple[httpx.Client, list[str]]]) -> dict[str, float]:
    timings: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(LATENCY_CALLS):
        for name, (client, paths) in clients.items():
            started = time.perf_counter()
            client.get(random.choice(paths)).raise_for_status()  # noqa: S311
            timings[name].append(time.perf_counter() - started)
    return {name: median(values) * 1000 for name, values in timings.items()}


def main() -> None:
    key = generate_api_key()
    auth = {"Authorization": f"Bearer {key}"}
    memory_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=memory_dir) as scratch:
        scratch_path = Path(scratch)
        for part in ("mlflow", "warm", "cold"):
            (scratch_path / part).mkdir()
        mlflow_process, mlflow_url = start_mlflow(scratch_path / "mlflow")
        processes = [mlflow_process]
        try:
            started = time.perf_counter()
            asyncio.run(fill_registry(mlflow_url, log_one_model(mlflow_url)))
            print(f"filled the registry with {MODELS * VERSIONS} versions in {time.perf_counter() - started:.0f} s")
            warm_process, warm_url = start_gateway(
                scratch_path / "warm",
                mlflow_url,
                key,
                HOKUSAI_MLFLOW_KEEPALIVE="true",
                HOKUSAI_RATE_LIMIT_DEFAULT_PER_HOUR="100000000",
            )
            cold_process, cold_url = start_gateway(
                scratch_path / "cold",
                mlflow_url,
                key,
                HOKUSAI_MLFLOW_KEEPALIVE="true",
                HOKUSAI_RATE_LIMIT_DEFAULT_PER_HOUR="100000000",
                HOKUSAI_REGISTRY_CACHE_TTL="0",
            )
            processes += [warm_process, cold_process]
            pairs = [(f"bench-model-{m:03d}", v) for m in range(MODELS) for v in range(1, VERSIONS + 1)]
            sample = random.sample(pairs, 50)
            names = sorted({n for n, _ in sample})[:5]  # repeated reads: a handful of models asked for again and again
            ours = {
                "list": ["/models/?max_results=100"],
                "list +aliases": ["/models/?max_results=100&include=aliases"],
                "list one model": [f"/models/?name={n}" for n in names],
                "list one model +aliases": [f"/models/?name={n}&include=aliases" for n in names],
                "get": [f"/models/{n}/{v}" for n, v in sample],
            }
            list_search = ["/api/2.0/mlflow/model-versions/search?max_results=100"]
            one_model_search = [f"/api/2.0/mlflow/model-versions/search?filter=name%3D%27{n}%27" for n in names]
            theirs = {
                "list": list_search,
                "list +aliases": list_search,
                "list one model": one_model_search,
                "list one model +aliases": one_model_search,
                "get": [f"/api/2.0/mlflow/model-versions/get?name={n}&version={v}" for n, v in sample],
            }
            cold_targets = {"get": 1.1}
            for kind in ours:
                rates: dict[str, list[float]] = {"mlflow": [], "service": []}
                asyncio.run(throughput(warm_url, ours[kind], auth))  # warm the cache
                for _ in range(ROUNDS):
                    rates["mlflow"].append(asyncio.run(throughput(mlflow_url, theirs[kind], {})))
                    rates["service"].append(asyncio.run(throughput(warm_url, ours[kind], auth)))
                mlflow_rate, service_rate = median(rates["mlflow"]), median(rates["service"])
                clients = {
                    "mlflow": (httpx.Client(base_url=mlflow_url), theirs[kind]),
                    "cold": (httpx.Client(base_url=cold_url, headers=auth), ours[kind]),
                }
                cold = latencies(clients)
                print(
                    f"{kind}: repeated reads {service_rate:.0f}/s vs MLflow {mlflow_rate:.0f}/s ="
                    f" {service_rate / mlflow_rate:.1f}x (target >= 5x); cold {cold['cold']:.1f} ms vs MLflow"
                    f" {cold['mlflow']:.1f} ms = {cold['cold'] / cold['mlflow']:.2f}x"
                    f" (target <= {cold_targets.get(kind, 1.2)}x)",
                    flush=True,
                )
        finally:
            for process in reversed(processes):
                stop_group(process)


if __name__ == "__main__":
    main()
