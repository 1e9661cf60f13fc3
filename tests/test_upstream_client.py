"""MlflowUpstream against the real MLflow server, and against a closed port."""

from __future__ import annotations

import pytest

from hokusai.server.mlflow.breaker import BreakerState, CircuitBreaker, CircuitOpen
from hokusai.server.mlflow.embedded import free_loopback_port
from hokusai.server.mlflow.upstream import MlflowUpstream, UpstreamConnectFailed, UpstreamUnavailable

pytestmark = pytest.mark.anyio


async def test_buffered_requests_reach_the_real_mlflow(mlflow_server):
    upstream = MlflowUpstream(mlflow_server.url, timeout=10, breaker=CircuitBreaker())
    try:
        created = await upstream.request(
            "POST", "/api/2.0/mlflow/experiments/create", json={"name": "upstream-client-test"}
        )
        assert created.status_code == 200
        experiment_id = created.json()["experiment_id"]
        found = await upstream.request(
            "GET", "/api/2.0/mlflow/experiments/get", params={"experiment_id": experiment_id}
        )
        assert found.json()["experiment"]["name"] == "upstream-client-test"
        missing = await upstream.request("GET", "/api/2.0/mlflow/experiments/get", params={"experiment_id": "9999"})
        assert missing.status_code == 404 and missing.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
        assert upstream.breaker.snapshot().failure_count == 0  # a 4xx is MLflow working, not failing
        await upstream.ping(timeout=5)
    finally:
        await upstream.aclose()


async def test_connect_failures_trip_the_breaker_but_probes_do_not():
    dead = f"http://127.0.0.1:{free_loopback_port()}"
    upstream = MlflowUpstream(dead, timeout=5, breaker=CircuitBreaker(failure_threshold=2, recovery_timeout=60))
    try:
        for _ in range(3):
            probe = await upstream.probe("GET", "/health", timeout=1)
            assert probe.status_code is None and not probe.ok
        with pytest.raises(UpstreamUnavailable):
            await upstream.ping(timeout=1)
        assert upstream.breaker.state is BreakerState.CLOSED
        for _ in range(2):
            with pytest.raises(UpstreamConnectFailed) as raised:
                await upstream.request("GET", "/api/2.0/mlflow/experiments/search")
            assert raised.value.detail == f"Failed to connect to MLflow server at {dead}"
        assert upstream.breaker.state is BreakerState.OPEN
        with pytest.raises(CircuitOpen):
            await upstream.request("GET", "/api/2.0/mlflow/experiments/search")
    finally:
        await upstream.aclose()


async def test_urls_stay_on_the_configured_upstream():
    upstream = MlflowUpstream("http://mlflow.internal:5000/prefix/", timeout=5, breaker=CircuitBreaker())
    try:
        assert str(upstream.url_for(b"/api/2.0/mlflow/runs/get", b"run_id=1")) == (
            "http://mlflow.internal:5000/prefix/api/2.0/mlflow/runs/get?run_id=1"
        )
        assert upstream.url_for(b"//evil.example/x").host == "mlflow.internal"
        assert upstream.url_for(b"/a%2Fb").raw_path == "/prefix/a%2Fb"  # sent as received, decoded once upstream
    finally:
        await upstream.aclose()
