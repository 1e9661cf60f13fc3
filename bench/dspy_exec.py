"""What does POST /api/v1/dspy/execute cost over calling the same program in process, and how long does a batch take?

A local OpenAI-compatible server (hokusai.devtools.echo_lm, its own process) answers at once (`openai/instant`) or after
100 ms (`openai/slow-100`). Alternating in one run:
  1. per call: POST /api/v1/dspy/execute (keep-alive client) against `await program.acall(...)` in this process,
     same program, same LM server; the difference of the medians is the service's overhead;
  2. a batch of 100 items against the 100 ms LM, at HOKUSAI_DSPY_BATCH_CONCURRENCY=16.
Targets: overhead at most 2 ms p50; the batch under 1.5 s.
"""

from __future__ import annotations

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


async def in_process_timings(base_url: str) -> list[float]:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import dspy

    lm = dspy.LM("openai/instant", api_base=base_url, api_key="unused", cache=False, num_retries=0)
    program = dspy.Predict("question -> answer")
    timings = []
    with dspy.context(lm=lm, disable_history=True, track_usage=True):
        for index in range(CALLS // 10):
            await program.acall(question=f"warm {index}")
        for index in range(CALLS):
            started = time.perf_counter()
            await program.acall(question=f"q {index}")
            timings.append((time.perf_counter() - started) * 1000)
    return timings


def service_timings(client: httpx.Client) -> list[float]:
    timings = []
    for index in range(CALLS // 10):
        client.post("/api/v1/dspy/execute", json={"program_id": "bench-qa", "inputs": {"question": f"warm {index}"}})
    for index in range(CALLS):
        started = time.perf_counter()
        response = client.post(
            "/api/v1/dspy/execute", json={"program_id": "bench-qa", "inputs": {"question": f"q {index}"}}
        )
        timings.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return timings


def main() -> None:
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
            )
            processes.append(service_process)
            with httpx.Client(base_url=service_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
                client.post("/api/v1/dspy/programs", json=PROGRAM).raise_for_status()
                slow = {**PROGRAM, "program_id": "bench-qa-slow", "lm": {"model": "openai/slow-100"}}
                client.post("/api/v1/dspy/programs", json=slow).raise_for_status()
                service, direct = [], []
                for _ in range(2):  # alternate the two sides
                    service += service_timings(client)
                    direct += asyncio.run(in_process_timings(lm_url))
                through, alone = median(service), median(direct)
                print(
                    f"execute, instant LM: service p50 {through:.2f} ms, in process p50 {alone:.2f} ms, "
                    f"overhead {through - alone:.2f} ms (target <= 2 ms)"
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
