"""Bodies of the health family, shaped as in the API reference."""

from __future__ import annotations

from pydantic import BaseModel


class HealthBody(BaseModel):
    status: str
    version: str
    services: dict[str, str]
    timestamp: str


class ReadinessCheck(BaseModel):
    name: str
    passed: bool
    error: str | None
    critical: bool


class ReadinessBody(BaseModel):
    ready: bool
    can_serve_traffic: bool
    checks: list[ReadinessCheck]
    degraded_mode: bool


class LivenessBody(BaseModel):
    alive: bool
    uptime: float
    memory_usage_mb: float


class VersionBody(BaseModel):
    version: str
    build_date: str
    git_commit: str
    api_version: str
