"""Probes of the MLflow server for the MLflow health family.

They go around the circuit breaker (`MlflowUpstream.probe`): they report on MLflow, they never trip the breaker.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hokusai.server.mlflow.upstream import MlflowUpstream, ProbeResult


@dataclass(frozen=True)
class NamedProbe:
    name: str
    method: str
    path: str
    json: dict | None = None


BASIC_PROBES = {
    "connectivity": NamedProbe("health", "GET", "/health"),
    "experiments_api": NamedProbe("experiments_list", "GET", "/api/2.0/mlflow/experiments/search?max_results=1"),
    "artifacts_api": NamedProbe("artifacts_list", "GET", "/api/2.0/mlflow-artifacts/artifacts?path="),
}
BASIC_MESSAGES = {
    "connectivity": ("MLflow server is reachable", "MLflow server is not reachable"),
    "experiments_api": ("Experiments API is functional", "Experiments API is failing"),
    "artifacts_api": ("Artifact API is accessible", "Artifact API is not accessible"),
}
DETAILED_PROBES = [
    BASIC_PROBES["connectivity"],
    BASIC_PROBES["experiments_api"],
    NamedProbe("experiment_get_default", "GET", "/api/2.0/mlflow/experiments/get?experiment_id=0"),
    NamedProbe("runs_search", "POST", "/api/2.0/mlflow/runs/search", {"experiment_ids": ["0"], "max_results": 1}),
    NamedProbe("registered_models_search", "GET", "/api/2.0/mlflow/registered-models/search?max_results=1"),
    NamedProbe("model_versions_search", "GET", "/api/2.0/mlflow/model-versions/search?max_results=1"),
    BASIC_PROBES["artifacts_api"],
]


async def run_probes(upstream: MlflowUpstream, probes: list[NamedProbe], timeout: float) -> list[ProbeResult]:
    return list(
        await asyncio.gather(*(upstream.probe(probe.method, probe.path, timeout, json=probe.json) for probe in probes))
    )


async def basic_checks(upstream: MlflowUpstream, timeout: float) -> dict[str, dict[str, str]]:
    results = await run_probes(upstream, list(BASIC_PROBES.values()), timeout)
    checks = {}
    for check_name, result in zip(BASIC_PROBES, results, strict=True):
        good, bad = BASIC_MESSAGES[check_name]
        message = good if result.ok else f"{bad}: {result.error}"
        checks[check_name] = {"status": "healthy" if result.ok else "unhealthy", "message": message}
    return checks


async def detailed_checks(upstream: MlflowUpstream, timeout: float) -> list[dict]:
    results = await run_probes(upstream, DETAILED_PROBES, timeout)
    return [
        {
            "endpoint": probe.name,
            "url": result.url,
            "method": probe.method,
            "status_code": result.status_code,
            "success": result.ok,
            "response_time_ms": result.response_time_ms,
            "error": result.error,
        }
        for probe, result in zip(DETAILED_PROBES, results, strict=True)
    ]
