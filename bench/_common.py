"""Small helpers shared by the benchmarks (they report; they never assert wall-clock limits)."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil


def wait_for(url: str, status: int = 200, timeout: float = 180.0) -> float:
    """Poll `url` until it answers `status`; returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            if httpx.get(url, timeout=2).status_code == status:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s")


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and all its descendants: shared pages counted once in total."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_full_info().pss
    return total / 2**20


def spawn(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """A quiet child in its own process group (stopped as a whole by stop_group)."""
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


HOKUSAI_SERVE = [sys.executable, "-m", "hokusai.cli", "serve"]


def mlflow_server_command(home: Path, port: int, workers: int, *server_options: str) -> list[str]:
    """The stock `mlflow server` command (not our launcher), on a SQLite store in `home`."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination",
        str(home / "mlartifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        *server_options,
    ]


def stop_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def median(values: list[float]) -> float:
    return statistics.median(values)


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOKUSAI_")}
    env.update(overrides)
    return env
