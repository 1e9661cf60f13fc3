"""What do authentication and rate limiting cost in throughput?

The same trivial route served by one server process open, behind `allow("models:read")` (key check from the
in-process cache plus the sliding-window rate limit), and behind the implementation issue 17 replaced (see
_auth_bench_app.py: `limits`, two Redis round trips per request). Requests/s with 16 concurrent keep-alive
connections, alternating between the routes in short bursts, with in-process (memory) storage and with the machine's
Redis. Targets (issue 17): auth + limits cost at most 25% of throughput in process, at most 35% with Redis.
The client runs on the same machine: its CPU is part of what each request costs.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _common import clean_env, median, spawn, stop_group, wait_for  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402
from hokusai.server.mlflow.embedded import free_loopback_port  # noqa: E402

CONCURRENCY = 16
BURST_SECONDS = 2.0
ROUNDS = 4
REDIS_URL = "redis://127.0.0.1:6379/15"
ROUTES = {"open": "/bench/open", "guarded": "/bench/guarded", "before": "/bench/guarded-before"}
UNLIMITED: dict[str, int] = {}  # route -> answers without rate-limit headers (the limiter failed open)


def cpu_seconds(server: psutil.Process) -> float:
    times = server.cpu_times()
    return times.user + times.system


async def burst(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], server: psutil.Process
) -> tuple[float, float]:
    """Requests per second over one burst of CONCURRENCY workers, and the server's CPU microseconds per request
    (less sensitive than throughput to what else the machine runs: the throughput is the issue's measure)."""
    deadline = time.perf_counter() + BURST_SECONDS
    counts = [0] * CONCURRENCY

    async def worker(index: int) -> None:
        while time.perf_counter() < deadline:
            async with session.get(url, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}")
                if headers and "X-RateLimit-Limit" not in response.headers:
                    UNLIMITED[url] = UNLIMITED.get(url, 0) + 1  # Redis too slow: served without a limit
            counts[index] += 1

    started, cpu_before = time.perf_counter(), cpu_seconds(server)
    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    requests = sum(counts)
    return requests / (time.perf_counter() - started), (cpu_seconds(server) - cpu_before) / requests * 1e6


async def measure(base_url: str, key: str, server: psutil.Process) -> dict[str, tuple[float, float]]:
    """Per route: median requests/s and median server CPU us per request."""
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(base_url, connector=connector) as session:
        auth = {"Authorization": f"Bearer {key}"}
        await burst(session, "/bench/guarded", auth, server)  # warm-up: key cache, connections
        await burst(session, "/bench/guarded-before", auth, server)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in ROUTES}
        for _ in range(ROUNDS):
            for name, path in ROUTES.items():
                samples[name].append(await burst(session, path, {} if name == "open" else auth, server))
    return {name: (median([s[0] for s in values]), median([s[1] for s in values])) for name, values in samples.items()}


def run_case(redis_url: str | None) -> dict[str, tuple[float, float]]:
    key = generate_api_key()
    port = free_loopback_port()
    with tempfile.TemporaryDirectory() as home:
        env = clean_env(
            HOKUSAI_HOME=home,
            HOKUSAI_MLFLOW_URL=f"http://127.0.0.1:{free_loopback_port()}",
            HOKUSAI_BOOTSTRAP_ADMIN_KEY=key,
            HOKUSAI_LOG_LEVEL="WARNING",
            HOKUSAI_RATE_LIMIT_DEFAULT_PER_HOUR="1000000000",
            **({"HOKUSAI_REDIS_URL": redis_url} if redis_url else {}),
        )
        process = spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "_auth_bench_app:create",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env,
            cwd=Path(__file__).parent,
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/live")
            return asyncio.run(measure(f"http://127.0.0.1:{port}", key, psutil.Process(process.pid)))
        finally:
            stop_group(process)


def main() -> None:
    print(f"requests/s, {CONCURRENCY} connections, {ROUNDS} alternating bursts of {BURST_SECONDS:g} s, median")
    for label, redis_url, target in (("in-process storage", None, 0.25), ("Redis storage", REDIS_URL, 0.35)):
        results = run_case(redis_url)
        rates = {name: rate for name, (rate, _) in results.items()}
        cpu = {name: cpu_us for name, (_, cpu_us) in results.items()}
        cost, cost_before = (1 - rates[name] / rates["open"] for name in ("guarded", "before"))
        print(
            f"  {label:18s}: open {rates['open']:.0f}/s; authenticated + rate-limited {rates['guarded']:.0f}/s,"
            f" cost {cost:.0%} of throughput (target <= {target:.0%}); before issue 17 {rates['before']:.0f}/s,"
            f" cost {cost_before:.0%}\n{'':22s}server CPU per request: open {cpu['open']:.0f} us,"
            f" authenticated + rate-limited {cpu['guarded']:.0f} us (+{cpu['guarded'] - cpu['open']:.0f}),"
            f" before issue 17 {cpu['before']:.0f} us (+{cpu['before'] - cpu['open']:.0f})"
        )
        if UNLIMITED:
            print(f"{'':22s}served without a limit (Redis call failed, fail open): {UNLIMITED}")
            UNLIMITED.clear()


if __name__ == "__main__":
    main()
