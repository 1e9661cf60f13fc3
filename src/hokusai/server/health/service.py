"""Health checks of what the service depends on, run concurrently, each with a short timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from redis.exceptions import RedisError

from hokusai.server.runtime import Runtime

CheckStatus = Literal["healthy", "unhealthy", "disabled"]
OverallStatus = Literal["healthy", "degraded", "unhealthy"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: CheckStatus
    critical: bool
    error: str | None = None
    response_time_ms: float | None = None

    @property
    def passed(self) -> bool:
        return self.status != "unhealthy"


async def _timed(name: str, critical: bool, probe: Callable[[], Awaitable[None]], timeout: float) -> CheckResult:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), timeout)
    except TimeoutError:
        return CheckResult(name, "unhealthy", critical, f"no answer within {timeout:g}s")
    except Exception as exc:  # a health check reports every failure; it must not raise
        return CheckResult(name, "unhealthy", critical, _describe(exc))
    return CheckResult(name, "healthy", critical, None, round((time.perf_counter() - started) * 1000, 2))


def _describe(exc: Exception) -> str:
    detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
    return str(detail).splitlines()[0][:300]


async def run_checks(runtime: Runtime) -> list[CheckResult]:
    """Database and MLflow are critical (the service cannot serve without them); Redis is not.

    Answered from the health cache: public routes (/health, /ready, /health/status) share one run per TTL.
    """
    return await runtime.health_cache.get("services", lambda: _run_checks_now(runtime))


async def _run_checks_now(runtime: Runtime) -> list[CheckResult]:
    timeout = runtime.settings.health_check_timeout
    probes = [
        _timed("database", True, runtime.database.ping, timeout),
        _timed("mlflow", True, lambda: runtime.mlflow.ping(timeout), timeout),
    ]
    if runtime.redis is not None:
        probes.append(_timed("redis", False, lambda: _ping_redis(runtime), timeout))
    results = list(await asyncio.gather(*probes))
    if runtime.redis is None:
        results.append(CheckResult("redis", "disabled", False))
    # No message broker is wired into the service yet: reported as such rather than invented.
    results.append(CheckResult("message_queue", "disabled", False))
    return results


async def _ping_redis(runtime: Runtime) -> None:
    """A ping through the Redis breaker: while it is open Redis is reported down without waiting on it."""
    assert runtime.redis is not None
    breaker = runtime.redis_breaker
    if breaker is None:
        await runtime.redis.ping()
        return
    breaker.check()
    try:
        await runtime.redis.ping()
    except RedisError as exc:
        breaker.record_failure(exc)
        raise
    breaker.record_success()


def overall_status(results: list[CheckResult]) -> OverallStatus:
    """Unhealthy when the database is down (nothing works); degraded when anything else that is enabled is."""
    failing = {result.name for result in results if not result.passed}
    if "database" in failing:
        return "unhealthy"
    return "degraded" if failing else "healthy"


def services_summary(results: list[CheckResult], database_kind: str) -> dict[str, str]:
    summary = {result.name: result.status for result in results}
    # The reference names the database "postgres"; say so only when it is one.
    summary["postgres"] = summary["database"] if database_kind == "postgresql" else "disabled"
    return summary
