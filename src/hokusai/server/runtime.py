"""Runtime: the long-lived parts of one running app (database, key service, MLflow, Redis), built in the lifespan.

It builds and stops them; it is not looked up. What handlers and middlewares need is handed out by `provide`
(app.state, read by the providers in deps.py) and `gateway_parts` (the MLflow gateway's constructor argument).
Nothing below this module imports it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import anyio
from redis.asyncio import Redis
from starlette.datastructures import State

from hokusai.server.analytics.service import ModelAnalytics
from hokusai.server.auth.gate import Gate
from hokusai.server.auth.identity import KeyIdentifier
from hokusai.server.auth.policy import Policy
from hokusai.server.auth.service import ApiKeyService, ensure_admin_key
from hokusai.server.auth.sessions import BrowserSessions
from hokusai.server.auth.store import ApiKeyStore
from hokusai.server.buildinfo import BuildInfo, read_build_info
from hokusai.server.cluster import ClusterBus, ClusterOperation
from hokusai.server.config import Settings
from hokusai.server.db import Database, require_migrated, run_migrations
from hokusai.server.dspy.service import DspyService
from hokusai.server.events.service import EventService
from hokusai.server.health.cache import HealthCache
from hokusai.server.health.service import HealthSources
from hokusai.server.metrics import track_breaker
from hokusai.server.mlflow.breaker import CircuitBreaker
from hokusai.server.mlflow.embedded import EmbeddedMlflow
from hokusai.server.mlflow.proxy import GatewayParts
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.ratelimit.policies import parse_limit, route_limits
from hokusai.server.ratelimit.service import RequestRateLimiter
from hokusai.server.ratelimit.throttle import Throttle
from hokusai.server.redis_breaker import RedisBreaker, redis_retry
from hokusai.server.registry.cache import RegistryReadCache
from hokusai.server.registry.locks import ModelLocks
from hokusai.server.registry.service import RegistryService
from hokusai.server.webhooks.service import WebhookService

logger = logging.getLogger(__name__)

AdminKeyAnnouncer = Callable[[str, str], None]


@dataclass
class Runtime:
    settings: Settings
    database: Database
    api_keys: ApiKeyService
    sessions: BrowserSessions
    mlflow: MlflowUpstream
    embedded_mlflow: EmbeddedMlflow | None
    redis: Redis | None
    redis_breaker: RedisBreaker | None
    rate_limiter: RequestRateLimiter
    registry: RegistryService
    analytics: ModelAnalytics
    dspy: DspyService
    build: BuildInfo
    started_at: float
    health_cache: HealthCache
    policy: Policy
    gate: Gate
    cluster: ClusterBus
    events: EventService
    webhooks: WebhookService

    @classmethod
    async def start(cls, settings: Settings, announce_admin_key: AdminKeyAnnouncer) -> Runtime:
        settings.home.mkdir(parents=True, exist_ok=True)
        # Made at start, so `POST /models/evaluate` names a directory that exists from the first minute.
        settings.datasets_root.mkdir(parents=True, exist_ok=True)
        if not settings.migrate_on_start:
            await anyio.to_thread.run_sync(require_migrated, settings.database_dsn)
        embedded = None
        if settings.embedded_mlflow and settings.embedded_mlflow_url is None:
            # First, so its ~4 s start overlaps with our own migrations. (With several API workers, the serve
            # process starts the one embedded MLflow and hands its URL to the workers as embedded_mlflow_url.)
            embedded = EmbeddedMlflow(
                settings.home, settings.mlflow_port, webhooks=settings.mlflow_webhook_callback is not None
            )
            await embedded.start()
        mlflow_url = embedded.url if embedded else str(settings.embedded_mlflow_url or settings.mlflow_url)

        if settings.migrate_on_start:
            await anyio.to_thread.run_sync(run_migrations, settings.database_dsn)
        database = Database(settings.async_database_dsn)
        store = ApiKeyStore(database)
        supplied = settings.bootstrap_admin_key.get_secret_value() if settings.bootstrap_admin_key else None
        new_admin_key = await ensure_admin_key(store, supplied, settings.admin_key_path)
        if new_admin_key is not None:
            announce_admin_key(new_admin_key, str(settings.admin_key_path))

        redis, redis_breaker = None, None
        health_cache = HealthCache(settings.health_cache_ttl)
        if settings.redis_url is not None:
            timeout = settings.redis_timeout
            redis = Redis.from_url(
                str(settings.redis_url), socket_timeout=timeout, socket_connect_timeout=timeout, retry=redis_retry()
            )
            # One breaker for every use of Redis: the rate limiter's own client and the service's.
            redis_breaker = RedisBreaker(settings.redis_failure_threshold, settings.redis_retry_after)
            redis_breaker.add_listener(health_cache.clear)

        mlflow = MlflowUpstream(
            mlflow_url,
            settings.mlflow_timeout,
            breaker=build_breaker(settings),
            authorization=upstream_authorization(settings),
            keepalive=settings.reuse_mlflow_connections,
        )
        mlflow.breaker.add_listener(health_cache.clear)  # health never shows the state from before a transition
        events = EventService.build(settings, database, mlflow, redis, redis_breaker)
        analytics = ModelAnalytics.build(settings, mlflow, database, events.outbox)
        await analytics.start()
        policy = Policy()  # the one policy: route guards, the gateway and the registry's batches all ask it
        registry = RegistryService(
            mlflow,
            database,
            RegistryReadCache(
                settings.registry_cache_ttl,
                redis,
                redis_breaker,
                prefix=settings.redis_key_prefix,
                single_flight=settings.cache_single_flight,
            ),
            on_registered=analytics.impact.record_version,
            # With Redis, every service process takes turns on a model.
            locks=ModelLocks(redis, prefix=settings.redis_key_prefix),
            policy=policy,
            idempotency_pending_seconds=settings.idempotency_pending_seconds,
            changes=events.changes,
            on_expected=analytics.predictions.expect,  # fetch its files, keep a spare worker (issue 17)
        )
        dspy = DspyService(settings, database, analytics.model_files)
        await dspy.start()
        api_keys = ApiKeyService(store, settings.auth_cache_ttl)
        sessions = BrowserSessions(database, settings.session_ttl, settings.auth_cache_ttl)
        api_keys.on_revoke(sessions.forget_key)
        rate_limiter = build_rate_limiter(settings, redis_breaker)
        # Operations asked of one process that act on every process's memory; each breaker keeps its own state.
        cluster = ClusterBus(redis, redis_breaker, prefix=settings.redis_key_prefix)
        cluster.register(ClusterOperation.MLFLOW_BREAKER_RESET, mlflow.breaker.reset)
        cluster.register(ClusterOperation.DSPY_CACHE_CLEAR, dspy.clear_local_cache)
        await cluster.start()
        await events.start()
        return cls(
            settings=settings,
            database=database,
            api_keys=api_keys,
            sessions=sessions,
            mlflow=mlflow,
            embedded_mlflow=embedded,
            redis=redis,
            redis_breaker=redis_breaker,
            rate_limiter=rate_limiter,
            registry=registry,
            analytics=analytics,
            dspy=dspy,
            build=await anyio.to_thread.run_sync(read_build_info, settings),
            started_at=time.monotonic(),
            health_cache=health_cache,
            policy=policy,
            gate=Gate(KeyIdentifier(api_keys, rate_limiter, sessions), Throttle(rate_limiter), policy),
            cluster=cluster,
            events=events,
            webhooks=WebhookService(database, settings, events.dispatcher),
        )

    def provide(self, state: State) -> None:
        """Put on app.state what the providers of deps.py hand to handlers (each replaceable by
        `app.dependency_overrides[get_x]`)."""
        state.settings = self.settings
        state.api_keys = self.api_keys
        state.sessions = self.sessions
        state.rate_limiter = self.rate_limiter
        state.registry = self.registry
        state.analytics = self.analytics
        state.dspy = self.dspy
        state.policy = self.policy
        state.gate = self.gate
        state.cluster = self.cluster
        state.events = self.events
        state.webhooks = self.webhooks
        state.health = HealthSources(
            settings=self.settings,
            database=self.database,
            mlflow=self.mlflow,
            embedded_mlflow=self.settings.embedded_mlflow,  # this process's child, or the serve process's
            redis=self.redis,
            redis_breaker=self.redis_breaker,
            cache=self.health_cache,
            build=self.build,
            started_at=self.started_at,
            events_stream=self.events.publisher,
        )

    def gateway_parts(self) -> GatewayParts:
        return GatewayParts(
            upstream=self.mlflow,
            gate=self.gate,
            on_registry_change=self.registry.cache.invalidate,
            changes=self.events.changes,
        )

    async def stop(self) -> None:
        await self.events.aclose()
        await self.cluster.aclose()
        await self.dspy.aclose()
        await self.analytics.aclose()
        await self.mlflow.aclose()
        await self.rate_limiter.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        if self.embedded_mlflow is not None:
            await self.embedded_mlflow.stop()
        await self.database.dispose()


def build_breaker(settings: Settings) -> CircuitBreaker:
    breaker = CircuitBreaker(
        failure_threshold=settings.breaker_failure_threshold,
        recovery_timeout=settings.breaker_recovery_timeout,
        max_recovery_timeout=settings.breaker_max_recovery_timeout,
        half_open_max_calls=settings.breaker_half_open_max_calls,
        success_threshold=settings.breaker_success_threshold,
    )
    track_breaker(breaker)
    return breaker


def build_rate_limiter(settings: Settings, redis_breaker: RedisBreaker | None = None) -> RequestRateLimiter:
    """In process without Redis; with HOKUSAI_REDIS_URL every server process shares one count."""
    options = {
        "default_per_hour": settings.rate_limit_default_per_hour,
        "gateway_per_hour": settings.rate_limit_gateway_per_hour,
        "route_limits": route_limits(
            settings.rate_limit_registration,
            settings.rate_limit_lineage,
            settings.rate_limit_impact,
            settings.rate_limit_routes,
        ),
        "auth_failure_limit": parse_limit(settings.rate_limit_auth_failures),
        "fail_open": settings.rate_limit_fail_open,
    }
    if settings.redis_url is None:
        return RequestRateLimiter.in_memory(**options)
    breaker = redis_breaker or RedisBreaker(settings.redis_failure_threshold, settings.redis_retry_after)
    return RequestRateLimiter.on_redis(
        str(settings.redis_url), settings.redis_timeout, breaker, prefix=settings.redis_key_prefix, **options
    )


def upstream_authorization(settings: Settings) -> str | None:
    """Credentials of the gateway itself, for an MLflow that runs its own auth (never the client's)."""
    if settings.mlflow_token is not None:
        return f"Bearer {settings.mlflow_token.get_secret_value()}"
    if settings.mlflow_username and settings.mlflow_password:
        return aiohttp.BasicAuth(settings.mlflow_username, settings.mlflow_password.get_secret_value()).encode()
    return None
