"""What does POST /api/v1/dspy/execute cost over calling the same program in process, and how long does a batch take?

A local OpenAI-compatible server (hokusai.devtools.echo_lm, its own process) answers at once (`openai/instant`) or after
100 ms (`openai/slow-100`). Alternating in one run:
  1. per call: POST /api/v1/dspy/execute (keep-alive client) against `await program.acall(...)` in this process,
     same program, same LM server, call by call in turn; the difference of the medians is the service's overhead
     (which now includes the commit of the execution's record before the answer);
  2. the same under 8 concurrent clients: the wall time of CONCURRENT_CALLS executions through the service against
     the same executions made by 8 concurrent tasks in process; the difference per execution is the overhead
     (the record of each execution is committed before its answer, many executions per commit);
  3. a batch of 100 items against the 100 ms LM, at HOKUSAI_DSPY_BATCH_CONCURRENCY=16.
Targets: overhead at most 2 ms p50; the batch under 1.5 s.
`--database-url postgresql+psycopg://...` runs the service on PostgreSQL (default: SQLite in a temporary home).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, stop_group  # noqa: E402
from gateway import start_gateway, start_mlflow  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402

CALLS = 300
CLIENTS = 8
CONCURRENT_CALLS = 800
BATCH_ITEMS = 100
BATCH_ROUNDS = 3
PROGRAM = {"program_id": "bench-qa", "name": "QA", "module": "Predict", "signature": "question -> answer"}


def start_fake_lm() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "hokusai.devtools.echo_lm", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return process, process.stdout.readline().split()[3]  # "echo LM at <base url> (a toy ...)"


def sequential_timings(client: httpx.Client, base_url: str) -> tuple[list[float], list[float]]:
    """Per-call milliseconds through the service and in process, the two sides taking turns call by call (so that a
    change of the machine's load while the benchmark runs weighs on both alike)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import dspy

    lm = dspy.LM("openai/instant", api_base=base_url, api_key="unused", cache=False, num_retries=0)
    program = dspy.Predict("question -> answer")
    loop = asyncio.new_event_loop()

    def through_service(question: str) -> None:
        client.post(
            "/api/v1/dspy/execute", json={"program_id": "bench-qa", "inputs": {"question": question}}
        ).raise_for_status()

    def in_process(question: str) -> None:
        loop.run_until_complete(program.acall(question=question))

    timings: dict[str, list[float]] = {"service": [], "direct": []}
    try:
        with dspy.context(lm=lm, disable_history=True, track_usage=True):
            for index in range(CALLS // 10 + CALLS):
                sides = [("service", through_service), ("direct", in_process)]
                for side, call in sides if index % 2 else reversed(sides):
                    started = time.perf_counter()
                    call(f"q {index}")
                    if index >= CALLS // 10:  # the first tenth warms both sides up
                        timings[side].append((time.perf_counter() - started) * 1000)
    finally:
        loop.close()
    return timings["service"], timings["direct"]


async def in_process_concurrent_wall(base_url: str) -> float:
    """Seconds for CONCURRENT_CALLS executions by CLIENTS tasks at once, in this process."""
    import dspy

    lm = dspy.LM("openai/instant", api_base=base_url, api_key="unused", cache=False, num_retries=0)
    program = dspy.Predict("question -> answer")

    async def client(index: int, calls: int) -> None:
        for call in range(calls):
            await program.acall(question=f"c {index} {call}")

    with dspy.context(lm=lm, disable_history=True, track_usage=True):
        await asyncio.gather(*(client(index, 10) for index in range(CLIENTS)))  # warm
        started = time.perf_counter()
        await asyncio.gather(*(client(index, CONCURRENT_CALLS // CLIENTS) for index in range(CLIENTS)))
        return time.perf_counter() - started


async def service_concurrent_wall(service_url: str, key: str) -> tuple[float, list[float]]:
    """Seconds for CONCURRENT_CALLS executions by CLIENTS keep-alive clients at once, and each call's latency (ms)."""
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=service_url, headers=headers, timeout=60, limits=limits) as client:

        async def one_client(index: int, calls: int, timings: list[float] | None) -> None:
            for call in range(calls):
                started = time.perf_counter()
                response = await client.post(
                    "/api/v1/dspy/execute", json={"program_id": "bench-qa", "inputs": {"question": f"c {index} {call}"}}
                )
                response.raise_for_status()
                if timings is not None:
                    timings.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(one_client(index, 10, None) for index in range(CLIENTS)))  # warm
        started = time.perf_counter()
        await asyncio.gather(*(one_client(index, CONCURRENT_CALLS // CLIENTS, latencies) for index in range(CLIENTS)))
        return time.perf_counter() - started, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="the service's database (default: SQLite in a temporary home)")
    arguments = parser.parse_args()
    database = {"HOKUSAI_DATABASE_URL": arguments.database_url} if arguments.database_url else {}
    key = generate_api_key()
    fake, lm_url = start_fake_lm()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "mlflow").mkdir()
        mlflow_process, mlflow_url = start_mlflow(root / "mlflow")
        processes = [fake, mlflow_process]
        try:
            service_process, service_url = start_gateway(
                root / "service",
                mlflow_url,
                key,
                HOKUSAI_RATE_LIMIT_DEFAULT_PER_HOUR="100000000",
                HOKUSAI_DSPY_LM="openai/instant",
                HOKUSAI_DSPY_API_BASE=lm_url,
                HOKUSAI_DSPY_CACHE="false",
                HOKUSAI_DSPY_NUM_RETRIES="0",
                HOKUSAI_DSPY_BATCH_CONCURRENCY="16",
                **database,
            )
            processes.append(service_process)
            with httpx.Client(base_url=service_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
                client.post("/api/v1/dspy/programs", json=PROGRAM).raise_for_status()
                slow = {**PROGRAM, "program_id": "bench-qa-slow", "lm": {"model": "openai/slow-100"}}
                client.post("/api/v1/dspy/programs", json=slow).raise_for_status()
                service, direct = [], []
                for _ in range(2):
                    more_service, more_direct = sequential_timings(client, lm_url)
                    service += more_service
                    direct += more_direct
                through, alone = median(service), median(direct)
                print(
                    f"execute, instant LM: service p50 {through:.2f} ms, in process p50 {alone:.2f} ms, "
                    f"overhead {through - alone:.2f} ms (target <= 2 ms)"
                )
                service_walls, direct_walls, latencies = [], [], []
                for _ in range(2):
                    wall, timings = asyncio.run(service_concurrent_wall(service_url, key))
                    service_walls.append(wall)
                    latencies += timings
                    direct_walls.append(asyncio.run(in_process_concurrent_wall(lm_url)))
                through_wall, alone_wall = median(service_walls), median(direct_walls)
                print(
                    f"execute, instant LM, {CLIENTS} concurrent clients, {CONCURRENT_CALLS} calls: service "
                    f"{CONCURRENT_CALLS / through_wall:.0f}/s (latency p50 {median(latencies):.2f} ms), in process "
                    f"{CONCURRENT_CALLS / alone_wall:.0f}/s; overhead "
                    f"{(through_wall - alone_wall) * 1000 / CONCURRENT_CALLS:.2f} ms of wall time per execution"
                )
                batch = {
                    "program_id": "bench-qa-slow",
                    "inputs_list": [{"question": f"q {i}"} for i in range(BATCH_ITEMS)],
                }
                walls = []
                for _ in range(BATCH_ROUNDS):
                    started = time.perf_counter()
                    answer = client.post("/api/v1/dspy/execute/batch", json=batch)
                    walls.append(time.perf_counter() - started)
                    answer.raise_for_status()
                    assert answer.json()["successful"] == BATCH_ITEMS, answer.json()["failed"]
                print(
                    f"batch of {BATCH_ITEMS}, 100 ms LM, concurrency 16: median {median(walls):.2f} s "
                    f"(runs {', '.join(f'{w:.2f}' for w in walls)}; floor 0.70 s; target < 1.5 s)"
                )
        finally:
            for process in reversed(processes):
                stop_group(process)


if __name__ == "__main__":
    main()
