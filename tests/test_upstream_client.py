"""MlflowUpstream against the real MLflow server, and against a closed port."""

from __future__ import annotations

import anyio
import pytest

from hokusai.server.mlflow.breaker import BreakerState, CircuitBreaker, CircuitOpen
from hokusai.server.mlflow.embedded import free_loopback_port
from hokusai.server.mlflow.upstream import (
    UPSTREAM_IDLE_SECONDS,
    MlflowUpstream,
    UpstreamConnectFailed,
    UpstreamUnavailable,
)

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


class PortEchoServer:
    """A real uvicorn server (as MLflow runs) that answers each request with the client's port: the same port
    twice means the connection was reused. `idle_timeout` is its keep-alive timeout."""

    def __init__(self, idle_timeout: float) -> None:
        import threading

        import uvicorn

        async def app(scope, receive, send) -> None:
            if scope["type"] != "http":
                return
            while (await receive()).get("more_body"):
                pass
            body = str(scope["client"][1]).encode()
            headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        port = free_loopback_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, timeout_keep_alive=idle_timeout, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            self.thread.join(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()


async def test_connections_are_reused_to_the_real_mlflow(mlflow_server):
    import psutil

    upstream = MlflowUpstream(mlflow_server.url, timeout=10, breaker=CircuitBreaker(), keepalive=True)
    mlflow_port = int(mlflow_server.url.rsplit(":", 1)[1])

    def connections_to_mlflow() -> set[int]:
        return {
            connection.laddr.port
            for connection in psutil.Process().net_connections(kind="tcp")
            if connection.raddr and connection.raddr.port == mlflow_port and connection.status == "ESTABLISHED"
        }

    try:
        for _ in range(10):
            answer = await upstream.request("GET", "/api/2.0/mlflow/experiments/search", params={"max_results": "1"})
            assert answer.status_code == 200
        assert len(connections_to_mlflow()) == 1  # ten calls, one connection
    finally:
        await upstream.aclose()


async def test_an_idle_connection_is_dropped_before_mlflow_closes_it():
    """uvicorn (MLflow's server) closes a connection idle for its keep-alive timeout; a POST sent on it just then
    fails ("server disconnected", not retried as a GET is). The gateway lets go of idle connections first."""
    import uvicorn

    assert uvicorn.Config(app=None).timeout_keep_alive > UPSTREAM_IDLE_SECONDS  # `mlflow server` keeps them longer
    server = PortEchoServer(idle_timeout=2)
    upstream = MlflowUpstream(server.url, timeout=5, breaker=CircuitBreaker(), keepalive=True, idle_seconds=1)
    try:

        async def client_port() -> bytes:
            answer = await upstream.request("POST", "/port", json={})
            assert answer.status_code == 200
            return answer.body

        first = await client_port()
        assert await client_port() == first  # back to back: reused
        await anyio.sleep(1.5)  # idle longer than the client keeps it, shorter than the server does
        assert await client_port() != first  # a new connection, not one the server is about to close
        assert upstream.breaker.snapshot().failure_count == 0
    finally:
        await upstream.aclose()
        server.close()
