"""How `hokusai serve` runs the app under uvicorn: one place, so the in-process test services run it the same way.

One worker (the default): the app in this process. Several (`--workers N`): this process supervises N worker
processes (uvicorn's supervisor: a worker that dies is replaced) that share its listening socket. Before they start
it does once what each would otherwise race to do: migrate the database, store the first admin key, start the
embedded MLflow (which it keeps supervising, and stops last); and it gives them a private PROMETHEUS_MULTIPROC_DIR,
so that /metrics counts all of them whichever answers. Each worker builds its own app: database pool, caches, MLflow
breaker and model worker pool are per worker.

This module is imported by every worker before it answers its supervisor's health check: the app itself is imported
in `load`, not here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Coroutine
from socket import socket
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from hokusai.server.config import Settings
from hokusai.server.http_protocol import header_timeout_protocol

logger = logging.getLogger(__name__)

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's; read by metrics.py in each worker
WORKER_HEALTHCHECK_SECONDS = 60


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    """The app for `settings` on its host and port, with our httptools protocol (header timeout, lingering close)."""
    from hokusai.server.app import create_app

    return uvicorn.Config(create_app(settings), **_server_options(settings))


def _server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's own logging and access log are off: ours (logs.py) redacts keys and escapes control characters, and
    uvicorn's access log would print query strings (a `?api_key=`). Behind a proxy named in forwarded_allow_ips,
    uvicorn puts the X-Forwarded-For address in the request's client: what rate limits and the failed-authentication
    lockout count by."""
    return {
        "host": settings.host,
        "port": settings.port,
        "http": header_timeout_protocol(settings.header_timeout),
        "limit_concurrency": settings.max_connections,
        "log_config": None,
        "access_log": False,
        "proxy_headers": settings.proxy_headers,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
    }


def serve(settings: Settings) -> int:
    """Serve until stopped (SIGINT/SIGTERM); the exit status: 0, or uvicorn's 3 when the app failed to start."""
    _warn_about_deployment(settings)
    if settings.workers == 1:
        server = uvicorn.Server(uvicorn_config(settings))
        server.run()
        return 0 if server.started else STARTUP_FAILURE
    return _serve_workers(settings)


def _warn_about_deployment(settings: Settings) -> None:
    if settings.workers > 1 and settings.redis_url is None:
        logger.warning(
            "%d workers without HOKUSAI_REDIS_URL: each worker counts rate limits and failed authentications on its "
            "own (so a limit allows up to %d times as much) and model changes are serialized per worker only; "
            "set HOKUSAI_REDIS_URL to share them",
            settings.workers,
            settings.workers,
        )
    if settings.proxy_headers and settings.forwarded_allow_ips == "*":
        logger.warning(
            "Proxy headers trusted from any address: the client address is the first X-Forwarded-For entry, which "
            "a client can choose unless the proxy in front replaces the header; with a proxy that appends to it, "
            "set HOKUSAI_FORWARDED_ALLOW_IPS to the proxy's addresses instead"
        )


# --- several workers ------------------------------------------------------------------------------------------


class WorkerConfig(uvicorn.Config):
    """The configuration uvicorn's supervisor binds the socket with and hands to each worker.

    A worker is a spawned process: this travels there as its settings alone and is built anew, so the protocol
    class is made in the worker; the app is built in `load`, which uvicorn calls once the worker answers the
    supervisor's health check (importing the app takes seconds, and a worker silent for
    timeout_worker_healthcheck is killed as hung)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            "hokusai.server.app:create_app",
            workers=settings.workers,
            # How long a worker may leave the supervisor's ping unanswered, and how long a replacement may take to
            # start (SIGHUP): uvicorn's 5 s is less than a worker's start on a busy 2-core machine (5-15 s). The
            # ping is answered by a thread of its own, so a busy event loop does not delay it.
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS,
            **_server_options(settings),
        )
        self.settings = settings

    def __reduce__(self) -> tuple[type[WorkerConfig], tuple[Settings]]:
        return (WorkerConfig, (self.settings,))

    def load(self) -> None:
        from hokusai.server.logs import configure_logging
        from hokusai.server.mlflow.launcher import die_with_parent

        die_with_parent()  # a supervisor killed outright (SIGKILL) takes its workers with it
        configure_logging(self.settings.log_level)
        try:
            from hokusai.server.app import create_app

            self.app = create_app(self.settings)
        except Exception:
            # As a failed application startup: the supervisor stops instead of replacing the worker forever.
            logger.exception("Worker %d could not build the app", os.getpid())
            sys.exit(STARTUP_FAILURE)
        super().load()


class WorkerSupervisor(Multiprocess):
    """uvicorn's supervisor (replaces a worker that dies; SIGHUP replaces them all, SIGTTIN/SIGTTOU add or remove
    one), which also tells prometheus_client of each worker that is gone, so its "live" gauges stop counting."""

    def __init__(self, config: WorkerConfig, sockets: list[socket], metrics_dir: str) -> None:
        super().__init__(config, sockets)
        self._metrics_dir = metrics_dir
        self._known_pids: set[int] = set()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._forget_gone_workers()

    def handle_signals(self) -> None:
        super().handle_signals()
        self._forget_gone_workers()

    def _forget_gone_workers(self) -> None:
        from prometheus_client import multiprocess

        current = {process.pid for process in self.processes if process.pid is not None}
        for pid in self._known_pids - current:
            multiprocess.mark_process_dead(pid, self._metrics_dir)
        self._known_pids = current

    @property
    def failed_to_start(self) -> bool:
        return any(process.exitcode == STARTUP_FAILURE for process in self.processes)


class _BackgroundLoop:
    """An event loop on a thread of the serve process, for the embedded MLflow's (asyncio) supervisor: the main
    thread runs uvicorn's supervisor, which blocks and must own the signal handlers. The thread lives as long as the
    serve process, as it must: Linux signals a child's death-with-parent when the thread that started it ends."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="serve-background", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def _serve_workers(settings: Settings) -> int:
    from hokusai.server.db import run_migrations
    from hokusai.server.mlflow.embedded import EmbeddedMlflow
    from hokusai.server.models.pool import refuse_inspection_by_same_user

    if os.geteuid() != 0:  # its API workers' model workers run as this user: its environ is theirs to read
        refuse_inspection_by_same_user()
    background = _BackgroundLoop()
    embedded: EmbeddedMlflow | None = None
    metrics_dir: str | None = None
    try:
        if settings.embedded_mlflow:
            # First, so its ~4 s start overlaps with the migrations; the workers wait for it as for any MLflow.
            embedded = EmbeddedMlflow(
                settings.home, settings.mlflow_port, webhooks=settings.mlflow_webhook_callback is not None
            )
            background.run(embedded.start())
        if settings.migrate_on_start:
            run_migrations(settings.database_dsn)
        background.run(_store_first_admin_key(settings))

        # Fresh and private (mode 0700): prometheus_client sums whatever files it finds there.
        metrics_dir = tempfile.mkdtemp(prefix="hokusai-metrics-")
        os.environ[METRICS_DIR_VARIABLE] = metrics_dir  # inherited by the workers, which are spawned after this
        worker_settings = settings.model_copy(
            update={"migrate_on_start": False, "embedded_mlflow_url": embedded.url if embedded else None}
        )
        config = WorkerConfig(worker_settings)
        supervisor = WorkerSupervisor(config, [config.bind_socket()], metrics_dir)
        supervisor.run()
        return STARTUP_FAILURE if supervisor.failed_to_start else 0
    finally:
        if embedded is not None:
            background.run(embedded.stop())
        background.close()
        if metrics_dir is not None:
            os.environ.pop(METRICS_DIR_VARIABLE, None)
            shutil.rmtree(metrics_dir, ignore_errors=True)


async def _store_first_admin_key(settings: Settings) -> None:
    """What each worker's start would do (and find done): on a database without keys, the first admin key, shown
    once by this process."""
    from hokusai.server.auth.service import ensure_admin_key
    from hokusai.server.auth.store import ApiKeyStore
    from hokusai.server.db import Database

    database = Database(settings.async_database_dsn)
    try:
        supplied = settings.bootstrap_admin_key.get_secret_value() if settings.bootstrap_admin_key else None
        new_key = await ensure_admin_key(ApiKeyStore(database), supplied, settings.admin_key_path)
    finally:
        await database.dispose()
    if new_key is not None:
        from hokusai.server.app import print_admin_key  # here only: the app's imports take ~3 s and ~50 MB

        print_admin_key(new_key, str(settings.admin_key_path))
