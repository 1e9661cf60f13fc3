"""EmbeddedMlflow: a real MLflow tracking server run as a supervised child of `hokusai serve`.

Started with the service, restarted (with backoff) whenever it dies, stopped with the service. Its stores live
under HOKUSAI_HOME: `mlflow.db` (SQLite backend store) and `mlartifacts/` (artifacts served by MLflow).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from hokusai.server.mlflow.launcher import PARENT_VARIABLE

logger = logging.getLogger(__name__)

INITIAL_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_RUN_SECONDS = 60.0  # a child that ran this long gets a fresh backoff when it dies
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def free_loopback_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def embedded_mlflow_command(home: Path, host: str, port: int) -> list[str]:
    home = home.resolve()
    return [
        sys.executable,
        "-m",
        "hokusai.server.mlflow.launcher",
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination",
        str(home / "mlartifacts"),
        "--host",
        host,
        "--port",
        str(port),
    ]


def webhook_environment(home: Path) -> dict[str, str]:
    """What MLflow needs to call this service back (events/mlflow_hooks.py): plain http and a private address
    (both processes on one host), and a fixed key for the secrets it keeps (one per start would forget them)."""
    from cryptography.fernet import Fernet  # MLflow's own dependency, for the same purpose

    key_path = home / "mlflow-webhook-encryption.key"
    try:
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = key_path.read_text().strip()
    else:
        key = Fernet.generate_key().decode()
        with os.fdopen(descriptor, "w") as file:
            file.write(key)
    return {
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": key,
    }


class EmbeddedMlflow:
    def __init__(self, home: Path, port: int = 0, host: str = "127.0.0.1", webhooks: bool = False) -> None:
        """`webhooks`: MLflow may call this service back (the service subscribes to its webhooks)."""
        self.home = home
        self.webhooks = webhooks
        self.host = host
        self.port = port or free_loopback_port(host)
        self.log_path = home / "mlflow.log"
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._started_at = 0.0
        self._supervisor: asyncio.Task | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process and self._process.returncode is None else None

    async def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="embedded-mlflow-supervisor")

    async def _spawn(self) -> None:
        command = embedded_mlflow_command(self.home, self.host, self.port)
        extra = webhook_environment(self.home) if self.webhooks else {}
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - opening a local log file is instant
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole, deaf to our terminal's ^C
                # Not the API workers' metrics directory (hokusai serve --workers): MLflow is no worker of ours.
                env={
                    **{k: v for k, v in os.environ.items() if k != METRICS_DIR_VARIABLE},
                    "PYTHONUNBUFFERED": "1",
                    PARENT_VARIABLE: str(os.getpid()),  # who it must die with (launcher.die_with_parent)
                    **extra,
                },
            )
        self._started_at = time.monotonic()
        logger.info("Embedded MLflow started (pid %s) at %s, log %s", self._process.pid, self.url, self.log_path)

    async def _supervise(self) -> None:
        delay = INITIAL_RESTART_DELAY
        while True:
            assert self._process is not None
            code = await self._process.wait()
            if self._stopping:
                return
            ran_for = time.monotonic() - self._started_at
            if ran_for >= STABLE_RUN_SECONDS:
                delay = INITIAL_RESTART_DELAY
            logger.warning(
                "Embedded MLflow exited with code %s after %.0fs; restarting in %.1fs (see %s)",
                code,
                ran_for,
                delay,
                self.log_path,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY)
            if self._stopping:
                return
            await self._spawn()
            self.restarts += 1

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        process = self._process
        if process is None or process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            logger.warning("Embedded MLflow did not stop within %.0fs; killing it", grace)
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
        logger.info("Embedded MLflow stopped")


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)
