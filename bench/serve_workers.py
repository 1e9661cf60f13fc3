"""What does `hokusai serve --workers 2` give over one worker, in requests per second?

An authenticated route that only reads the database (GET /api/v1/keys with the admin key: key check from the
in-process cache, rate limit in memory, one SELECT), on SQLite and on PostgreSQL when it is reachable. Each round
starts `hokusai serve --workers N` afresh (embedded MLflow, idle), warms up, then counts the answers of a fixed
number of keep-alive connections for a fixed time. Rounds alternate 1 and 2 workers; medians and the ratio are
printed. The load generator is a small raw-socket HTTP/1.1 client, so that it takes little of the machine's CPU
(on 2 cores it still competes with the workers: the ratio is what this machine gives, not what 2 cores could).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _common import HOKUSAI_SERVE, clean_env, median, spawn, stop_group, wait_for  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402
from hokusai.server.mlflow.embedded import free_loopback_port  # noqa: E402

ROUNDS = 3
CONNECTIONS = 16
WARMUP_SECONDS = 2.0
MEASURE_SECONDS = 8.0
PATH = "/api/v1/keys"
POSTGRES_ADMIN_URL = os.environ.get("HOKUSAI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _connection(port: int, request: bytes, stop_at: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            counts[0 if status == 200 else 1] += 1
    finally:
        writer.close()


async def _load(port: int, key: str, seconds: float) -> tuple[float, int]:
    request = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    counts = [0, 0]
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(_connection(port, request, stop_at, counts) for _ in range(CONNECTIONS)))
    return counts[0] / (time.perf_counter() - started), counts[1]


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of the serve process and its descendants (workers, the idle embedded MLflow)."""
    total = 0.0
    root = psutil.Process(pid)
    for process in (root, *root.children(recursive=True)):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def wait_for_workers(port: int, workers: int, timeout: float = 180.0) -> None:
    """Until `workers` distinct processes have answered (request ids start with a per-process prefix): the first
    ready worker would otherwise take every connection of the run."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)} of {workers} workers answered")
        seen.add(httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10).headers["x-request-id"][:16])


def measure(workers: int, key: str, database_url: str | None) -> tuple[float, float]:
    port = free_loopback_port()
    with tempfile.TemporaryDirectory() as home:
        env = clean_env(
            HOKUSAI_HOME=home,
            HOKUSAI_PORT=str(port),
            HOKUSAI_LOG_LEVEL="WARNING",
            HOKUSAI_BOOTSTRAP_ADMIN_KEY=key,
            HOKUSAI_RATE_LIMIT_DEFAULT_PER_HOUR=str(10**9),
            HOKUSAI_WORKERS=str(workers),
            **({"HOKUSAI_DATABASE_URL": database_url} if database_url else {}),
        )
        process = spawn(HOKUSAI_SERVE, env)
        try:
            wait_for(f"http://127.0.0.1:{port}/ready")
            wait_for_workers(port, workers)
            asyncio.run(_load(port, key, WARMUP_SECONDS))
            cpu_before = tree_cpu_seconds(process.pid)
            per_second, errors = asyncio.run(_load(port, key, MEASURE_SECONDS))
            cpu_ms = (tree_cpu_seconds(process.pid) - cpu_before) * 1000 / (per_second * MEASURE_SECONDS)
            if errors:
                raise RuntimeError(f"{errors} answers were not 200")
            return per_second, cpu_ms
        finally:
            stop_group(process)


def postgres_database() -> tuple[str, str] | None:
    try:
        import psycopg

        name = f"hokusai_bench_{os.getpid()}"
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=2) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # noqa: BLE001 - a benchmark without PostgreSQL reports SQLite only
        print(f"  (PostgreSQL skipped: {exc})")
        return None
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def drop_postgres(name: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def compare(label: str, database_url: str | None) -> None:
    results: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    key = generate_api_key()  # the first admin key of the database: every round's service accepts it
    for _ in range(ROUNDS):
        for workers in (1, 2):
            per_second, cpu_ms = measure(workers, key, database_url)
            results[workers].append(per_second)
            cpu[workers].append(cpu_ms)
    one, two = median(results[1]), median(results[2])
    print(f"  {label}: 1 worker {one:.0f} req/s, 2 workers {two:.0f} req/s, ratio {two / one:.2f}x")
    print(f"    runs: 1 worker {[round(r) for r in results[1]]}, 2 workers {[round(r) for r in results[2]]}")
    # Per request, the service's CPU: what bounds requests/s once the machine has cores to spare (PostgreSQL's
    # own CPU is not counted).
    print(f"    service CPU per request: 1 worker {median(cpu[1]):.2f} ms, 2 workers {median(cpu[2]):.2f} ms")


def main() -> None:
    print(f"GET {PATH} (admin key), {CONNECTIONS} keep-alive connections, {MEASURE_SECONDS:.0f} s per run")
    print(f"  {ROUNDS} rounds alternating 1 and 2 workers, on {os.cpu_count()} cores")
    compare("SQLite", None)
    created = postgres_database()
    if created is not None:
        name, url = created
        try:
            compare("PostgreSQL", url)
        finally:
            drop_postgres(name)


if __name__ == "__main__":
    main()
