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


class StatusServer:
    """Answers `/status/<code>` with that status and a JSON body, as MLflow answers errors."""

    def __init__(self) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                code = int(self.path.rsplit("/", 1)[-1])
                body = b'{"error_code": "INTERNAL_ERROR", "message": "bad input"}'
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_a_500_never_opens_the_breaker_a_503_or_a_dead_upstream_does():
    server = StatusServer()
    upstream = MlflowUpstream(server.url, timeout=5, breaker=CircuitBreaker(failure_threshold=3, recovery_timeout=60))
    try:
        for _ in range(20):
            answer = await upstream.request("GET", "/status/500")
            assert answer.status_code == 500  # returned to the caller as it came
        assert upstream.breaker.state is BreakerState.CLOSED and upstream.breaker.snapshot().failure_count == 0
        for _ in range(3):
            assert (await upstream.request("GET", "/status/503")).status_code == 503
        assert upstream.breaker.state is BreakerState.OPEN
        with pytest.raises(CircuitOpen):
            await upstream.request("GET", "/status/200")
        upstream.breaker.reset()
        for code in (502, 504, 502):
            await upstream.request("GET", f"/status/{code}")
        assert upstream.breaker.state is BreakerState.OPEN
    finally:
        await upstream.aclose()
        server.close()

    dead = MlflowUpstream(server.url, timeout=5, breaker=CircuitBreaker(failure_threshold=3, recovery_timeout=60))
    try:
        for _ in range(3):
            with pytest.raises(UpstreamConnectFailed):
                await dead.request("GET", "/status/200")
        assert dead.breaker.state is BreakerState.OPEN
    finally:
        await dead.aclose()
