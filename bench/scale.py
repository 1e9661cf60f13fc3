"""Does a second `hokusai serve` process add throughput, and does single flight shorten the tail when the cache expires?

One MLflow (our one-process launcher on SQLite, as the embedded stack runs it) holding 100 model versions; the
service processes share one PostgreSQL database and one Redis, as in production. Alternating in one run:
  1. throughput (requests/s of CONCURRENCY httpx clients sending REQUESTS requests) of a route that needs only the
     database (GET /api/v1/keys, admin key) and of GET /models/?max_results=100 (cache warm), against one process
     and against two (the clients take them in turn, as a load balancer would): the 2/1 ratio;
  2. latency of GET /models/ under the same load with HOKUSAI_REGISTRY_CACHE_TTL=0.5 (the entry expires about every
     half second of the run), HOKUSAI_CACHE_SINGLE_FLIGHT=false against true: median and p99.
The client runs on the same cores as the servers (two here), so the 2/1 ratio is bounded by the machine: the CPU
each request costs the service processes and the client is printed too, and says what more cores would give.
Needs PostgreSQL and Redis (HOKUSAI_TEST_POSTGRES_URL, HOKUSAI_TEST_REDIS_URL, as the tests); says so otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import psycopg
import redis

sys.path.insert(0, str(Path(__file__).parent))
from _common import HOKUSAI_SERVE, clean_env, median, spawn, stop_group, wait_for  # noqa: E402
from gateway import start_mlflow  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402
from hokusai.server.config import Settings  # noqa: E402
from hokusai.server.mlflow.embedded import free_loopback_port  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get("HOKUSAI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("HOKUSAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
MODELS, VERSIONS = 20, 5
CONCURRENCY = 16
REQUESTS = 500  # per burst
ROUNDS = 3
EXPIRING_TTL = "0.5"
LIST = "/models/?max_results=100"
SINGLE_FLIGHT_AVAILABLE = "cache_single_flight" in Settings.model_fields


def fill_registry(mlflow_url: str) -> None:
    """MODELS x VERSIONS versions of one logged model, made straight in MLflow."""
    with httpx.Client(base_url=f"{mlflow_url}/api/2.0/mlflow", timeout=60) as mlflow:
        made = mlflow.post("/logged-models", json={"experiment_id": "0", "name": "scale-bench"})
        made.raise_for_status()
        model_id = made.json()["model"]["info"]["model_id"]
        for index in range(MODELS):
            name = f"scale-model-{index:02d}"
            mlflow.post("/registered-models/create", json={"name": name}).raise_for_status()
            for _ in range(VERSIONS):
                body = {"name": name, "source": f"models:/{model_id}", "model_id": model_id}
                mlflow.post("/model-versions/create", json=body).raise_for_status()


def start_services(homes: dict[str, Path], shared: dict[str, str], own: dict[str, dict[str, str]]) -> dict:
    """Every process spawned at once, then waited for: {name: (process, url)}."""
    started = {}
    for name, home in homes.items():
        port = free_loopback_port()
        env = clean_env(HOKUSAI_HOME=str(home), HOKUSAI_PORT=str(port), **shared, **own.get(name, {}))
        started[name] = (spawn(HOKUSAI_SERVE, env), f"http://127.0.0.1:{port}")
    for _, url in started.values():
        wait_for(f"{url}/ready")
    return started


async def burst(urls: list[str], path: str, key: str) -> tuple[float, list[float], int]:
    """REQUESTS GETs of `path` by CONCURRENCY clients, request i to urls[i % len(urls)]: (requests/s, latencies,
    answers other than 200)."""
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    clients = [httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) for url in urls]
    tickets = itertools.count()
    latencies: list[float] = []
    failed = [0]

    async def worker() -> None:
        while (ticket := next(tickets)) < REQUESTS:
            started = time.perf_counter()
            response = await clients[ticket % len(clients)].get(path)
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                failed[0] += 1

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return REQUESTS / (time.perf_counter() - started), latencies, failed[0]
    finally:
        for client in clients:
            await client.aclose()


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main() -> None:
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute("SELECT 1")
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except (psycopg.Error, redis.RedisError) as exc:
        print(f"skipped: needs PostgreSQL and Redis ({exc}); see .ci/run")
        return
    database = f"hokusai_scale_{secrets.token_hex(4)}"
    prefix = f"hokusai-scale-{secrets.token_hex(4)}:"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    database_url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    key = generate_api_key()
    processes = []
    memory_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None
    try:
        with tempfile.TemporaryDirectory(dir=memory_dir) as scratch:
            root = Path(scratch)
            names = ["one", "two", "flight-off", "flight-on"] if SINGLE_FLIGHT_AVAILABLE else ["one", "two"]
            for name in ["mlflow", *names]:
                (root / name).mkdir()
            mlflow_process, mlflow_url = start_mlflow(root / "mlflow")
            processes.append(mlflow_process)
            fill_registry(mlflow_url)
            shared = {
                "HOKUSAI_DATABASE_URL": f"{database_url}/{database}",
                "HOKUSAI_REDIS_URL": REDIS_URL,
                "HOKUSAI_MLFLOW_URL": mlflow_url,
                "HOKUSAI_MLFLOW_KEEPALIVE": "true",  # a one-worker uvicorn MLflow, like the embedded one
                "HOKUSAI_BOOTSTRAP_ADMIN_KEY": key,
                "HOKUSAI_RATE_LIMIT_DEFAULT_PER_HOUR": "100000000",
                "HOKUSAI_LOG_LEVEL": "WARNING",
            }
            # "one" and "two" are one deployment (one prefix, a cache that outlives the run); each single-flight
            # process has its own prefix, so neither fills the other's cache.
            own = {
                "one": {"HOKUSAI_REDIS_PREFIX": f"{prefix}pair:", "HOKUSAI_REGISTRY_CACHE_TTL": "600"},
                "two": {"HOKUSAI_REDIS_PREFIX": f"{prefix}pair:", "HOKUSAI_REGISTRY_CACHE_TTL": "600"},
            }
            for flag in ("off", "on"):
                own[f"flight-{flag}"] = {
                    "HOKUSAI_REDIS_PREFIX": f"{prefix}flight-{flag}:",
                    "HOKUSAI_REGISTRY_CACHE_TTL": EXPIRING_TTL,
                    "HOKUSAI_CACHE_SINGLE_FLIGHT": "false" if flag == "off" else "true",
                }
            started = start_services({name: root / name for name in names}, shared, own)
            processes += [process for process, _ in started.values()]
            report(started, key)
    finally:
        for process in reversed(processes):
            stop_group(process)
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        client = redis.Redis.from_url(REDIS_URL)
        with contextlib.closing(client):
            stale = list(client.scan_iter(f"{prefix}*", count=1000))
            for start in range(0, len(stale), 500):
                client.delete(*stale[start : start + 500])


def cpu_seconds(processes: list[subprocess.Popen]) -> float:
    total = 0.0
    for process in processes:
        times = psutil.Process(process.pid).cpu_times()
        total += times.user + times.system
    return total


def report(started: dict[str, tuple[subprocess.Popen, str]], key: str) -> None:
    urls = {name: url for name, (_, url) in started.items()}
    setups = {"1 process": ["one"], "2 processes": ["one", "two"]}
    routes = {"GET /api/v1/keys (database only)": "/api/v1/keys", f"GET {LIST} (cache warm)": LIST}
    print(
        f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the start); {CONCURRENCY} concurrent httpx"
        f" clients, {REQUESTS} requests a burst, {ROUNDS} rounds alternating, medians; CPU: of the service processes"
        " and of this client, per request"
    )
    print(
        f"  {'route':41s} {'1 process':>10s} {'2 processes':>12s} {'2/1':>5s}"
        f" {'service CPU ms (1 / 2)':>23s} {'client CPU ms':>14s} {'non-200':>8s}"
    )
    for label, path in routes.items():
        for names in setups.values():  # warm-up: connections, the key cache, the registry cache
            asyncio.run(burst([urls[name] for name in names], path, key))
        rates: dict[str, list[float]] = {setup: [] for setup in setups}
        service_cpu: dict[str, list[float]] = {setup: [] for setup in setups}
        client_cpu: list[float] = []
        failed = 0
        for _ in range(ROUNDS):
            for setup, names in setups.items():
                processes = [started[name][0] for name in names]
                before, client_before = cpu_seconds(processes), time.process_time()
                rate, _, errors = asyncio.run(burst([urls[name] for name in names], path, key))
                service_cpu[setup].append((cpu_seconds(processes) - before) / REQUESTS * 1000)
                client_cpu.append((time.process_time() - client_before) / REQUESTS * 1000)
                rates[setup].append(rate)
                failed += errors
        one, two = median(rates["1 process"]), median(rates["2 processes"])
        cpu_one, cpu_two = median(service_cpu["1 process"]), median(service_cpu["2 processes"])
        print(
            f"  {label:41s} {one:8.0f}/s {two:10.0f}/s {two / one:5.2f} {cpu_one:11.1f} / {cpu_two:<9.1f}"
            f" {median(client_cpu):14.1f} {failed:8d}"
        )

    print(f"GET {LIST} while the cache entry expires (HOKUSAI_REGISTRY_CACHE_TTL={EXPIRING_TTL}), one process each:")
    if not SINGLE_FLIGHT_AVAILABLE:
        print("  HOKUSAI_CACHE_SINGLE_FLIGHT: not available in this tree (rerun once it is)")
        return
    flights = {
        "HOKUSAI_CACHE_SINGLE_FLIGHT=false": urls["flight-off"],
        "HOKUSAI_CACHE_SINGLE_FLIGHT=true": urls["flight-on"],
    }
    for url in flights.values():
        asyncio.run(burst([url], LIST, key))
    latencies: dict[str, list[float]] = {name: [] for name in flights}
    rates = {name: [] for name in flights}
    failures = dict.fromkeys(flights, 0)
    for _ in range(ROUNDS):
        for name, url in flights.items():
            rate, seconds, errors = asyncio.run(burst([url], LIST, key))
            rates[name].append(rate)
            latencies[name] += seconds
            failures[name] += errors
    print(f"  {'setting':36s} {'median ms':>10s} {'p99 ms':>8s} {'req/s':>7s} {'non-200':>8s}")
    for name in flights:
        print(
            f"  {name:36s} {median(latencies[name]) * 1000:10.1f} {p99(latencies[name]) * 1000:8.1f}"
            f" {median(rates[name]):7.0f} {failures[name]:8d}"
        )
    off, on = (p99(latencies[name]) for name in flights)
    print(f"  p99 true/false: {on / off:.2f}")


if __name__ == "__main__":
    main()
