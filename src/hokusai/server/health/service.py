"""Health checks of what the service depends on, run concurrently, each with a short timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from hokusai.server.buildinfo import BuildInfo
from hokusai.server.config import Settings
from hokusai.server.db import Database
from hokusai.server.health.cache import HealthCache
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.redis_breaker import RedisBreaker

if TYPE_CHECKING:
    from hokusai.server.events.stream import StreamPublisher

# "degraded": working, but not as it should (the events stream's backlog is not draining); it still passes.
CheckStatus = Literal["healthy", "degraded", "unhealthy", "disabled"]
OverallStatus = Literal["healthy", "degraded", "unhealthy"]


@dataclass(frozen=True)
class HealthSources:
    """What the health routes look at: the parts of the running service, built once in the lifespan."""

    settings: Settings
    database: Database
    mlflow: MlflowUpstream
    embedded_mlflow: bool  # whether MLflow is this service's own child process
    redis: Redis | None
    redis_breaker: RedisBreaker | None
    cache: HealthCache
    build: BuildInfo
    started_at: float  # time.monotonic() at start
    events_stream: StreamPublisher | None = None  # the Redis stream publisher, reported as `message_queue`

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started_at


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: CheckStatus
    critical: bool
    error: str | None = None
    response_time_ms: float | None = None
    details: dict[str, Any] | None = None  # more than the status, for /health/status

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


async def run_checks(sources: HealthSources) -> list[CheckResult]:
    """Database and MLflow are critical (the service cannot serve without them); Redis is not.

    Answered from the health cache: public routes (/health, /ready, /health/status) share one run per TTL.
    """
    return await sources.cache.get("services", lambda: _run_checks_now(sources))


async def _run_checks_now(sources: HealthSources) -> list[CheckResult]:
    timeout = sources.settings.health_check_timeout
    probes = [
        _timed("database", True, sources.database.ping, timeout),
        _timed("mlflow", True, lambda: sources.mlflow.ping(timeout), timeout),
    ]
    if sources.redis is not None:
        probes.append(_timed("redis", False, lambda: _ping_redis(sources), timeout))
    probes.append(message_queue_check(sources.events_stream, timeout))
    results = list(await asyncio.gather(*probes))
    if sources.redis is None:
        results.insert(-1, CheckResult("redis", "disabled", False))
    return results


async def message_queue_check(publisher: StreamPublisher | None, timeout: float) -> CheckResult:
    """The events stream publisher's state: disabled without Redis; healthy while Redis answers and the backlog
    drains; unhealthy while Redis is down (events wait in the database, nothing is lost); degraded when the backlog
    does not drain or the stream belongs to another event log. Never critical: the API serves without it."""
    if publisher is None:
        return CheckResult("message_queue", "disabled", False)
    started = time.perf_counter()
    try:
        state = await asyncio.wait_for(publisher.state(), timeout)
    except TimeoutError:
        return CheckResult("message_queue", "unhealthy", False, f"no answer within {timeout:g}s")
    except Exception as exc:  # a health check reports every failure; it must not raise
        return CheckResult("message_queue", "unhealthy", False, _describe(exc))
    elapsed = round((time.perf_counter() - started) * 1000, 2)
    error = None if state.status in ("healthy", "disabled") else state.detail
    return CheckResult("message_queue", state.status, False, error, elapsed, state.as_dict())


async def _ping_redis(sources: HealthSources) -> None:
    """A ping through the Redis breaker: while it is open Redis is reported down without waiting on it."""
    assert sources.redis is not None
    breaker = sources.redis_breaker
    if breaker is None:
        await sources.redis.ping()
        return
    breaker.check()
    try:
        await sources.redis.ping()
    except RedisError as exc:
        breaker.record_failure(exc)
        raise
    breaker.record_success()


def overall_status(results: list[CheckResult]) -> OverallStatus:
    """Unhealthy when the database is down (nothing works); degraded when anything else that is enabled is."""
    failing = {result.name for result in results if not result.passed}
    if "database" in failing:
        return "unhealthy"
    return "degraded" if failing or any(result.status == "degraded" for result in results) else "healthy"


def services_summary(results: list[CheckResult], database_kind: str) -> dict[str, str]:
    summary = {result.name: result.status for result in results}
    # The reference names the database "postgres"; say so only when it is one.
    summary["postgres"] = summary["database"] if database_kind == "postgresql" else "disabled"
    return summary
