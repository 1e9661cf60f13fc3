"""A model worker: `python -m hokusai.server.models.worker ...`, started and supervised by pool.py.

The only process that loads model files (`mlflow.pyfunc.load_model` runs whatever code a model ships). Before it
reads a request it bounds itself (address space, CPU seconds, open files, no core dumps), drops to an unprivileged
user when started as root, asks to die with the API process, and keeps the protocol's pipes for itself: model code
that prints or reads stdin touches stderr and /dev/null, not the conversation with the API.

Requests are read one at a time from the descriptor that was stdin, answers written to the one that was stdout
(see protocol.py). One model at a time: the pool gives each model version processes of its own, so one model's
code never sees another's inputs.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import math
import os
import pwd
import resource
import signal
import sys
import time
from typing import Any

from hokusai.server.models.protocol import encode, read_message_blocking

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNET = 0x40000000
MESSAGE_LIMIT = 2000  # characters of a model's error message passed on
# Imported before the greeting, beside MLflow's pyfunc and the data libraries, so that a version's first call only
# loads its model: the flavours most models here use (scikit-learn, and skops, MLflow's default way to save it).
# One that is not installed is skipped.
FLAVOUR_MODULES = ("sklearn", "mlflow.sklearn", "skops.io", "cloudpickle")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load and run one model at a time for the Hokusai API")
    parser.add_argument("--cache-dir", required=True, help="The model cache (load requests name a directory in it)")
    parser.add_argument("--memory-bytes", type=int, required=True)
    parser.add_argument("--cpu-seconds", type=int, required=True)
    parser.add_argument("--open-files", type=int, required=True)
    parser.add_argument("--user", default="", help="Unprivileged user to run as when started as root")
    parser.add_argument("--max-request-bytes", type=int, required=True)
    parser.add_argument("--no-network", action="store_true", help="Run in an empty network namespace (needs root)")
    args = parser.parse_args(argv)

    requests, answers = _keep_protocol_pipes()
    limit_resources(args.memory_bytes, args.cpu_seconds, args.open_files)
    # Opened while the service's user can still reach them; read later through /proc/self/fd (see _reachable).
    cache = os.open(args.cache_dir, os.O_RDONLY | os.O_DIRECTORY)
    import_dirs = {entry: os.open(entry, os.O_RDONLY | os.O_DIRECTORY) for entry in sys.path if os.path.isdir(entry)}
    network = "none" if args.no_network and leave_the_network() else "host"
    dropped = drop_privileges(args.user)
    cache_path = _reachable(args.cache_dir, cache)
    if dropped:
        _reach_imports(import_dirs)
    _die_with_parent()

    imported = warm_up()
    worker = ModelWorker(cache_path)
    greeting = {
        "ok": True,
        "pid": os.getpid(),
        "uid": os.getuid(),
        "dropped_privileges": dropped,
        "network": network,
        "imported": imported,
    }
    answers.write(encode(greeting))
    answers.flush()
    while (message := read_message_blocking(requests, args.max_request_bytes)) is not None:
        header, payload = worker.handle(*message)
        header["cpu_seconds"] = _cpu_seconds()
        answers.write(encode(header, payload))
        answers.flush()


def warm_up() -> list[str]:
    """What a first call would otherwise wait for, done before the worker greets (it may be a spare, started ahead
    of any call): the imports (seconds on two busy cores) and MLflow's map of installed packages, which
    `load_model` builds to compare a model's requirements with this environment (it reads the file list of every
    installed distribution: seconds again). The modules imported."""
    import mlflow.pyfunc  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401

    imported = ["mlflow.pyfunc", "pandas", "pyarrow"]
    for module in FLAVOUR_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        imported.append(module)
    try:
        from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches
    except ImportError:  # another MLflow: its first load builds what it needs
        return imported
    warn_dependency_requirement_mismatches(["mlflow"])  # builds and keeps the map; MLflow itself is installed
    return imported


def _keep_protocol_pipes() -> tuple[Any, Any]:
    """The pipes to the API on private descriptors; stdin becomes /dev/null, stdout goes to stderr."""
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return requests, answers


def limit_resources(memory_bytes: int, cpu_seconds: int, open_files: int) -> None:
    """Soft and hard limits alike, so model code cannot raise them again."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))  # SIGXCPU first, then SIGKILL
    _, hard_files = resource.getrlimit(resource.RLIMIT_NOFILE)
    files = min(open_files, hard_files) if hard_files != resource.RLIM_INFINITY else open_files
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a core file would hold the model's inputs


def leave_the_network() -> bool:
    """A network namespace of its own, with nothing in it (not even a loopback that is up): model code reaches no
    service, not the MLflow behind the gateway nor the API itself. False where the kernel refuses (not root)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.unshare(CLONE_NEWNET) == 0


def drop_privileges(user: str) -> bool:
    """Run as `user` from here on when started as root (no supplementary groups); False when not root or no user
    was given (the worker then runs as the service's own user)."""
    if os.geteuid() != 0 or not user:
        return False
    entry = pwd.getpwnam(user)
    if entry.pw_uid == 0:
        raise SystemExit(f"model worker user {user!r} is root; refusing to run model code as root")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        return True
    raise SystemExit("model worker could regain root after dropping privileges")


def _reachable(path: str, descriptor: int) -> str:
    """`path` when this process can still read it, else the same directory through the descriptor opened before
    dropping privileges (the service's HOME, or the interpreter under /root, may be closed to the worker's user)."""
    return path if os.access(path, os.R_OK | os.X_OK) else f"/proc/self/fd/{descriptor}"


def _reach_imports(descriptors: dict[str, int]) -> None:
    """Import paths the worker's user cannot read (a Python installed under /root) are read through the
    descriptors opened before the drop: sys.path and the __path__ of packages imported already."""
    moved = {path: f"/proc/self/fd/{fd}" for path, fd in descriptors.items() if _reachable(path, fd) != path}
    if not moved:
        return

    def reached(path: str) -> str:
        for original, replacement in moved.items():
            if path == original or path.startswith(original + os.sep):
                return replacement + path[len(original) :]
        return path

    sys.path[:] = [reached(entry) for entry in sys.path]
    for module in list(sys.modules.values()):
        package_path = getattr(module, "__path__", None)
        if isinstance(package_path, list):
            package_path[:] = [reached(entry) for entry in package_path]
    sys.path_importer_cache.clear()


def _die_with_parent() -> None:
    """SIGKILL (which model code cannot catch) when the API process dies. After the uid change, which clears it."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary can give model code privileges back
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 3)


class ModelWorker:
    """The model loaded in this process and the operations on it; every answer is a (header, payload) pair."""

    def __init__(self, cache_path: str) -> None:
        self._cache_path = cache_path
        self._model: Any = None

    def handle(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        operation = header.get("op")
        try:
            if operation == "load":
                return self._load(str(header.get("directory", "")))
            if operation in ("predict", "predict_proba"):
                return self._predict(operation, str(header.get("format")), payload)
            return _failure("protocol", f"unknown operation {operation!r}")
        except MemoryError:
            return _failure("memory", "the model exceeded the memory limit of model workers")

    def _load(self, directory: str) -> tuple[dict[str, Any], bytes]:
        if self._model is not None:
            return _failure("protocol", "this worker has loaded a model already")
        if not directory or "/" in directory or directory in (".", ".."):
            return _failure("protocol", f"not a directory of the model cache: {directory!r}")
        import mlflow.pyfunc

        started = time.perf_counter()
        try:
            self._model = mlflow.pyfunc.load_model(f"{self._cache_path}/{directory}")
        except MemoryError:
            raise
        except (Exception, SystemExit) as exc:  # whatever the flavor or the model's own code raises
            return _failure("load", _message(exc))
        return {"ok": True, "load_ms": (time.perf_counter() - started) * 1000}, b""

    def _predict(self, operation: str, data_format: str, payload: bytes) -> tuple[dict[str, Any], bytes]:
        if self._model is None:
            return _failure("protocol", "no model is loaded")
        try:
            frame = _frame(data_format, payload)
        except (ValueError, TypeError) as exc:  # columns of different lengths, mixed shapes
            return _failure("input", f"inputs cannot be read as a table: {_message(exc)}")
        if operation == "predict_proba":
            return self._probabilities(frame)
        try:
            output = self._model.predict(frame)
        except MemoryError:
            raise
        except (Exception, SystemExit) as exc:  # schema enforcement and flavors raise many kinds: the input's problem
            return _failure("input", _message(exc))
        return _json_answer(jsonable_predictions(output))

    def _probabilities(self, frame: Any) -> tuple[dict[str, Any], bytes]:
        """Class probabilities from the underlying estimator; pyfunc's predict gives labels only."""
        try:
            raw = self._model.get_raw_model()
        except (Exception, SystemExit):  # not every flavor exposes its raw model
            raw = None
        if raw is None or not hasattr(raw, "predict_proba"):
            return _failure("no_probabilities", "this model does not give class probabilities")
        try:
            output = raw.predict_proba(frame)
        except MemoryError:
            raise
        except (Exception, SystemExit) as exc:  # the estimator's own complaint
            return _failure("input", _message(exc))
        return _json_answer(jsonable_predictions(output))


def _frame(data_format: str, payload: bytes) -> Any:
    import pandas as pd

    if data_format == "arrow":
        from hokusai.server.models.protocol import arrow_to_frame

        return arrow_to_frame(payload)
    return pd.DataFrame(json.loads(payload))


def _json_answer(rows: list[Any]) -> tuple[dict[str, Any], bytes]:
    try:
        return {"ok": True}, json.dumps(rows, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        return _failure("output", f"the model's predictions cannot be represented as JSON: {_message(exc)}")


def _failure(kind: str, message: str) -> tuple[dict[str, Any], bytes]:
    return {"ok": False, "error": kind, "message": message}, b""


def _message(exc: BaseException) -> str:
    """The exception's whole message (bounded), not its first line: a model's complaint is often several lines."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def jsonable_predictions(output: Any) -> list[Any]:
    import numpy as np
    import pandas as pd

    if isinstance(output, pd.DataFrame):
        rows = output.to_dict(orient="records")
    elif isinstance(output, pd.Series | np.ndarray):
        rows = output.tolist()
    elif isinstance(output, list):
        rows = output
    else:
        rows = [output]
    return [_finite(row) for row in rows]


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null. NumPy scalars become Python ones."""
    if hasattr(value, "item") and not isinstance(value, list | dict):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


if __name__ == "__main__":
    main()
