"""/health /ready /live /version /metrics: public, read-only, never blocking the event loop."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import psutil
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from hokusai.server.auth.dependencies import allow
from hokusai.server.cluster import ClusterOperation
from hokusai.server.deps import Caller, Cluster, Health
from hokusai.server.health.mlflow_checks import basic_checks, detailed_checks
from hokusai.server.health.schemas import (
    BreakerReset,
    HealthBody,
    LivenessBody,
    MlflowConnectivity,
    MlflowDetailedHealth,
    MlflowHealth,
    ReadinessBody,
    ReadinessCheck,
    VersionBody,
)
from hokusai.server.health.service import HealthSources, overall_status, run_checks, services_summary
from hokusai.server.metrics import exposition
from hokusai.server.mlflow.breaker import BreakerState
from hokusai.server.mlflow.upstream import ProbeResult

logger = logging.getLogger(__name__)

API_VERSION = "v1"

router = APIRouter(tags=["health"])


def utc_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@router.get("/health", response_model=HealthBody)
async def health(sources: Health) -> HealthBody:
    results = await run_checks(sources)
    return HealthBody(
        status=overall_status(results),
        version=sources.build.version,
        services=services_summary(results, sources.settings.database_kind),
        timestamp=utc_timestamp(),
    )


@router.get("/ready", response_model=ReadinessBody, responses={503: {"model": ReadinessBody}})
async def ready(sources: Health) -> JSONResponse:
    results = [r for r in await run_checks(sources) if r.status != "disabled"]
    is_ready = all(r.passed for r in results if r.critical)
    body = ReadinessBody(
        ready=is_ready,
        can_serve_traffic=is_ready,
        checks=[ReadinessCheck(name=r.name, passed=r.passed, error=r.error, critical=r.critical) for r in results],
        degraded_mode=any(not r.passed for r in results if not r.critical),
    )
    return JSONResponse(body.model_dump(), status_code=200 if is_ready else 503)


@router.get("/live", response_model=LivenessBody)
async def live(sources: Health) -> LivenessBody:
    rss_bytes = psutil.Process().memory_info().rss  # one read of /proc: no need for a thread
    return LivenessBody(
        alive=True,
        uptime=round(sources.uptime_seconds, 3),
        memory_usage_mb=round(rss_bytes / 2**20, 1),
    )


@router.get("/version", response_model=VersionBody)
async def version(sources: Health) -> VersionBody:
    build = sources.build
    return VersionBody(
        version=build.version, build_date=build.build_date, git_commit=build.git_commit, api_version=API_VERSION
    )


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    return Response(await exposition(), media_type=CONTENT_TYPE_LATEST)


# --- MLflow connection and circuit breaker -------------------------------------------------------------------


@router.get("/health/mlflow", responses={503: {"description": "MLflow unreachable or the breaker is open"}})
async def mlflow_connection(sources: Health) -> JSONResponse:
    state = sources.mlflow.breaker.state
    probe = await _mlflow_probe(sources)
    body: dict = {"connected": probe.ok, "circuit_breaker_state": state.value}
    healthy = probe.ok and state is not BreakerState.OPEN
    if not healthy:
        body["error"] = "MLflow server unavailable" if not probe.ok else "Circuit breaker is open"
        body["detail"] = probe.error or "waiting for the recovery timeout before probing MLflow again"
    body["timestamp"] = utc_timestamp()
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.post(
    "/health/mlflow/reset",
    response_model=BreakerReset,
    response_model_exclude_none=True,
    dependencies=[Depends(allow("health:admin"))],
)
async def reset_breaker(caller: Caller, cluster: Cluster) -> BreakerReset:
    """Every service process's breaker (through Redis); each keeps its own state, `processes_reached` says how many
    were reset."""
    applied = await cluster.run(ClusterOperation.MLFLOW_BREAKER_RESET)
    logger.warning("MLflow circuit breaker reset by API key %s (%d process(es))", caller.id, applied.processes)
    return BreakerReset(
        message="Circuit breaker reset successfully",
        timestamp=utc_timestamp(),
        reset_by="manual_api_call",
        processes_reached=applied.processes,
        warning=applied.warning,
    )


@router.get("/health/status")
async def service_status(sources: Health) -> dict:
    results = await run_checks(sources)
    summary = services_summary(results, sources.settings.database_kind)
    breaker = sources.mlflow.breaker.snapshot()
    memory = psutil.virtual_memory()
    return {
        "timestamp": utc_timestamp(),
        "api_version": sources.build.version,
        "service_name": "hokusai-registry",
        "overall_health": overall_status(results),
        "services": summary,
        "mlflow": {
            "server": sources.mlflow.base_url,
            "embedded": sources.embedded_mlflow,
            "status": {"connected": summary["mlflow"] == "healthy", "circuit_breaker_state": breaker.state.value},
            "circuit_breaker": {
                "state": breaker.state.value,
                "failure_count": breaker.failure_count,
                "last_failure_time": breaker.last_failure_time.isoformat() if breaker.last_failure_time else None,
                "recovery_timeout_seconds": breaker.recovery_timeout,
                "seconds_until_probe": breaker.seconds_until_probe,
                "times_opened": breaker.times_opened,
            },
        },
        # Present with Redis configured: whether calls skip it now (its breaker), and how often they have.
        "redis": _redis_status(sources, summary.get("redis", "disabled")),
        # The events stream publisher: its Redis stream, the backlog of events waiting in the database.
        "message_queue": next(
            (r.details or {"status": r.status, "error": r.error} for r in results if r.name == "message_queue"),
            {"status": "disabled"},
        ),
        "system_info": {
            # System-wide CPU use since the previous call (primed at import), memory in use.
            "cpu_percent": psutil.cpu_percent(interval=None),
            "memory_percent": memory.percent,
            "process_memory_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        },
        "uptime_seconds": round(sources.uptime_seconds, 3),
        "environment": sources.settings.environment,
    }


psutil.cpu_percent(interval=None)  # the first reading only sets the baseline


def _redis_status(sources: HealthSources, status: str) -> dict:
    if sources.redis_breaker is None:
        return {"status": status}
    breaker = sources.redis_breaker.snapshot()
    return {
        "status": status,
        "circuit_breaker": {
            "state": breaker.state,
            "consecutive_failures": breaker.consecutive_failures,
            "times_opened": breaker.times_opened,
            "skipped_calls": breaker.skipped_calls,
            "seconds_until_retry": breaker.seconds_until_retry,
        },
    }


# --- MLflow health family: probes that report, around the breaker ------------------------------------------
# Public and each worth one to seven MLflow calls: answered from the health cache (one run per check per TTL).


async def _mlflow_probe(sources: HealthSources) -> ProbeResult:
    timeout = sources.settings.health_check_timeout
    return await sources.cache.get("mlflow_probe", lambda: sources.mlflow.probe("GET", "/health", timeout))


async def _mlflow_health(sources: Health) -> JSONResponse:
    timeout = sources.settings.health_check_timeout
    checks = await sources.cache.get("mlflow_basic", lambda: basic_checks(sources.mlflow, timeout))
    healthy = all(check["status"] == "healthy" for check in checks.values())
    body = MlflowHealth(
        status="healthy" if healthy else "unhealthy", mlflow_server=sources.mlflow.base_url, checks=checks
    )
    return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)


async def _mlflow_detailed(sources: Health) -> MlflowDetailedHealth:
    timeout = sources.settings.health_check_timeout
    tests = await sources.cache.get("mlflow_detailed", lambda: detailed_checks(sources.mlflow, timeout))
    artifacts = next(test for test in tests if test["endpoint"] == "artifacts_list")
    return MlflowDetailedHealth(
        mlflow_server=sources.mlflow.base_url,
        timestamp=time.strftime("%a %b %e %H:%M:%S UTC %Y", time.gmtime()),
        environment={
            "MLFLOW_SERVER_URL": sources.mlflow.base_url,
            # Observed, not configured: whether the server answered the artifacts API just now.
            "MLFLOW_SERVE_ARTIFACTS": "true" if artifacts["success"] else "false",
            "PROXY_DEBUG": logger.isEnabledFor(logging.DEBUG),
        },
        tests=tests,
        overall_health=all(test["success"] for test in tests),
    )


async def _mlflow_connectivity(sources: Health) -> MlflowConnectivity:
    probe = await _mlflow_probe(sources)
    status = "connected" if probe.ok else "timeout" if probe.timed_out else "error"
    return MlflowConnectivity(
        status=status,
        mlflow_server=sources.mlflow.base_url,
        response_code=probe.status_code,
        response_time_ms=probe.response_time_ms,
        error=probe.error,
    )


for _prefix in ("/mlflow", "/api"):
    router.add_api_route(
        f"{_prefix}/health/mlflow",
        _mlflow_health,
        methods=["GET"],
        response_model=MlflowHealth,
        responses={503: {"model": MlflowHealth}},
    )
    router.add_api_route(
        f"{_prefix}/health/mlflow/detailed", _mlflow_detailed, methods=["GET"], response_model=MlflowDetailedHealth
    )
router.add_api_route(
    "/api/health/mlflow/connectivity", _mlflow_connectivity, methods=["GET"], response_model=MlflowConnectivity
)
