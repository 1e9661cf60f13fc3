"""ModelWorkerPool: the supervisor, in the API process, of the worker processes that run model code.

A small, fixed number of slots, each holding at most one worker process, each process serving one model version
for its whole life: a worker that must switch to another version is replaced by a fresh process, so one model's
code never sees another model's inputs (nor patches what they run). A call goes to a worker that has its version
loaded when one is idle, else to a fresh worker, else replaces the least recently used idle one.

A call that outlives its timeout costs its worker (SIGKILL, a fresh one takes the slot), and so does a worker that
dies (segfault, kernel OOM kill, the CPU-seconds limit); the caller gets 504 or 502, the API process goes on.
Workers are stopped with the pool; they also die with the API process (PR_SET_PDEATHSIG, in worker.py).

Starting a worker (a Python process importing MLflow, pandas and the common flavours) takes seconds, so the pool
keeps `spare_workers` started ahead, holding no model: a call for a version no worker has loaded takes a spare and
only loads its model, and another spare starts in the background. Spares start once the process shows it serves
models (`warm()`: a version registered or moved to Production, the first model call, or a model cache that holds
files at start), not with every service: most processes never predict. Without spares, a fresh process starts in
the call that needs it (and eagerly in the slot of one that was replaced).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import json
import logging
import os
import pwd
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil

from hokusai.server.errors import HokusaiError, Unprocessable
from hokusai.server.models.protocol import ProtocolError, encode, read_message

logger = logging.getLogger(__name__)

CPU_SECONDS = 3600  # per worker process; spent ones are replaced before they reach it (RECYCLE_AT)
RECYCLE_AT = 0.8
OPEN_FILES = 256
MAX_REQUEST_BYTES = 2**31  # an evaluation's dataset, from the API: a bound, not a policy
MAX_ANSWER_BYTES = 128 * 1024 * 1024  # what a model may send back into the API process
SCRATCH_PREFIX = "hokusai-model-workers-"
PR_SET_DUMPABLE = 4  # prctl(2)
STDERR_LINES_LOGGED = 100  # per worker: a model that prints forever does not flood the service log
# Passed from the service's environment to workers: how to find programs, the locale, and the thread counts of the
# numeric libraries. Nothing else: no HOKUSAI_*, no credentials, no MLflow or database settings.
PASSED_VARIABLES = frozenset({"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ"})
PASSED_PREFIXES = ("OPENBLAS_", "OMP_", "MKL_", "NUMEXPR_")


class ModelCallTimedOut(HokusaiError):
    status_code = 504


class ModelWorkerFailed(HokusaiError):
    """The worker process died or broke the protocol: the model's fault or the machine's, not the caller's."""

    status_code = 502


class ModelUnusable(Unprocessable):
    """The version's files do not load (or its code fails while loading)."""


class ModelRejectedInput(Unprocessable):
    pass


class ModelOutOfMemory(Unprocessable):
    """422, not 5xx: the same model on the same input hits the same limit; retrying cannot help, and nothing is
    wrong with the service (its workers' memory limit is HOKUSAI_MODEL_WORKER_MEMORY_BYTES)."""


@dataclass(frozen=True)
class ModelSource:
    """A model version to run: `key` names it (name:version), `directory` holds its files in the model cache."""

    key: str
    directory: Path


@dataclass(frozen=True)
class ModelAnswer:
    data: list[Any]
    loaded: bool  # the model was loaded for this call
    load_ms: float | None  # waiting for a worker and loading, when it was


@dataclass(frozen=True)
class WorkerLimits:
    memory_bytes: int
    call_timeout: float
    load_timeout: float
    user: str  # dropped to when the service runs as root; "" keeps the service's user
    network: bool = False  # model code may reach the network (else an empty network namespace, when root)


class WorkerProcess:
    """One worker process: started at once in a task, ready after its greeting; one request at a time."""

    def __init__(self, command: list[str], owner: tuple[int, int] | None, scratch_root: Path) -> None:
        self.model: str | None = None
        self.directory: Path | None = None
        self.cpu_seconds = 0.0
        self.greeting: dict[str, Any] = {}
        self._process: asyncio.subprocess.Process | None = None
        self._scratch: Path | None = None
        self._stderr: asyncio.Task | None = None
        # A context of its own: the worker outlives the request that happened to start it (and its request id).
        self._started = asyncio.create_task(self._start(command, owner, scratch_root), context=contextvars.Context())

    async def _start(self, command: list[str], owner: tuple[int, int] | None, scratch_root: Path) -> None:
        self._scratch = scratch = Path(await anyio.to_thread.run_sync(_scratch_directory, owner, scratch_root))
        self._process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=worker_environment(scratch),
            cwd=scratch,
        )
        self._stderr = asyncio.create_task(_log_stderr(self._process))
        self.greeting, _ = await read_message(self._process.stdout, 0)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def started(self) -> bool:
        """It has greeted: MLflow and the flavours are imported, a model can be loaded at once."""
        return self._started.done() and not self.failed

    @property
    def failed(self) -> bool:
        """It could not start, or its process has ended since."""
        if self._started.done() and (self._started.cancelled() or self._started.exception() is not None):
            return True
        return self._process is not None and self._process.returncode is not None

    async def ready(self, timeout: float) -> None:
        await asyncio.wait_for(asyncio.shield(self._started), timeout)

    async def call(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(encode(header, payload))
        await self._process.stdin.drain()
        answer, data = await read_message(self._process.stdout, MAX_ANSWER_BYTES)
        cpu_seconds = answer.get("cpu_seconds")
        self.cpu_seconds = float(cpu_seconds) if isinstance(cpu_seconds, int | float) else CPU_SECONDS
        return answer, data

    async def exit_status(self) -> str:
        """How the process ended, for an error message (it closed its pipes: it is ending)."""
        if self._process is None:
            return "it did not start"
        try:
            code = await asyncio.wait_for(self._process.wait(), 5)
        except TimeoutError:
            return "it closed its pipes"
        if code < 0:
            import signal

            return f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"signal {-code}"
        return f"exit code {code}"

    async def stop(self) -> None:
        """SIGKILL (model code could ignore anything gentler), reaped, its scratch directory removed."""
        if not self._started.done():
            self._started.cancel()
        with contextlib.suppress(BaseException):
            await self._started
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()
        if self._stderr is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._stderr, 5)
        if self._scratch is not None:
            await anyio.to_thread.run_sync(shutil.rmtree, self._scratch, True)


@dataclass
class _Slot:
    worker: WorkerProcess | None = None
    busy: bool = False
    last_used: float = 0.0

    @property
    def model(self) -> str | None:
        return self.worker.model if self.worker else None


class ModelWorkerPool:
    def __init__(self, size: int, cache_dir: Path, home: Path, limits: WorkerLimits, spare_workers: int = 0) -> None:
        self._slots = [_Slot() for _ in range(size)]
        self._spare_workers = spare_workers
        self._spares: list[WorkerProcess] = []  # started, holding no model, in the order they were started
        self._warm = False  # spares wanted: the process serves models
        self._cache_dir = cache_dir
        self._home = home
        self._limits = limits
        self._owner: tuple[int, int] | None = None
        self._scratch_root: Path | None = None
        self._waiters: list[asyncio.Future] = []
        self._stopping: set[asyncio.Task] = set()
        self._closed = False
        self._isolation_noted = False

    @property
    def runs_as_service_user(self) -> bool:
        """True when workers cannot drop privileges (the service is not root, or no user is configured)."""
        return self._owner is None

    async def start(self) -> None:
        """Checks the worker user and protects HOME from it; no process starts before the first model call."""
        await anyio.Path(self._cache_dir).mkdir(parents=True, exist_ok=True)
        self._scratch_root = Path(await anyio.to_thread.run_sync(_scratch_root))
        if os.geteuid() == 0 and self._limits.user:
            try:
                entry = pwd.getpwnam(self._limits.user)
            except KeyError:
                raise RuntimeError(f"HOKUSAI_MODEL_WORKER_USER: no such user {self._limits.user!r}") from None
            if entry.pw_uid == 0:
                raise RuntimeError("HOKUSAI_MODEL_WORKER_USER must not be root")
            self._owner = (entry.pw_uid, entry.pw_gid)
            # Workers read the cache through a descriptor opened before they drop privileges: HOME (the database,
            # the admin key, MLflow's store) can be closed to every other user.
            await anyio.Path(self._home).chmod(0o700)
        else:
            logger.warning(
                "Model workers run as the service's own user (uid %d): the service is not root (a container "
                "run as non-root), or HOKUSAI_MODEL_WORKER_USER is empty; they can read what that user can",
                os.geteuid(),
            )
            refuse_inspection_by_same_user()
        if self._spare_workers and await anyio.to_thread.run_sync(_holds_models, self._cache_dir):
            self.warm()  # this HOME served models before (a restart): the first call after it should not wait

    def warm(self) -> None:
        """Keep `spare_workers` started ahead from now on (they start in the background; this returns at once)."""
        self._warm = True
        self._top_up_spares()

    def _top_up_spares(self) -> None:
        if self._closed or not self._warm:
            return
        for spare in [spare for spare in self._spares if spare.failed]:
            self._spares.remove(spare)
            self._stop(spare)
        while len(self._spares) < self._spare_workers:
            self._spares.append(self._spawn())

    async def spares_ready(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Waits until the spares started so far have greeted (or failed); their greetings (pid, imports...)."""
        timeout = self._limits.load_timeout if timeout is None else timeout
        for spare in list(self._spares):
            with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ProtocolError, OSError):
                await spare.ready(timeout)
        return [spare.greeting for spare in self._spares if spare.greeting]

    def _fresh_worker(self) -> WorkerProcess:
        """A worker holding no model: a spare (one that has started, else the one furthest along), else a new one.
        The call that takes it replaces it once its model is loaded (not before: on two cores, a spare importing
        MLflow beside the load would slow the very call it is meant to spare)."""
        self._warm = True
        usable = [spare for spare in self._spares if not spare.failed]
        if not usable:
            return self._spawn()
        spare = next((spare for spare in usable if spare.started), usable[0])
        self._spares.remove(spare)
        return spare

    async def aclose(self) -> None:
        self._closed = True
        for slot in self._slots:
            if slot.worker is not None:
                self._stop(slot.worker)
                slot.worker = None
        for spare in self._spares:
            self._stop(spare)
        self._spares.clear()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        if self._scratch_root is not None:
            await anyio.to_thread.run_sync(shutil.rmtree, self._scratch_root, True)

    def loaded_directories(self) -> set[Path]:
        return {slot.worker.directory for slot in self._slots if slot.worker and slot.worker.directory}

    def worker_pids(self) -> list[int]:
        """Every worker process of the pool, spares included."""
        workers = [slot.worker for slot in self._slots if slot.worker] + self._spares
        return [pid for worker in workers if (pid := worker.pid) is not None]

    async def run(self, source: ModelSource, operation: str, data_format: str, payload: bytes) -> ModelAnswer:
        """`operation` ("predict" or "predict_proba") on rows given as JSON or Arrow IPC (`data_format`)."""
        slot = await self._acquire(source.key)
        try:
            return await self._run_on(slot, source, operation, data_format, payload)
        finally:
            self._release(slot)

    async def _acquire(self, key: str) -> _Slot:
        while True:
            if self._closed:
                raise ModelWorkerFailed("The service is stopping")
            slot = self._choose(key)
            if slot is not None:
                slot.busy = True
                return slot
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)

    def _choose(self, key: str) -> _Slot | None:
        idle = [slot for slot in self._slots if not slot.busy]
        if loaded := [slot for slot in idle if slot.model == key]:
            return loaded[0]
        if fresh := [slot for slot in idle if slot.model is None]:
            return fresh[0]
        if any(slot.model == key for slot in self._slots):
            return None  # wait for the worker that has it, rather than evict another model
        return min(idle, key=lambda slot: slot.last_used) if idle else None

    def _release(self, slot: _Slot) -> None:
        slot.busy = False
        slot.last_used = time.monotonic()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _run_on(
        self, slot: _Slot, source: ModelSource, operation: str, data_format: str, payload: bytes
    ) -> ModelAnswer:
        if slot.worker is not None and slot.model not in (None, source.key):
            self._replace(slot)  # a fresh process for another model
        if slot.worker is None:
            slot.worker = self._fresh_worker()
        worker = slot.worker
        loaded, load_ms = False, None
        if worker.model is None:
            try:
                loaded, load_ms = True, await self._load(slot, worker, source)
            finally:
                self._top_up_spares()
        answer, data = await self._exchange(
            slot, source, {"op": operation, "format": data_format}, payload, self._limits.call_timeout
        )
        if worker.cpu_seconds > CPU_SECONDS * RECYCLE_AT:
            self._replace(slot)  # before the kernel's SIGXCPU ends it in the middle of someone's call
        if not answer.get("ok"):
            raise self._failure(source, answer)
        # Model code shares the worker process and can write on its pipe: what comes back is checked like input.
        try:
            rows = await anyio.to_thread.run_sync(json.loads, data) if len(data) > 1_000_000 else json.loads(data)
        except ValueError:
            rows = None
        if not isinstance(rows, list):
            self._replace(slot)
            raise ModelWorkerFailed(f"The worker running model {source.key} answered something other than rows")
        return ModelAnswer(rows, loaded, load_ms)

    async def _load(self, slot: _Slot, worker: WorkerProcess, source: ModelSource) -> float:
        """Load the version in the slot's fresh worker; milliseconds spent waiting for the worker and loading."""
        started = time.perf_counter()
        try:
            await worker.ready(self._limits.load_timeout)
        except TimeoutError:
            self._replace(slot)
            raise ModelCallTimedOut(
                f"No model worker started within {self._limits.load_timeout:g} s; try again"
            ) from None
        except (asyncio.IncompleteReadError, ProtocolError, OSError) as exc:
            status = await worker.exit_status()
            self._replace(slot)
            raise ModelWorkerFailed(f"A model worker could not start ({status}); see the service log") from exc
        self._check_isolation(worker.greeting)
        answer, _ = await self._exchange(
            slot, source, {"op": "load", "directory": source.directory.name}, b"", self._limits.load_timeout
        )
        if not answer.get("ok"):
            self._replace(slot)  # the model's code ran (in part): this process serves no other
            if answer.get("error") == "memory":
                raise ModelOutOfMemory(self._out_of_memory(source, "while loading"))
            raise ModelUnusable(f"Model {source.key} could not be loaded: {answer.get('message')}")
        worker.model, worker.directory = source.key, source.directory
        return (time.perf_counter() - started) * 1000

    async def _exchange(
        self, slot: _Slot, source: ModelSource, header: dict[str, Any], payload: bytes, timeout: float
    ) -> tuple[dict[str, Any], bytes]:
        worker = slot.worker
        assert worker is not None
        try:
            return await asyncio.wait_for(worker.call(header, payload), timeout)
        except TimeoutError:
            self._replace(slot)
            doing = "loading" if header["op"] == "load" else "predicting"
            raise ModelCallTimedOut(
                f"Model {source.key} did not finish {doing} within {timeout:g} s; its worker was stopped"
            ) from None
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            status = await worker.exit_status()
            self._replace(slot)
            raise ModelWorkerFailed(
                f"The worker running model {source.key} died ({status}): the model crashed, or the system "
                f"killed it (the memory limit of model workers is {_gib(self._limits.memory_bytes)})"
            ) from exc
        except ProtocolError as exc:
            self._replace(slot)
            raise ModelWorkerFailed(f"The worker running model {source.key} answered out of protocol: {exc}") from exc
        except BaseException:  # cancelled mid-call: its answer would be read by the next call
            self._replace(slot)
            raise

    def _check_isolation(self, greeting: dict[str, Any]) -> None:
        """Say once in the log when a worker got less isolation than configured (the kernel refused a namespace)."""
        if self._isolation_noted:
            return
        if not self._limits.network and greeting.get("network") != "none" and self._owner is not None:
            logger.warning("Model workers could not leave the network (no network namespace): model code can reach it")
            self._isolation_noted = True

    def _failure(self, source: ModelSource, answer: dict[str, Any]) -> HokusaiError:
        kind, message = answer.get("error"), answer.get("message")
        if kind == "memory":
            return ModelOutOfMemory(self._out_of_memory(source, "while predicting"))
        if kind == "input":
            return ModelRejectedInput(f"Model {source.key} rejected the input: {message}")
        if kind == "no_probabilities":
            return Unprocessable(
                f"Model {source.key} does not give class probabilities, which roc_auc and log_loss need"
            )
        if kind == "output":
            return Unprocessable(f"Model {source.key}: {message}")
        return ModelWorkerFailed(f"The worker running model {source.key} failed: {message}")

    def _out_of_memory(self, source: ModelSource, when: str) -> str:
        return (
            f"Model {source.key} exceeded the memory limit of model workers ({_gib(self._limits.memory_bytes)}) {when}"
        )

    def _spawn(self) -> WorkerProcess:
        command = [
            sys.executable,
            "-I",  # no PYTHON* variables, no user site-packages, no working directory on the import path
            "-m",
            "hokusai.server.models.worker",
            f"--cache-dir={self._cache_dir.resolve()}",
            f"--memory-bytes={self._limits.memory_bytes}",
            f"--cpu-seconds={CPU_SECONDS}",
            f"--open-files={OPEN_FILES}",
            f"--user={self._limits.user if self._owner else ''}",
            f"--max-request-bytes={MAX_REQUEST_BYTES}",
        ]
        if not self._limits.network:
            command.append("--no-network")
        assert self._scratch_root is not None, "start() first"
        return WorkerProcess(command, self._owner, self._scratch_root)

    def _replace(self, slot: _Slot) -> None:
        """Stop the slot's worker (in the background) and have a fresh one warm before the next call needs it: the
        pool's spares when it keeps them (the next call takes one), else a new process in the slot."""
        if slot.worker is not None:
            self._stop(slot.worker)
        slot.worker = None if self._closed or self._spare_workers else self._spawn()

    def _stop(self, worker: WorkerProcess) -> None:
        task = asyncio.create_task(worker.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)


def worker_environment(scratch: Path) -> dict[str, str]:
    """A clean environment: HOME and TMPDIR in the worker's own scratch directory. The service's environment is read
    here only to pass on what is no secret (PASSED_VARIABLES): everything else a worker gets as arguments."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name in PASSED_VARIABLES or name.startswith(PASSED_PREFIXES)
    }
    environment.update(HOME=str(scratch), TMPDIR=str(scratch), PYTHONDONTWRITEBYTECODE="1")
    environment.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return environment


def refuse_inspection_by_same_user() -> bool:
    """Mark the API process not dumpable: its /proc files (environ, with the database URL and keys; mem) become
    root's and ptrace is refused, so model workers running as the same user cannot read its secrets from it.
    False where the kernel call is not there (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0


def _holds_models(cache_dir: Path) -> bool:
    """Blocking: the model cache holds a version's files (not only a fetch in progress)."""
    return any(child.is_dir() and not child.name.endswith(".partial") for child in cache_dir.iterdir())


def _scratch_root() -> str:
    """Blocking: this process's directory of worker scratch directories (traversable, not listable, by workers);
    those of processes that died without cleaning up (killed) are removed first."""
    for stale in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        pid = stale.name.removeprefix(SCRATCH_PREFIX).partition("-")[0]
        with contextlib.suppress(OSError, ValueError):
            if stale.lstat().st_uid == os.geteuid() and stale.is_dir() and not psutil.pid_exists(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
    root = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
    os.chmod(root, 0o711)  # noqa: S103 (workers reach their own directory in it, and list nothing)
    return root


def _scratch_directory(owner: tuple[int, int] | None, root: Path) -> str:
    """Blocking: the worker's HOME and TMPDIR, outside the service's HOME, owned by the worker's user."""
    scratch = tempfile.mkdtemp(prefix="worker-", dir=root)
    if owner is not None:
        os.chown(scratch, *owner)
    return scratch


async def _log_stderr(process: asyncio.subprocess.Process) -> None:
    """What the model (and MLflow) print, into the service log: a bounded number of lines, control characters
    escaped. Read to the end either way, so a chatty model never blocks on a full pipe."""
    assert process.stderr is not None
    logged, pending = 0, b""
    while chunk := await process.stderr.read(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        pending = pending[-4096:]
        for line in lines:
            if logged < STDERR_LINES_LOGGED and line.strip():
                text = line[:1000].decode(errors="replace").encode("unicode_escape").decode()
                logger.info("model worker %d: %s", process.pid, text)
                logged += 1
                if logged == STDERR_LINES_LOGGED:
                    logger.info("model worker %d: further output not logged", process.pid)


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"
