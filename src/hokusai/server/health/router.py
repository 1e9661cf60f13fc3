"""/health /ready /live /version /metrics: public, read-only, never blocking the event loop."""

from __future__ import annotations

from datetime import UTC, datetime

import psutil
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from hokusai.server.health.schemas import HealthBody, LivenessBody, ReadinessBody, ReadinessCheck, VersionBody
from hokusai.server.health.service import overall_status, run_checks, services_summary
from hokusai.server.runtime import get_runtime

API_VERSION = "v1"

router = APIRouter(tags=["health"])


def utc_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@router.get("/health", response_model=HealthBody)
async def health(request: Request) -> HealthBody:
    runtime = get_runtime(request)
    results = await run_checks(runtime)
    return HealthBody(
        status=overall_status(results),
        version=runtime.build.version,
        services=services_summary(results, runtime.settings.database_kind),
        timestamp=utc_timestamp(),
    )


@router.get("/ready", response_model=ReadinessBody, responses={503: {"model": ReadinessBody}})
async def ready(request: Request) -> JSONResponse:
    results = [r for r in await run_checks(get_runtime(request)) if r.status != "disabled"]
    is_ready = all(r.passed for r in results if r.critical)
    body = ReadinessBody(
        ready=is_ready,
        can_serve_traffic=is_ready,
        checks=[ReadinessCheck(name=r.name, passed=r.passed, error=r.error, critical=r.critical) for r in results],
        degraded_mode=any(not r.passed for r in results if not r.critical),
    )
    return JSONResponse(body.model_dump(), status_code=200 if is_ready else 503)


@router.get("/live", response_model=LivenessBody)
async def live(request: Request) -> LivenessBody:
    rss_bytes = psutil.Process().memory_info().rss  # one read of /proc: no need for a thread
    return LivenessBody(
        alive=True,
        uptime=round(get_runtime(request).uptime_seconds, 3),
        memory_usage_mb=round(rss_bytes / 2**20, 1),
    )


@router.get("/version", response_model=VersionBody)
async def version(request: Request) -> VersionBody:
    build = get_runtime(request).build
    return VersionBody(
        version=build.version, build_date=build.build_date, git_commit=build.git_commit, api_version=API_VERSION
    )


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
