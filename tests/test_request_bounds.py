"""Bounded requests over HTTP: the caller is identified before any body byte is read, bodies are bounded while they
stream, slow clients are cut off, a key in the query never reaches MLflow, and paths cannot forge log lines."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.support import RecordingUpstream

MB = 1024 * 1024
PREDICT = "/models/bounds-model/1/predict"
SEARCH = "/api/2.0/mlflow/experiments/search"


def create_key(service, scopes: list[str]) -> str:
    with service.client(service.admin_key) as admin:
        return admin.post("/api/v1/keys", json={"name": f"bounds {scopes}", "scopes": scopes}).json()["key"]


@pytest.fixture(scope="module")
def bounded(start_service, mlflow_server):
    """A service with small bounds: 1 MB bodies, 1 s for headers, 1 s of body idle time."""
    return start_service(
        mlflow_url=mlflow_server.url, max_body_bytes=str(MB), header_timeout="1", body_read_timeout="1"
    )


@pytest.fixture(scope="module")
def recorder():
    upstream = RecordingUpstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def recorded_service(start_service, recorder):
    return start_service(mlflow_url=recorder.url, body_read_timeout="1")


def open_socket(service, timeout: float = 60) -> socket.socket:
    host, port = service.base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout fails the test)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def json_body(total_bytes: int, chunk_bytes: int = MB) -> Iterator[bytes]:
    """A JSON predict body of about `total_bytes`, generated chunk by chunk: the test never holds it whole."""
    yield b'{"inputs": [['
    row = b"1," * (chunk_bytes // 2)
    sent = 0
    while sent < total_bytes:
        yield row
        sent += len(row)
    yield b"1]]}"


class PeakRss:
    """Samples a process's RSS in a thread: the peak growth while a block runs (freed memory is not missed)."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / MB


def post_unauthenticated(base_url: str, size: int, declare_length: bool) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if declare_length:
        headers["Content-Length"] = str(sum(len(chunk) for chunk in json_body(size)))
    with httpx.Client(base_url=base_url, timeout=120) as client:
        return client.post(PREDICT, content=json_body(size), headers=headers)


def test_a_100_mb_body_without_a_key_is_refused_before_it_is_read(service_process):
    service = service_process
    with service.client() as client:
        assert client.post(PREDICT, json={"inputs": [[1]]}).status_code == 401  # warm: first-request allocations
    with PeakRss(service.process.pid) as rss:
        answer = post_unauthenticated(service.base_url, 100 * MB, declare_length=True)
    print(f"RSS growth under one 100 MB unauthenticated body: {rss.growth_mb:.1f} MB")
    assert answer.status_code == 401, answer.text
    assert answer.json() == {"detail": "API key required"}
    assert rss.growth_mb < 20


def test_four_100_mb_bodies_in_parallel_without_a_key(service_process):
    service = service_process
    with PeakRss(service.process.pid) as rss, ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(lambda n: post_unauthenticated(service.base_url, 100 * MB, declare_length=n % 2 == 0), range(4))
        )
    print(f"RSS growth under four parallel 100 MB unauthenticated bodies: {rss.growth_mb:.1f} MB")
    assert [answer.status_code for answer in answers] == [401] * 4
    assert rss.growth_mb < 20


def test_a_100_mb_body_with_a_read_key_on_a_write_route_is_refused_before_it_is_read(service_process):
    service = service_process
    read_key = create_key(service, ["read"])
    size = 100 * MB
    with PeakRss(service.process.pid) as rss, httpx.Client(base_url=service.base_url, timeout=120) as client:
        answer = client.post(
            "/models/register",
            content=json_body(size),
            headers={"Authorization": f"Bearer {read_key}", "Content-Type": "application/json"},
        )
    assert answer.status_code == 403, answer.text
    assert answer.json() == {"detail": "This API key lacks the 'write' scope"}
    assert rss.growth_mb < 20


def test_a_request_with_a_body_is_counted_once_against_its_key(bounded):
    key = create_key(bounded, ["read"])
    with bounded.client(key) as client:
        remaining = [
            int(client.post(PREDICT, json={"inputs": [[1]]}).headers["X-RateLimit-Remaining"]) for _ in range(3)
        ]
    assert remaining[0] - remaining[1] == remaining[1] - remaining[2] == 1


def test_failed_authentications_with_bodies_are_counted_per_address(start_service, mlflow_server):
    service = start_service(mlflow_url=mlflow_server.url, rate_limit_auth_failures="3/minute")
    with service.client("hk_live_" + "x" * 40) as client:
        statuses = [client.post(PREDICT, content=json_body(MB)).status_code for _ in range(5)]
    assert statuses[:3] == [401] * 3 and statuses[-1] == 429


def test_an_oversized_declared_body_with_a_valid_key_is_413_before_parsing(bounded):
    key = create_key(bounded, ["read"])
    body = b"".join(json_body(2 * MB))
    with bounded.client(key) as client:
        small = client.post(PREDICT, json={"inputs": [[1]]})
        assert small.status_code != 413  # within the bound the request is parsed (and the model looked up)
        answer = client.post(PREDICT, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413
    assert answer.json() == {"detail": f"Request body exceeds {MB} bytes (HOKUSAI_MAX_BODY_BYTES)"}


def test_a_chunked_body_without_length_is_cut_at_the_bound(bounded):
    key = create_key(bounded, ["read"])
    with bounded.client(key) as client:
        answer = client.post(PREDICT, content=json_body(5 * MB, chunk_bytes=64 * 1024))  # a generator: chunked
    assert answer.request.headers.get("transfer-encoding") == "chunked"
    assert answer.status_code == 413
    assert answer.json() == {"detail": f"Request body exceeds {MB} bytes (HOKUSAI_MAX_BODY_BYTES)"}
    assert create_key(bounded, ["read"])  # the service goes on serving


def test_the_body_limit_does_not_apply_to_small_bodies_or_the_keys_admin(bounded):
    with bounded.client(bounded.admin_key) as admin:
        created = admin.post("/api/v1/keys", json={"name": "x" * 100, "scopes": ["read"]})
    assert created.status_code == 201


def test_slowloris_partial_headers_are_closed_after_the_header_timeout(bounded):
    with open_socket(bounded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        received = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert received.endswith(b'{"detail": "Request headers not received in time"}')


def test_slowloris_trickling_header_bytes_does_not_extend_the_timeout(bounded):
    """One byte every 0.2 s: each byte would reset a keep-alive or idle timer, not the header deadline."""
    closed = False
    with open_socket(bounded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        for _ in range(300):  # a minute of trickle, if nothing closed it
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(65536) is not None:
                    closed = True  # the 408, or the end of the connection
                    break
            except TimeoutError:
                continue
    assert closed


def test_an_idle_connection_is_closed(bounded):
    with open_socket(bounded) as sock:
        assert read_until_closed(sock) == b""  # closed without an answer: nothing was asked


def test_a_complete_request_is_served_on_a_connection_kept_alive_past_the_header_timeout(bounded):
    with httpx.Client(base_url=bounded.base_url, timeout=30) as client:
        assert client.get("/live").status_code == 200
        assert client.get("/live").status_code == 200


def test_max_connections_bounds_open_connections(start_service, mlflow_server):
    service = start_service(mlflow_url=mlflow_server.url, max_connections="3")
    held = [open_socket(service) for _ in range(3)]
    try:
        with httpx.Client(base_url=service.base_url, timeout=30) as client:
            assert client.get("/live").status_code == 503
    finally:
        for sock in held:
            sock.close()
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        for _ in range(100):  # until the server has seen the held connections close
            if client.get("/live").status_code == 200:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the service did not serve again once the held connections closed")


def test_a_stalled_body_is_408_or_closed(bounded):
    key = create_key(bounded, ["read"])
    with open_socket(bounded) as sock:
        sock.sendall(
            b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 1000\r\n\r\n" + b'{"inputs": [[1'
        )
        received = read_until_closed(sock)
    assert received == b"" or received.startswith(b"HTTP/1.1 408 "), received
    if received:
        assert b'{"detail":"Request body stalled for 1 s (HOKUSAI_BODY_READ_TIMEOUT)"}' in received


def test_a_stalled_gateway_upload_ends(recorded_service):
    key = create_key(recorded_service, ["write"])
    with open_socket(recorded_service) as sock:
        sock.sendall(
            b"PUT /mlflow/api/2.0/mlflow-artifacts/artifacts/0/run/artifacts/blob HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000
        )
        received = read_until_closed(sock)
    assert received == b"" or received.startswith(b"HTTP/1.1 408 "), received


def test_stalled_gateway_uploads_do_not_open_the_breaker(start_service, recorder):
    recorded_service = start_service(mlflow_url=recorder.url, body_read_timeout="1")  # its own breaker
    key = create_key(recorded_service, ["write"])
    for _ in range(6):
        with open_socket(recorded_service) as sock:
            sock.sendall(
                b"PUT /mlflow/api/2.0/mlflow-artifacts/artifacts/0/run/artifacts/blob HTTP/1.1\r\n"
                b"Host: localhost\r\nAuthorization: Bearer " + key.encode() + b"\r\nContent-Length: 10000000\r\n\r\nx"
            )
            read_until_closed(sock)
    with recorded_service.client(key) as client:
        assert client.get("/health/mlflow").json()["circuit_breaker_state"] == "CLOSED"


@pytest.mark.parametrize(
    "spelling", ["api_key", "api%5Fkey", "api%5fkey", "%61pi%5Fkey", "api%255Fkey", "API_KEY", "Api_Key", "api_key+"]
)
def test_a_key_in_the_query_never_reaches_mlflow_in_any_spelling(recorded_service, recorder, spelling):
    key = create_key(recorded_service, ["read"])
    query = f"max_results=5&{spelling}={key}&filter=name%20LIKE%20%27a%2Bb%27"
    # Names that Starlette decodes to `api_key` authenticate; the others ride along beside a header key.
    with httpx.Client(base_url=recorded_service.base_url, headers={"X-API-Key": key}) as client:
        answer = client.get(f"/mlflow{SEARCH}?{query}")
    assert answer.status_code == 200, answer.text
    forwarded = recorder.requests[-1].path
    assert key not in forwarded and key[8:] not in forwarded
    assert forwarded == f"{SEARCH}?max_results=5&filter=name%20LIKE%20%27a%2Bb%27"  # the rest byte for byte


def test_api_5fkey_alone_authenticates_and_is_stripped(recorded_service, recorder):
    key = create_key(recorded_service, ["read"])
    with httpx.Client(base_url=recorded_service.base_url) as client:
        answer = client.get(f"/mlflow{SEARCH}?api%5Fkey={key}")
    assert answer.status_code == 200, answer.text
    assert recorder.requests[-1].path == SEARCH
    assert key not in recorded_service.logs()


def test_control_characters_in_paths_do_not_forge_log_lines(service):
    key = create_key(service, ["read"])
    with service.client(key) as client:
        client.get("/models/x%0d%0aFORGED%20line")
        client.get("/models/x%0aFORGED%20two/1")
        client.post("/models/x%0d%0aFORGED%20three/1/predict", json={"inputs": [[1]]})
        client.get("/nowhere%e2%80%a8FORGED%20four")
    logs = service.logs()
    assert not [line for line in logs.splitlines() if line.startswith("FORGED")], logs[-3000:]
    assert "GET /models/x\\x0d\\x0aFORGED line 404" in logs
