"""How long from `hokusai serve` to /ready = 200, and how much memory does the whole tree use once ready?

Embedded defaults (API + embedded MLflow, SQLite), measured on a fresh HOKUSAI_HOME (cold: MLflow creates its
database) and on the same home again (warm: a restart). Target: ready within 10 s, under 700 MB PSS.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import HOKUSAI_SERVE, clean_env, median, spawn, stop_group, tree_pss_mb, wait_for  # noqa: E402

from hokusai.server.mlflow.embedded import free_loopback_port  # noqa: E402

RUNS = 3


def start_and_measure(home: Path) -> tuple[float, float]:
    port = free_loopback_port()
    env = clean_env(HOKUSAI_HOME=str(home), HOKUSAI_PORT=str(port), HOKUSAI_LOG_LEVEL="WARNING")
    started = time.perf_counter()
    process = spawn(HOKUSAI_SERVE, env)
    try:
        wait_for(f"http://127.0.0.1:{port}/ready")
        seconds = time.perf_counter() - started
        time.sleep(1.0)  # let lazily-touched pages settle before reading memory
        return seconds, tree_pss_mb(process.pid)
    finally:
        stop_group(process)


def main() -> None:
    cold, warm, memory = [], [], []
    for _ in range(RUNS):
        with tempfile.TemporaryDirectory() as home:
            seconds, pss = start_and_measure(Path(home))
            cold.append(seconds)
            memory.append(pss)
            seconds, pss = start_and_measure(Path(home))
            warm.append(seconds)
            memory.append(pss)
    print(f"startup to /ready=200, {RUNS} runs each (embedded MLflow, SQLite)")
    print(f"  cold (fresh HOKUSAI_HOME): median {median(cold):.2f} s  (runs: {', '.join(f'{s:.2f}' for s in cold)})")
    print(f"  warm (restart):            median {median(warm):.2f} s  (runs: {', '.join(f'{s:.2f}' for s in warm)})")
    print(f"  process tree PSS once ready: median {median(memory):.0f} MB, max {max(memory):.0f} MB")
    worst_ready, worst_memory = max(cold + warm), max(memory)
    print(f"  vs targets: worst ready {worst_ready / 10:.2f}x of 10 s, memory {worst_memory / 700:.2f}x of 700 MB")


if __name__ == "__main__":
    main()
