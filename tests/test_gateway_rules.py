"""What the gateway forwards and which scope it needs: pure rules, no network."""

from __future__ import annotations

import json

import pytest

from hokusai.server.auth.keys import Scope
from hokusai.server.errors import InvalidRequest, PermissionDenied
from hokusai.server.mlflow.gateway import (
    MlflowRouteNotFound,
    forwarded_request_headers,
    forwarded_response_headers,
    required_scope,
    upstream_query,
    upstream_raw_path,
)


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/api/2.0/mlflow/experiments/search", Scope.READ),
        ("HEAD", "/api/2.0/mlflow-artifacts/artifacts/0/x", Scope.READ),
        ("POST", "/api/2.0/mlflow/runs/search", Scope.READ),
        ("POST", "/api/2.0/mlflow/experiments/search", Scope.READ),
        ("POST", "/api/2.0/mlflow/logged-models/search", Scope.READ),
        ("POST", "/api/3.0/mlflow/traces/search", Scope.READ),
        ("POST", "/ajax-api/2.0/mlflow/experiments/search-datasets", Scope.READ),
        ("POST", "/api/2.0/mlflow/runs/create", Scope.WRITE),
        ("POST", "/api/2.0/mlflow/runs/log-metric", Scope.WRITE),
        ("POST", "/api/2.0/mlflow/registered-models/create", Scope.WRITE),
        ("POST", "/api/2.0/mlflow/model-versions/transition-stage", Scope.WRITE),
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/0/a.bin", Scope.WRITE),
        ("PATCH", "/api/2.0/mlflow/registered-models/update", Scope.WRITE),
        ("DELETE", "/api/2.0/mlflow/registered-models/alias", Scope.WRITE),
        # Named like reads, but they create or change (the verb heuristic let a read key through).
        ("POST", "/api/3.0/mlflow/review-queues/get-or-create-user", Scope.WRITE),
        ("POST", "/ajax-api/3.0/mlflow/review-queues/get-or-create-user", Scope.WRITE),
        # Reads MLflow's UI and client send as POST (the heuristic refused them to read keys).
        ("POST", "/api/3.0/mlflow/traces/batchGetInfos", Scope.READ),
        ("POST", "/ajax-api/3.0/mlflow/traces/metrics", Scope.READ),
        ("POST", "/api/3.0/mlflow/traces/calculate-filter-correlation", Scope.READ),
        ("POST", "/api/2.0/mlflow/artifacts/presigned-download-url", Scope.READ),
        ("POST", "/api/2.0/mlflow/registered-models/get-latest-versions", Scope.READ),
        # Path parameters, artifact paths with slashes, the decoded spelling MLflow routes on.
        ("GET", "/api/3.0/mlflow/traces/tr-123", Scope.READ),
        ("GET", "/api/3.0/mlflow/traces/batchGet", Scope.READ),
        ("DELETE", "/api/3.0/mlflow/traces/tr-1/assessments/a-1", Scope.WRITE),
        ("GET", "/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/model/MLmodel", Scope.READ),
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/1/abc/a%20b/c.txt", Scope.WRITE),
        ("POST", "/api/2.0/mlflow/runs%2Fcreate", Scope.WRITE),
        # The UI's own files.
        ("GET", "/", Scope.READ),
        ("GET", "/static-files/static/js/main.js", Scope.READ),
        ("OPTIONS", "/api/2.0/mlflow/runs/create", Scope.READ),
        # Server-wide configuration and things that make the server act on its own.
        ("POST", "/api/3.0/mlflow/gateway/secrets/create", Scope.ADMIN),
        ("GET", "/ajax-api/3.0/mlflow/gateway/secrets/list", Scope.ADMIN),
        ("POST", "/api/2.0/mlflow/webhooks", Scope.ADMIN),
        ("POST", "/ajax-api/3.0/jobs/", Scope.ADMIN),
        ("POST", "/api/3.0/mlflow/workspaces", Scope.ADMIN),
        ("POST", "/api/3.0/mlflow/gateway/endpoints/create", Scope.ADMIN),
        ("GET", "/api/3.0/mlflow/gateway/endpoints/list", Scope.READ),
    ],
)
def test_required_scope(method, path, scope):
    assert required_scope(method, path) is scope


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/2.0/mlflow/traces/batch-get"),  # served as GET only (the heuristic called the POST a read)
        ("DELETE", "/api/2.0/mlflow/runs/get"),
    ],
)
def test_a_route_the_table_does_not_classify_is_refused(method, path):
    with pytest.raises(PermissionDenied, match="not classified"):
        required_scope(method, path)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/2.0/mlflow/logged-models/m-1/finalize"),  # finalize is PATCH logged-models/{model_id}
        ("GET", "/api/2.0/mlflow/no-such-route"),
        ("GET", "/ajax-api/2.0/mlflow/users/current"),  # MLflow's optional auth app: the UI probes it, expects 404
        ("OPTIONS", "/not/served"),
    ],
)
def test_a_path_mlflow_does_not_serve_is_not_found(method, path):
    with pytest.raises(MlflowRouteNotFound):
        required_scope(method, path)


@pytest.mark.parametrize(
    ("query", "scope"),
    [
        ('query SearchRuns { mlflowSearchRuns(input: {experimentIds: ["0"]}) { runs { info { runId } } } }', "read"),
        ('{ test(inputString: "x") { output } }', "read"),
        ('mutation { testMutation(inputString: "x") { output } }', "write"),
        # Every operation counts, whichever operationName picks.
        ("query A { test { output } } mutation B { testMutation { output } }", "write"),
        ("subscription S { test { output } }", "write"),
    ],
)
def test_graphql_scope_is_the_operations(query, scope):
    body = json.dumps({"query": query, "operationName": None}).encode()
    assert required_scope("POST", "/graphql", body) is Scope(scope)
    assert required_scope("GET", "/graphql", body) is Scope(scope)


@pytest.mark.parametrize(
    "body",
    [None, b"", b"not json", b"[1]", b'{"query": 1}', b'{"query": "query {"}', b'{"query": "fragment F on T { a }"}'],
)
def test_unreadable_graphql_is_a_bad_request(body):
    with pytest.raises(InvalidRequest):
        required_scope("POST", "/graphql", body)


def test_prefix_is_rewritten_and_encoding_kept():
    assert upstream_raw_path(b"/mlflow/api/2.0/mlflow/runs/get", "/mlflow") == b"/api/2.0/mlflow/runs/get"
    assert upstream_raw_path(b"/api/mlflow/health", "/api/mlflow") == b"/health"
    kept = b"/mlflow/api/2.0/mlflow-artifacts/artifacts/0/a%20b.txt"
    assert upstream_raw_path(kept, "/mlflow") == b"/api/2.0/mlflow-artifacts/artifacts/0/a%20b.txt"


@pytest.mark.parametrize(
    "raw",
    [
        b"/mlflow/../admin",
        b"/mlflow/api/2.0/../../etc/passwd",
        b"/mlflow/api/%2e%2e/secret",
        b"/mlflow/api/%2E%2E/secret",
        b"/mlflow/api/%252e%252e/secret",
        b"/mlflow/api/..%2fsecret",
        b"/mlflow/api/%2e%2e%2fsecret",
        b"/mlflow//evil.example/x",
        b"/mlflow/a\\..\\b",
        b"/mlflow/a%00b",
        b"/mlflow/./api",
    ],
)
def test_traversal_is_refused(raw):
    with pytest.raises(InvalidRequest):
        upstream_raw_path(raw, "/mlflow")


def test_api_key_is_removed_from_the_query():
    assert upstream_query(b"") == b""
    assert upstream_query(b"max_results=5&filter=name%3D%27x%27") == b"max_results=5&filter=name%3D%27x%27"
    stripped = upstream_query(b"max_results=5&api_key=hk_live_secret&API_KEY=again")
    assert b"hk_live" not in stripped and b"again" not in stripped and stripped == b"max_results=5"


def test_credentials_and_browser_context_are_not_forwarded():
    incoming = [
        (b"host", b"gateway.example"),
        (b"authorization", b"Bearer hk_live_x"),
        (b"x-api-key", b"hk_live_x"),
        (b"cookie", b"session=1"),
        (b"origin", b"https://evil.example"),
        (b"referer", b"https://evil.example/"),
        (b"connection", b"keep-alive"),
        (b"x-forwarded-for", b"6.6.6.6"),
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
        (b"user-agent", b"mlflow-python-client"),
    ]
    forwarded = forwarded_request_headers(incoming, "10.0.0.5", "https", "gateway.example", "/mlflow")
    names = [name.lower() for name, _ in forwarded]
    for dropped in ("host", "authorization", "x-api-key", "cookie", "origin", "referer", "connection"):
        assert dropped not in names
    assert dict(forwarded)["X-Forwarded-For"] == "10.0.0.5"  # the spoofed one is replaced
    assert dict(forwarded)["X-Forwarded-Proto"] == "https" and dict(forwarded)["X-Forwarded-Prefix"] == "/mlflow"
    assert ("content-length", "2") in forwarded and ("user-agent", "mlflow-python-client") in forwarded


def test_hop_by_hop_response_headers_are_dropped():
    out = forwarded_response_headers(
        [
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Type", b"application/json"),
            (b"Server", b"uvicorn"),
            (b"Content-Length", b"10"),
        ]
    )
    assert out == [(b"Content-Type", b"application/json"), (b"Content-Length", b"10")]
