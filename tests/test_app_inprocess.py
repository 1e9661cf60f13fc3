"""The app in-process: which routes require a key, and the last-resort error path."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from hokusai.server.app import create_app
from hokusai.server.config import Settings
from hokusai.server.logs import RequestContextFilter

pytestmark = pytest.mark.anyio

# Exact paths, not prefixes: these are the only routes served without a key.
PUBLIC_ROUTES = {
    "/health",
    "/ready",
    "/live",
    "/version",
    "/metrics",
    # the read-only MLflow health family (monitoring probes; POST /health/mlflow/reset needs an admin key)
    "/health/mlflow",
    "/health/status",
    "/mlflow/health/mlflow",
    "/mlflow/health/mlflow/detailed",
    "/api/health/mlflow",
    "/api/health/mlflow/detailed",
    "/api/health/mlflow/connectivity",
    "/api/v1/dspy/health",  # whether an LM is configured, and execution totals
}


@pytest.fixture
async def app_and_client(tmp_path, mlflow_server):
    admin_keys = []
    app = create_app(
        Settings(home=tmp_path, mlflow_url=mlflow_server.url),
        announce_admin_key=lambda key, _path: admin_keys.append(key),
    )

    async def explode():
        raise RuntimeError("secret internals")

    app.add_api_route("/explode", explode, include_in_schema=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client, admin_keys


async def test_every_route_but_the_public_ones_requires_a_key(app_and_client):
    _, client, _ = app_and_client
    schema = (await client.get("/openapi.json")).json()
    operations = [(method.upper(), path) for path, item in schema["paths"].items() for method in item]
    assert ("GET", "/api/v1/keys") in operations and ("POST", "/health/mlflow/reset") in operations
    for method, path in operations:
        response = await client.request(method, re.sub(r"\{[^}]+\}", "x", path))
        if path in PUBLIC_ROUTES and method == "GET":
            assert response.status_code == 200, path
        else:
            assert response.status_code == 401, (method, path)
            body = response.json()
            if path.startswith(("/mlflow/", "/api/mlflow/")):  # the documented gateway adds MLflow's error fields
                assert body.pop("error_code") == "UNAUTHENTICATED" and body.pop("message") == "API key required"
            assert body == {"detail": "API key required"}


async def test_admin_key_is_announced_once(app_and_client, tmp_path):
    _, client, admin_keys = app_and_client
    assert len(admin_keys) == 1
    assert (tmp_path / "admin-key").read_text().strip() == admin_keys[0]
    response = await client.get("/api/v1/keys", headers={"Authorization": f"Bearer {admin_keys[0]}"})
    assert response.status_code == 200 and len(response.json()) == 1


async def test_unexpected_errors_are_500_without_internals_and_logged_with_the_request_id(app_and_client, caplog):
    _, client, _ = app_and_client
    request_ids = []  # what the service's log filter gives the record when it is emitted

    class RequestIds(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            request_ids.append(record.request_id)

    stamped = RequestIds(logging.ERROR)
    stamped.addFilter(RequestContextFilter())
    logging.getLogger("hokusai.request").addHandler(stamped)
    try:
        with caplog.at_level(logging.ERROR, logger="hokusai.request"):
            response = await client.get("/explode", headers={"X-Request-ID": "req-42"})
    finally:
        logging.getLogger("hokusai.request").removeHandler(stamped)
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error"}
    assert response.headers["x-request-id"] == "req-42"
    assert "secret internals" not in response.text
    record = next(r for r in caplog.records if r.name == "hokusai.request")
    assert record.exc_info and "secret internals" in str(record.exc_info[1])
    assert request_ids == ["req-42"]


async def test_validation_errors_keep_the_reference_shape(app_and_client):
    _, client, admin_keys = app_and_client
    response = await client.post(
        "/api/v1/keys", json={"scopes": ["read"]}, headers={"Authorization": f"Bearer {admin_keys[0]}"}
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail[0]["loc"] == ["body", "name"] and "msg" in detail[0] and "type" in detail[0]


async def test_a_collaborator_is_replaced_through_dependency_overrides_and_writes_know_their_caller(app_and_client):
    from hokusai.server.deps import get_registry
    from hokusai.server.registry.schemas import ModelList, ModelVersionDetail

    app, client, admin_keys = app_and_client
    headers = {"Authorization": f"Bearer {admin_keys[0]}"}
    admin_id = (await client.get("/api/v1/keys", headers=headers)).json()[0]["id"]
    seen = []

    class FakeRegistry:
        async def list_versions(self, name, max_results, page_token, include_aliases=False):
            return ModelList(models=[])

        async def update_version(self, name, version, update, actor):
            seen.append((name, version, update.description, actor.id, actor.kind))
            return ModelVersionDetail(
                name=name,
                version=version,
                status="READY",
                created_at=0,
                tags={},
                stage="None",
                aliases=[],
                description=update.description,
                source="s3://fake",
                run_id=None,
                updated_at=0,
            )

    app.dependency_overrides[get_registry] = FakeRegistry
    try:
        listed = await client.get("/models/", headers=headers)
        patched = await client.patch("/models/fake/3", json={"description": "new"}, headers=headers)
        unauthenticated = await client.patch("/models/fake/3", json={"description": "new"})
    finally:
        app.dependency_overrides.clear()
    assert listed.status_code == 200 and listed.json()["models"] == []
    assert patched.status_code == 200 and patched.json()["description"] == "new"
    assert unauthenticated.status_code == 401  # the guard still runs in front of the replaced collaborator
    assert seen == [("fake", "3", "new", admin_id, "api_key")]
