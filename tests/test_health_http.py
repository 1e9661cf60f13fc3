"""The health family over HTTP, with real checks of MLflow, the database and Redis."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime

import httpx
import pytest

from hokusai.server.mlflow.embedded import free_loopback_port
from tests.support import RecordingUpstream

PUBLIC_PATHS = ["/health", "/ready", "/live", "/version", "/metrics", "/docs", "/redoc", "/openapi.json"]


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service.base_url) as client:  # no key: all of these are public
        yield client


def test_public_paths_need_no_key(client):
    for path in PUBLIC_PATHS:
        assert client.get(path).status_code == 200, path


def test_health_shape_and_real_values(client):
    body = client.get("/health").json()
    assert body["status"] == "healthy"
    assert body["version"] == "0.1.0"
    assert body["services"] == {
        "mlflow": "healthy",
        "database": "healthy",
        "postgres": "disabled",
        "redis": "disabled",
        "message_queue": "disabled",
    }
    stamp = datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


def test_ready_lists_critical_checks(client):
    response = client.get("/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True and body["can_serve_traffic"] is True and body["degraded_mode"] is False
    assert {(c["name"], c["passed"], c["critical"], c["error"]) for c in body["checks"]} == {
        ("database", True, True, None),
        ("mlflow", True, True, None),
    }


def test_live_reports_uptime_and_memory(client):
    first = client.get("/live").json()
    second = client.get("/live").json()
    assert first["alive"] is True
    assert second["uptime"] >= first["uptime"] > 0
    assert 20 < first["memory_usage_mb"] < 2000


def test_version_comes_from_the_package_and_git(client):
    body = client.get("/version").json()
    assert body["version"] == "0.1.0" and body["api_version"] == "v1"
    assert body["git_commit"] != "" and body["build_date"] != ""


def test_version_settings_win(start_service, mlflow_server):
    service = start_service(mlflow_url=mlflow_server.url, git_commit="abc123", build_date="2026-01-02")
    with httpx.Client(base_url=service.base_url) as client:
        body = client.get("/version").json()
    assert body["git_commit"] == "abc123" and body["build_date"] == "2026-01-02"


def test_metrics_are_prometheus_text_with_bounded_labels(client, service):
    client.get("/health")
    client.get("/models/some-secret-model-name/1")  # labelled by its template, never by the name
    client.get("/no-such-route/some-secret-model-name")  # unmatched: one label for every such path
    with service.client(service.admin_key) as admin:
        admin.get("/api/v1/keys")
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert re.search(r'http_requests_total\{method="GET",route="/health",status="2xx"\} \d', text)
    assert re.search(r'http_requests_total\{method="GET",route="/api/v1/keys",status="2xx"\} \d', text)
    assert re.search(r'http_requests_total\{method="GET",route="unmatched",status="4xx"\} \d', text)
    assert 'http_request_duration_seconds_bucket{le="0.005",method="GET",route="/health"}' in text
    assert "process_resident_memory_bytes" in text
    assert "some-secret-model-name" not in text and service.admin_key not in text


def test_request_id_is_echoed_or_generated(client):
    assert client.get("/live", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = client.get("/live", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)


def test_unknown_route_and_method_are_json(client):
    missing = client.get("/no/such/route")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
    wrong_method = client.post("/health")
    assert wrong_method.status_code == 405 and "detail" in wrong_method.json()


@pytest.mark.redis
def test_health_with_redis_configured(start_service, mlflow_server, redis_url):
    service = start_service(mlflow_url=mlflow_server.url, redis_url=redis_url)
    with httpx.Client(base_url=service.base_url) as client:
        body = client.get("/health").json()
        assert body["status"] == "healthy" and body["services"]["redis"] == "healthy"
        ready = client.get("/ready").json()
        assert ("redis", True, False) in {(c["name"], c["passed"], c["critical"]) for c in ready["checks"]}


def test_unreachable_redis_degrades_but_stays_ready(start_service, mlflow_server):
    service = start_service(mlflow_url=mlflow_server.url, redis_url=f"redis://127.0.0.1:{free_loopback_port()}/0")
    with httpx.Client(base_url=service.base_url) as client:
        body = client.get("/health").json()
        assert body["status"] == "degraded" and body["services"]["redis"] == "unhealthy"
        ready = client.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["degraded_mode"] is True


def test_unreachable_mlflow_makes_the_service_not_ready(start_service):
    dead_mlflow = f"http://127.0.0.1:{free_loopback_port()}"
    service = start_service(wait_until="live", mlflow_url=dead_mlflow)
    with httpx.Client(base_url=service.base_url) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert body["ready"] is False and body["can_serve_traffic"] is False
        mlflow_check = next(c for c in body["checks"] if c["name"] == "mlflow")
        assert mlflow_check["passed"] is False and dead_mlflow in mlflow_check["error"]
        assert client.get("/health").json()["status"] == "degraded"
        assert client.get("/live").status_code == 200


@pytest.mark.postgres
def test_service_on_postgres(start_service, mlflow_server, postgres_url):
    service = start_service(mlflow_url=mlflow_server.url, database_url=postgres_url)
    with httpx.Client(base_url=service.base_url) as client:
        assert client.get("/health").json()["services"]["postgres"] == "healthy"
    with service.client(service.admin_key) as admin:
        created = admin.post("/api/v1/keys", json={"name": "pg", "scopes": ["admin"]}).json()
    with service.client(created["key"]) as client:
        assert client.get("/api/v1/keys").status_code == 200


def _concurrently(base_url: str, path: str, count: int) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
            return list(await asyncio.gather(*(client.get(path) for _ in range(count))))

    return asyncio.run(run())


def test_anonymous_health_loops_share_one_check(start_service):
    """50 concurrent anonymous calls of each public health route run each check about once, not 50 times
    (the detailed one makes seven MLflow calls a run). Counted where it costs: calls reaching MLflow."""
    upstream = RecordingUpstream()
    try:
        service = start_service(mlflow_url=upstream.url, health_cache_ttl="5")
        only_detailed = "/api/2.0/mlflow/experiments/get?experiment_id=0"  # a probe only the detailed check makes
        only_basic = "/api/2.0/mlflow-artifacts/artifacts?path="  # basic and detailed checks both make this one
        before = upstream.paths()

        detailed = _concurrently(service.base_url, "/mlflow/health/mlflow/detailed", 50)
        assert {r.status_code for r in detailed} == {200}
        assert len({json.dumps(r.json()["tests"]) for r in detailed}) == 1  # one run's results, shared
        basic = _concurrently(service.base_url, "/api/health/mlflow", 50)
        assert {r.status_code for r in basic} == {200}
        health = _concurrently(service.base_url, "/health", 50)
        assert {r.json()["status"] for r in health} == {"healthy"}

        new = upstream.paths()[len(before) :]
        assert 1 <= new.count(only_detailed) <= 2, new.count(only_detailed)
        assert 2 <= new.count(only_basic) <= 4, new.count(only_basic)  # one detailed run, one basic run
        assert 1 <= new.count("/health") <= 3  # MLflow's /health: the services check and the basic check
        with httpx.Client(base_url=service.base_url) as client:
            metrics = client.get("/metrics").text
        runs = re.search(r'hokusai_health_check_runs_total\{check="mlflow_detailed"\} (\d+)', metrics)
        assert runs is not None and 1 <= float(runs.group(1)) <= 2
    finally:
        upstream.close()
