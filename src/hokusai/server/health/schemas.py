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


class BreakerReset(BaseModel):
    message: str
    timestamp: str
    reset_by: str
    # Beyond the reference: how far the reset went (each service process has its own breaker).
    processes_reached: int
    warning: str | None = None  # present when other processes may exist and were not reached


class MlflowHealth(BaseModel):
    status: str
    mlflow_server: str
    checks: dict[str, dict[str, str]]


class MlflowProbe(BaseModel):
    endpoint: str
    url: str
    method: str
    status_code: int | None
    success: bool
    response_time_ms: float
    error: str | None


class MlflowDetailedHealth(BaseModel):
    mlflow_server: str
    timestamp: str
    environment: dict[str, str | bool]
    tests: list[MlflowProbe]
    overall_health: bool


class MlflowConnectivity(BaseModel):
    status: str
    mlflow_server: str
    response_code: int | None
    response_time_ms: float
    error: str | None
