"""The gateway's scope table: complete for the installed MLflow, and applied over HTTP with a read key."""

from __future__ import annotations

import json
import re

import pytest

from hokusai.server.auth.keys import Scope
from hokusai.server.mlflow.gateway import NO_SUCH_ROUTE, UNCLASSIFIED_ROUTE
from hokusai.server.mlflow.route_list import mlflow_routes
from hokusai.server.mlflow.scopes import GRAPHQL, MLFLOW_SCOPES, TABLE_FILE, UNREVIEWED


def table_rows() -> list[list[str]]:
    from importlib import resources

    return json.loads(resources.files("hokusai.server.mlflow").joinpath(TABLE_FILE).read_text())["routes"]


def concrete(template: str) -> str:
    """A path MLflow would route to `template`: every parameter filled in (artifact paths with a slash)."""
    return re.sub(r"\{(\w+)(:path)?\}", lambda m: "dir/file.txt" if m.group(2) else f"some-{m.group(1)}", template)


@pytest.fixture(scope="module")
def routes():
    return mlflow_routes()


def test_every_mlflow_route_is_classified(routes):
    """A newer MLflow adds routes: run scripts/generate_mlflow_scopes.py and review what it flags."""
    rows = {(method, template): scope for method, template, scope, _, _ in table_rows()}
    missing = [f"{r.method} {r.template} ({r.handler})" for r in routes if (r.method, r.template) not in rows]
    unreviewed = [f"{method} {template}" for (method, template), scope in rows.items() if scope == UNREVIEWED]
    assert not missing, "MLflow routes missing from the gateway scope table:\n" + "\n".join(missing)
    assert not unreviewed, "Routes waiting for review:\n" + "\n".join(unreviewed)
    served = {(r.method, r.template) for r in routes}
    stale = sorted(set(rows) - served)
    assert not stale, f"Rows for routes MLflow no longer serves: {stale}"


def test_each_route_is_matched_to_its_own_row(routes):
    """The matcher finds every route's own scope from a concrete path (templates do not shadow each other)."""
    rows = {(method, template): scope for method, template, scope, _, _ in table_rows()}
    wrong = []
    for route in routes:
        expected = rows[(route.method, route.template)]
        found = MLFLOW_SCOPES.lookup(route.method, concrete(route.template))
        if found is None or (found if found == GRAPHQL else Scope(found).value) != expected:
            wrong.append(f"{route.method} {route.template}: table {expected}, matched {found}")
    assert not wrong, "\n".join(wrong)


# --- over HTTP, through the gateway, against the real MLflow -------------------------------------------------

GRAPHQL_QUERY = 'query Echo { test(inputString: "hello") { output } }'
GRAPHQL_MUTATION = 'mutation Echo { testMutation(inputString: "hello") { output } }'


@pytest.mark.parametrize("prefix", ["/mlflow/api/3.0", "/mlflow/ajax-api/3.0", "/api/mlflow/api/3.0"])
def test_a_read_key_cannot_create_through_get_or_create(reader, writer, prefix):
    path = prefix + "/mlflow/review-queues/get-or-create-user"
    body = {"experiment_id": "0", "user": "someone"}
    refused = reader.post(path, json=body)
    assert refused.status_code == 403 and refused.json()["detail"] == "This API key lacks the 'write' scope"
    assert writer.post(path, json=body).status_code != 403


def test_graphql_queries_are_reads_and_mutations_writes(reader, writer):
    query = reader.post("/mlflow/graphql", json={"query": GRAPHQL_QUERY, "operationName": "Echo"})
    assert query.status_code == 200, query.text
    assert query.json()["data"] == {"test": {"output": "hello"}}
    refused = reader.post("/mlflow/graphql", json={"query": GRAPHQL_MUTATION})
    assert refused.status_code == 403 and refused.json()["detail"] == "This API key lacks the 'write' scope"
    allowed = writer.post("/mlflow/graphql", json={"query": GRAPHQL_MUTATION})
    assert allowed.status_code == 200 and "testMutation" in allowed.json()["data"]  # MLflow ran it


def test_graphql_the_gateway_cannot_read_is_refused(reader):
    for body in (b"not json", b'{"query": "query {"}', b"[]"):
        response = reader.post("/mlflow/graphql", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (body, response.text)
    padded = json.dumps({"query": GRAPHQL_QUERY, "variables": {"pad": "x" * 300_000}})
    too_large = reader.post("/mlflow/graphql", content=padded, headers={"Content-Type": "application/json"})
    assert too_large.status_code == 413


def test_graphql_body_streamed_without_a_length_is_bounded_too(reader):
    def chunks():
        yield json.dumps({"query": GRAPHQL_QUERY, "variables": {"pad": ""}}).encode()[:-3]
        for _ in range(40):
            yield b"x" * 10_000
        yield b'"}}'

    response = reader.post("/mlflow/graphql", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/3.0/mlflow/traces/batchGetInfos", {"trace_ids": ["tr-missing"]}),
        (
            "/ajax-api/3.0/mlflow/traces/metrics",
            {
                "experiment_ids": ["0"],
                "view_type": "TRACES",
                "metric_name": "trace_count",
                "aggregations": [{"aggregation_type": "COUNT"}],
            },
        ),
        (
            "/api/3.0/mlflow/traces/calculate-filter-correlation",
            {
                "experiment_ids": ["0"],
                "filter_string1": "trace.status = 'OK'",
                "filter_string2": "trace.status = 'ERROR'",
            },
        ),
        ("/api/2.0/mlflow/artifacts/presigned-download-url", {"run_id": "missing", "path": "model/MLmodel"}),
        ("/api/2.0/mlflow/registered-models/get-latest-versions", {"name": "no-such-model"}),
    ],
)
def test_reads_sent_as_post_are_allowed_to_a_read_key(reader, path, body):
    response = reader.post("/mlflow" + path, json=body)
    # MLflow's own answer (found, not found, or unsupported for this artifact store), never the gateway's 403.
    assert response.status_code != 403, response.text
    assert response.json().get("error_code") != "PERMISSION_DENIED"


def test_an_unclassified_route_is_refused_even_to_an_admin(service):
    with service.client(service.admin_key) as admin:
        for method, path in [
            ("POST", "/mlflow/api/2.0/mlflow/traces/batch-get"),
            ("DELETE", "/mlflow/api/2.0/mlflow/runs/get"),
        ]:
            response = admin.request(method, path)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["detail"] == UNCLASSIFIED_ROUTE
        # A path MLflow does not serve at all: not found, as MLflow itself says (the UI probes such paths).
        for path in ("/api/mlflow/api/2.0/mlflow/no-such-route", "/mlflow/ajax-api/2.0/mlflow/users/current"):
            response = admin.get(path)
            assert response.status_code == 404, (path, response.text)
            assert response.json()["detail"] == NO_SUCH_ROUTE


def test_admin_routes_need_an_admin_key(writer, service):
    refused = writer.get("/mlflow/ajax-api/3.0/mlflow/gateway/secrets/list")
    assert refused.status_code == 403 and refused.json()["detail"] == "This API key lacks the 'admin' scope"
    with service.client(service.admin_key) as admin:
        assert admin.get("/mlflow/ajax-api/3.0/mlflow/gateway/secrets/list").status_code != 403


def test_the_ui_files_are_reads(reader):
    assert reader.get("/mlflow/").status_code == 200
    assert reader.get("/mlflow/static-files/favicon.ico").status_code in (200, 404)
