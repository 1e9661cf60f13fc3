"""Entry point of the embedded MLflow server process: `python -m hokusai.server.mlflow.launcher ...`.

`mlflow server` runs a Python process whose only job is to spawn and wait on a uvicorn process that imports
MLflow again: twice the import time (~3 s) and twice the memory (~290 MB each) on this machine. This launcher
does what that command does for our fixed configuration (SQL store, proxied artifacts, one uvicorn worker, no
job execution) in a single process: set the server environment MLflow's workers read, create or upgrade the
tracking store, then serve MLflow's own FastAPI app (the whole API, Flask routes included).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import uuid

PR_SET_PDEATHSIG = 1
PARENT_VARIABLE = "HOKUSAI_MLFLOW_PARENT_PID"


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the supervising service dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    # The pid of the service that started this process, as it said (else the parent now): a service killed while
    # this interpreter was still starting would leave it adopted by init before any getppid() here could tell.
    parent = int(os.environ.get(PARENT_VARIABLE) or os.getppid())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(0)


def server_environment(backend_store_uri: str, artifacts_destination: str) -> dict[str, str]:
    """The variables `mlflow server` hands its workers (see mlflow.server._run_server), for our configuration."""
    from mlflow.server import constants

    return {
        constants.BACKEND_STORE_URI_ENV_VAR: backend_store_uri,
        constants.REGISTRY_STORE_URI_ENV_VAR: backend_store_uri,
        constants.ARTIFACT_ROOT_ENV_VAR: "mlflow-artifacts:/",
        constants.SERVE_ARTIFACTS_ENV_VAR: "true",
        constants.ARTIFACTS_DESTINATION_ENV_VAR: artifacts_destination,
        "_MLFLOW_SGI_NAME": "uvicorn",
        "_MLFLOW_SERVER_BOOT_ID": uuid.uuid4().hex,
        "_MLFLOW_IN_JOB_EXECUTOR": "false",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_ENABLE_WORKSPACES": "false",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the embedded MLflow tracking server")
    parser.add_argument("--backend-store-uri", required=True)
    parser.add_argument("--artifacts-destination", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    die_with_parent()
    os.environ.update(server_environment(args.backend_store_uri, args.artifacts_destination))

    import uvicorn
    from mlflow.server.handlers import initialize_backend_stores

    initialize_backend_stores(args.backend_store_uri, args.backend_store_uri, "mlflow-artifacts:/")
    uvicorn.run(
        "mlflow.server.fastapi_app:app",
        host=args.host,
        port=args.port,
        workers=1,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
