"""create_app(settings): routers, middleware, lifespan; nothing else."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from hokusai import __version__
from hokusai.server.analytics.router import build_router as build_analytics_router
from hokusai.server.audit.middleware import AuditMiddleware
from hokusai.server.audit.router import router as audit_router
from hokusai.server.audit.store import AuditLog, AuditStore
from hokusai.server.auth.router import router as keys_router
from hokusai.server.config import Settings, load_settings
from hokusai.server.dspy.router import router as dspy_router
from hokusai.server.errors import install_error_handlers
from hokusai.server.events.router import router as events_router
from hokusai.server.health.router import router as health_router
from hokusai.server.middleware import RequestContextMiddleware
from hokusai.server.mlflow.proxy import GatewayParts, MlflowGateway
from hokusai.server.openapi import install_openapi
from hokusai.server.registry.router import build_router as build_registry_router
from hokusai.server.request_bounds import RequestBoundsMiddleware
from hokusai.server.runtime import AdminKeyAnnouncer, Runtime
from hokusai.server.web.dashboard import install_dashboard
from hokusai.server.web.signin import router as signin_router
from hokusai.server.webhooks.router import router as webhooks_router


def print_admin_key(key: str, saved_to: str) -> None:
    """Shown once, on the terminal only: deliberately not a log line, so it never reaches log storage."""
    print(
        f"\nCreated the first admin API key (shown once, also saved to {saved_to} with mode 0600):\n\n    {key}\n",
        file=sys.stdout,
        flush=True,
    )


def create_app(settings: Settings | None = None, announce_admin_key: AdminKeyAnnouncer = print_admin_key) -> FastAPI:
    settings = settings or load_settings()
    # The middlewares are built before the lifespan runs (at the first ASGI event): they are handed `parts`, which
    # gives what the lifespan built. Handlers get theirs from app.state, through the providers of deps.py.
    built: dict[str, GatewayParts] = {}

    audits: dict[str, AuditLog] = {}

    def parts() -> GatewayParts:
        return built["gateway"]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings, announce_admin_key)
        runtime.provide(app.state)  # what deps.py hands to handlers
        built["gateway"] = runtime.gateway_parts()
        audit = AuditLog(AuditStore(runtime.database), settings.audit_retention_days)
        await audit.start()
        app.state.audit = audits["log"] = audit
        try:
            yield
        finally:
            await audit.aclose()  # before the database goes: the last rows are written on a clean shutdown
            await runtime.stop()

    app = FastAPI(
        title="Hokusai Registry",
        version=__version__,
        description="Model registry, authenticated MLflow gateway and DSPy execution for Hokusai.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(keys_router)
    app.include_router(signin_router)
    app.include_router(audit_router)
    app.include_router(events_router)
    app.include_router(webhooks_router)
    app.include_router(dspy_router)
    for prefix in ("/models", "/api/models"):  # the production base URL is /api
        app.include_router(build_analytics_router(prefix))  # first: its fixed segments before {model_name}/{version}
        app.include_router(build_registry_router(prefix))
    install_dashboard(app)  # the /ui/ pages and the public /ui/static/ assets (the login page's too)
    install_openapi(app)  # security schemes, 401/403/429 of guarded routes, the gateway
    # The last added runs first: request context (ids, access log) -> audit (records writes) -> bounds (identify
    # before the body, size and idle bounds) -> the gateway (/mlflow/* and /api/mlflow/*) -> the routes.
    app.add_middleware(MlflowGateway, parts=parts)
    app.add_middleware(
        RequestBoundsMiddleware,
        gate=lambda: parts().gate,
        max_body_bytes=settings.max_body_bytes,
        body_read_timeout=settings.body_read_timeout,
    )
    # Outside the bounds and the gateway: it sees every write's final status, refusals included.
    app.add_middleware(AuditMiddleware, audit=lambda: audits["log"])
    app.add_middleware(RequestContextMiddleware)
    return app
