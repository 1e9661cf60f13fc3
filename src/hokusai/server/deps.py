"""How handlers get their collaborators: Annotated dependencies over what the lifespan built.

A route is written `async def f(body: X, caller: Caller, registry: Registry)`: the caller identified and counted
once, the services built once in the lifespan (runtime.Runtime.provide puts them on app.state). Each provider is
a FastAPI dependency, so a test replaces one with `app.dependency_overrides[get_registry] = lambda: fake`.
Domain packages import the aliases from here; nothing here is imported by a service.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from hokusai.server.analytics.service import ModelAnalytics
from hokusai.server.audit.store import AuditLog
from hokusai.server.auth.caller import Caller as CallerRecord
from hokusai.server.auth.dependencies import current_caller
from hokusai.server.auth.policy import Policy
from hokusai.server.auth.service import ApiKeyService
from hokusai.server.cluster import ClusterBus
from hokusai.server.config import Settings
from hokusai.server.dspy.service import DspyService
from hokusai.server.events.service import EventService
from hokusai.server.health.service import HealthSources
from hokusai.server.ratelimit.service import RequestRateLimiter
from hokusai.server.registry.service import RegistryService
from hokusai.server.webhooks.service import WebhookService


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> RegistryService:
    return request.app.state.registry


def get_analytics(request: Request) -> ModelAnalytics:
    return request.app.state.analytics


def get_dspy(request: Request) -> DspyService:
    return request.app.state.dspy


def get_api_keys(request: Request) -> ApiKeyService:
    return request.app.state.api_keys


def get_limiter(request: Request) -> RequestRateLimiter:
    return request.app.state.rate_limiter


def get_policy(request: Request) -> Policy:
    """The policy the gate, the gateway and the services share (replace the gate to change what guards ask)."""
    return request.app.state.policy


def get_health(request: Request) -> HealthSources:
    return request.app.state.health


def get_audit_log(request: Request) -> AuditLog:
    return request.app.state.audit


def get_events(request: Request) -> EventService:
    """The event log: its outbox (GET /api/v1/events) and the MLflow webhook receiver."""
    return request.app.state.events


def get_webhooks(request: Request) -> WebhookService:
    """Webhook subscriptions and their deliveries (the dispatcher delivers in the background)."""
    return request.app.state.webhooks


def get_cluster(request: Request) -> ClusterBus:
    """Operations that reach every service process (ClusterBus.run)."""
    return request.app.state.cluster


AppSettings = Annotated[Settings, Depends(get_settings)]
Registry = Annotated[RegistryService, Depends(get_registry)]
Analytics = Annotated[ModelAnalytics, Depends(get_analytics)]
Dspy = Annotated[DspyService, Depends(get_dspy)]
ApiKeys = Annotated[ApiKeyService, Depends(get_api_keys)]
Limiter = Annotated[RequestRateLimiter, Depends(get_limiter)]
AccessPolicy = Annotated[Policy, Depends(get_policy)]
Health = Annotated[HealthSources, Depends(get_health)]
Cluster = Annotated[ClusterBus, Depends(get_cluster)]
Audit = Annotated[AuditLog, Depends(get_audit_log)]
Events = Annotated[EventService, Depends(get_events)]
Webhooks = Annotated[WebhookService, Depends(get_webhooks)]
# Identified and throttled; what the caller may do is each route's guard (`auth.dependencies.allow(action)`).
Caller = Annotated[CallerRecord, Depends(current_caller)]
