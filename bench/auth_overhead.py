"""What do authentication and rate limiting cost in throughput?

The same trivial route served twice by one server process, once open and once behind `allow("models:read")`
(key check from the in-process cache plus the moving-window rate limit). Requests/s with 16 concurrent keep-alive
connections, alternating between the two routes in short bursts, with in-process (memory) storage and with the
machine's Redis. Targets: auth + limits cost at most 30% of throughput in process, at most 50% with Redis.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from _common import clean_env, median, spawn, stop_group, wait_for  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402
from hokusai.server.mlflow.embedded import free_loopback_port  # noqa: E402

CONCURRENCY = 16
BURST_SECONDS = 2.0
ROUNDS = 4
REDIS_URL = "redis://127.0.0.1:6379/15"


async def burst(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    """Requests per second over one burst of CONCURRENCY workers."""
    deadline = time.perf_counter() + BURST_SECONDS
    counts = [0] * CONCURRENCY

    async def worker(index: int) -> None:
        while time.perf_counter() < deadline:
            async with session.get(url, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}")
            counts[index] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    return sum(counts) / (time.perf_counter() - started)


async def measure(base_url: str, key: str) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(base_url, connector=connector) as session:
        auth = {"Authorization": f"Bearer {key}"}
        await burst(session, "/bench/guarded", auth)  # warm-up: key cache, connections
        rates: dict[str, list[float]] = {"open": [], "guarded": []}
        for _ in range(ROUNDS):
            rates["open"].append(await burst(session, "/bench/open", {}))
            rates["guarded"].append(await burst(session, "/bench/guarded", auth))
    return {name: median(values) for name, values in rates.items()}


def run_case(redis_url: str | None) -> dict[str, float]:
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
            return asyncio.run(measure(f"http://127.0.0.1:{port}", key))
        finally:
            stop_group(process)


def main() -> None:
    print(f"requests/s, {CONCURRENCY} connections, {ROUNDS} alternating bursts of {BURST_SECONDS:g} s, median")
    for label, redis_url, target in (("in-process storage", None, 0.30), ("Redis storage", REDIS_URL, 0.50)):
        rates = run_case(redis_url)
        cost = 1 - rates["guarded"] / rates["open"]
        print(
            f"  {label:18s}: open {rates['open']:.0f}/s, authenticated + rate-limited {rates['guarded']:.0f}/s;"
            f" cost {cost:.0%} of throughput (target <= {target:.0%})"
        )


if __name__ == "__main__":
    main()
