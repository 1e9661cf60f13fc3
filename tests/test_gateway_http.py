"""The MLflow gateway over HTTP: the stock mlflow client through it, scopes, header hygiene, upstream errors."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from hokusai.server.mlflow.embedded import free_loopback_port
from tests.support import RecordingUpstream

WORKFLOW = Path(__file__).with_name("mlflow_workflow.py")
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"


def create_key(service, scopes: list[str]) -> str:
    with service.client(service.admin_key) as admin:
        response = admin.post("/api/v1/keys", json={"name": f"gateway {scopes}", "scopes": scopes})
    return response.json()["key"]


def mlflow_env(tracking_uri: str, token: str | None) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HOKUSAI_"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    if token:
        env["MLFLOW_TRACKING_TOKEN"] = token
    return env


def run_mlflow_snippet(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def recorder():
    upstream = RecordingUpstream(delay_seconds=3)
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def recorded_service(start_service, recorder):
    return start_service(mlflow_url=recorder.url, mlflow_token="upstream-secret", mlflow_timeout="1")


def test_stock_mlflow_client_workflow_through_the_gateway(service):
    key = create_key(service, ["write"])
    result = subprocess.run(
        [sys.executable, str(WORKFLOW), "gateway-e2e"],
        capture_output=True,
        text=True,
        timeout=300,
        env=mlflow_env(f"{service.base_url}/api/mlflow", key),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["params"] == {"C": "1.0"}
    assert seen["metrics"] == {"accuracy": 0.95, "loss": 0.25} and seen["accuracy_history"] == [0.9, 0.95]
    assert seen["tags_team"] == "gateway" and seen["artifact_roundtrip"] is True
    assert seen["artifacts"] == ["config", "docs"]
    assert seen["model_uri"].startswith("models:/m-")
    assert seen["stage"] == "Staging" and seen["version_tags"] == {"validated": "yes"}
    assert seen["alias_version"] == seen["model_version"] and seen["aliases_after_delete"] == {}
    assert seen["predictions"] == seen["alias_predictions"] == seen["expected_predictions"]
    assert seen["searched_runs"] == 1 and seen["searched_experiments"] == ["gateway-e2e"]
    assert seen["searched_models"] == ["gateway-e2e"] and seen["searched_versions"] == 1
    assert seen["searched_logged_models"] == 1
    # The same data is visible through the other prefix.
    with service.client(key) as client:
        found = client.get("/mlflow/api/2.0/mlflow/registered-models/get", params={"name": "gateway-e2e"})
    assert found.status_code == 200 and found.json()["registered_model"]["name"] == "gateway-e2e"


def test_stock_client_without_a_key_gets_401_and_a_read_key_cannot_write(service):
    search = "import mlflow; mlflow.search_experiments()"
    without = run_mlflow_snippet(search, mlflow_env(f"{service.base_url}/mlflow", None))
    assert without.returncode != 0 and "UNAUTHENTICATED: API key required" in without.stderr
    read_key = create_key(service, ["read"])
    reads = run_mlflow_snippet(search, mlflow_env(f"{service.base_url}/mlflow", read_key))
    assert reads.returncode == 0, reads.stderr[-2000:]
    writes = run_mlflow_snippet(
        "import mlflow; mlflow.create_experiment('read-only-attempt')",
        mlflow_env(f"{service.base_url}/mlflow", read_key),
    )
    assert writes.returncode != 0 and "PERMISSION_DENIED: This API key lacks the 'write' scope" in writes.stderr


@pytest.mark.parametrize("prefix", ["/mlflow", "/api/mlflow"])
def test_gateway_auth_and_scopes_over_http(service, prefix):
    with httpx.Client(base_url=service.base_url) as anonymous:
        response = anonymous.get(prefix + SEARCH)
        assert response.status_code == 401
        assert response.json() == {
            "detail": "API key required",
            "error_code": "UNAUTHENTICATED",
            "message": "API key required",
        }
    read_key = create_key(service, ["read"])
    with service.client(read_key) as client:
        assert client.get(prefix + SEARCH).status_code == 200
        assert client.post(prefix + "/api/2.0/mlflow/runs/search", json={"experiment_ids": ["0"]}).status_code == 200
        denied = client.post(prefix + "/api/2.0/mlflow/experiments/create", json={"name": "nope"})
        assert denied.status_code == 403 and denied.json()["detail"] == "This API key lacks the 'write' scope"
        missing = client.get(prefix + "/api/2.0/mlflow/experiments/get", params={"experiment_id": "999999"})
        assert missing.status_code == 404  # MLflow's own answer, relayed


def test_upstream_sees_no_client_credentials(recorded_service, recorder):
    key = create_key(recorded_service, ["admin"])
    with httpx.Client(base_url=recorded_service.base_url) as client:
        client.post(
            f"/mlflow/api/2.0/mlflow/runs/create?api_key={key}&x=1",
            headers={"Origin": "https://evil.example", "Cookie": "session=abc", "X-Forwarded-For": "6.6.6.6"},
            json={"experiment_id": "0"},
        )
        client.get("/api/mlflow/api/2.0/mlflow/runs/get", params={"run_id": "r1"}, headers={"X-API-Key": key})
        client.get(
            "/mlflow/api/2.0/mlflow/runs/get", params={"run_id": "r2"}, headers={"Authorization": f"ApiKey {key}"}
        )
    proxied = [r for r in recorder.requests if r.path.startswith("/api/2.0/")]
    assert [r.path for r in proxied][-3:] == [
        "/api/2.0/mlflow/runs/create?x=1",
        "/api/2.0/mlflow/runs/get?run_id=r1",
        "/api/2.0/mlflow/runs/get?run_id=r2",
    ]
    upstream_host = urlsplit(recorder.url).netloc
    for request in proxied[-3:]:
        everything = json.dumps(request.headers) + request.path
        assert key not in everything and key[8:] not in everything
        assert request.header("authorization") == "Bearer upstream-secret"  # the gateway's own credential
        assert request.header("x-api-key") is None and request.header("cookie") is None
        assert request.header("origin") is None
        assert request.header("host") == upstream_host
        assert request.header("x-forwarded-for") == "127.0.0.1"
        assert request.header("x-forwarded-proto") == "http"
        assert request.header("x-forwarded-host") == urlsplit(recorded_service.base_url).netloc
    assert proxied[-3].body == b'{"experiment_id":"0"}'


@pytest.mark.parametrize(
    "raw_path",
    [
        "/mlflow/../health",
        "/mlflow/api/2.0/../../secret",
        "/mlflow/api/%2e%2e/%2e%2e/secret",
        "/mlflow/api/%252e%252e/secret",
        "/mlflow//evil.example/x",
        "/api/mlflow/a%5c..%5cb",
    ],
)
def test_traversal_is_refused_before_reaching_upstream(recorded_service, recorder, raw_path):
    key = create_key(recorded_service, ["admin"])
    before = len(recorder.requests)
    connection = http.client.HTTPConnection(urlsplit(recorded_service.base_url).netloc, timeout=10)
    connection.request("GET", raw_path, headers={"Authorization": f"Bearer {key}"})  # sent as is, dots and all
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == 400, (raw_path, body)
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and body["detail"] == body["message"]
    assert len(recorder.requests) == before


def test_upstream_timeout_is_504_with_the_real_figure(recorded_service, recorder):
    key = create_key(recorded_service, ["read"])
    slow = "/api/2.0/mlflow-artifacts/artifacts/slow"
    asked, answered = recorder.paths().count(slow), recorder.answered.count(slow)
    with recorded_service.client(key) as client:
        response = client.get("/mlflow" + slow)
    assert response.status_code == 504
    assert response.json()["detail"] == "MLflow server request timeout after 1s"
    assert recorder.paths().count(slow) == asked + 1  # the request reached the upstream ...
    assert recorder.answered.count(slow) == answered  # ... which had not answered yet (it takes 3 s): not waited for


def test_unreachable_upstream_is_502(start_service):
    dead = f"http://127.0.0.1:{free_loopback_port()}"
    service = start_service(wait_until="live", mlflow_url=dead)
    key = create_key(service, ["read"])
    with service.client(key) as client:
        response = client.get("/mlflow" + SEARCH)
    assert response.status_code == 502
    assert response.json()["detail"] == f"Failed to connect to MLflow server at {dead}"


def test_a_relayed_answer_is_mlflows_with_the_gateways_headers_once(service, mlflow_server):
    """Small answers are relayed in one message with MLflow's own headers: the body, type and length as MLflow sent
    them, MLflow's server/date/cookies not passed on, and the gateway's request id and rate-limit headers added
    once."""
    key = create_key(service, ["read"])
    path = "/api/2.0/mlflow/experiments/get?experiment_id=0"
    direct = httpx.get(mlflow_server.url + path, timeout=30)
    with service.client(key) as client:
        relayed = client.get("/mlflow" + path, headers={"X-Request-ID": "relay-check-1"})
    assert relayed.status_code == direct.status_code == 200
    assert relayed.content == direct.content
    assert relayed.headers["content-type"] == direct.headers["content-type"]
    assert relayed.headers["content-length"] == direct.headers["content-length"] == str(len(direct.content))
    names = [name.lower() for name, _ in relayed.headers.raw]
    assert names.count(b"x-request-id") == 1 and relayed.headers["x-request-id"] == "relay-check-1"
    assert names.count(b"x-ratelimit-limit") == 1 and names.count(b"x-ratelimit-remaining") == 1
    assert names.count(b"date") == 1 and names.count(b"server") <= 1  # the gateway's own, not MLflow's as well
