"""The OpenAPI document, completed: how to present a key, what a guarded route answers without one, the gateway.

FastAPI derives the document from the routes, but the route guards (auth.dependencies.allow) are plain
dependencies, not FastAPI security classes, so it knows neither that a route needs a key nor the 401/403/429 it
then answers. Both are added here, from the routes themselves: a route is guarded when one of its dependencies
carries `required_scope` (the scope its action needs), so no list of paths can drift from the code. The gateway
(/mlflow/*, /api/mlflow/*) is an ASGI middleware, not routes, and is described by hand.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

from hokusai.server.auth.keys import Scope

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "BearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer hk_live_...` (preferred)",
    },
    "ApiKeyAuthorization": {
        "type": "http",
        "scheme": "apikey",
        "description": "`Authorization: ApiKey hk_live_...`",
    },
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "`X-API-Key: hk_live_...`"},
    "ApiKeyQuery": {
        "type": "apiKey",
        "in": "query",
        "name": "api_key",
        "description": "Deprecated (answers carry `Deprecation` and `Warning`): keys in URLs end up in logs",
    },
}
# Any one of them will do.
KEY_REQUIRED = [{name: []} for name in SECURITY_SCHEMES]
ERROR_SCHEMA_NAME = "ErrorDetail"
ERROR_SCHEMA: dict[str, Any] = {
    "title": ERROR_SCHEMA_NAME,
    "type": "object",
    "properties": {"detail": {"title": "Detail", "type": "string"}},
    "required": ["detail"],
}
ERROR_CONTENT = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA_NAME}"}}}
RATE_LIMIT_HEADERS = {
    "Retry-After": {"description": "Seconds until a request may succeed", "schema": {"type": "integer"}},
}
GUARD_RESPONSES: dict[str, dict[str, Any]] = {
    "401": {
        "description": "No key, or an unknown, malformed, revoked or expired one",
        "content": ERROR_CONTENT,
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    "403": {"description": "The key lacks the scope this operation needs", "content": ERROR_CONTENT},
    "429": {
        "description": "Over the key's hourly budget, the route's policy, or too many failed keys from this address",
        "content": ERROR_CONTENT,
        "headers": RATE_LIMIT_HEADERS,
    },
}
# Validation errors: FastAPI documents them where a route has parameters or a body; a guarded route without either
# gets the same entry, so every guarded route documents the same set of answers.
# FastAPI's 422 holds pydantic's list of problems; a domain refusal (errors.Unprocessable) is a 422 with a string
# detail. Both are documented.
VALIDATION_RESPONSE = {
    "description": "Validation Error: pydantic's list of problems, or one sentence",
    "content": {
        "application/json": {
            "schema": {
                "anyOf": [
                    {"$ref": "#/components/schemas/HTTPValidationError"},
                    {"$ref": f"#/components/schemas/{ERROR_SCHEMA_NAME}"},
                ]
            }
        }
    },
}

# The gateway, for the document only. `x-hokusai-gateway` marks it: these paths lead to MLflow's own API (and
# MLflow's UI), which a generic fuzzer of this document must leave alone.
GATEWAY_EXTENSION = "x-hokusai-gateway"
GATEWAY_PREFIXES = ("/mlflow", "/api/mlflow")
GATEWAY_METHODS = ("get", "post", "put", "patch", "delete")
GATEWAY_RESPONSES: dict[str, dict[str, Any]] = {
    "200": {"description": "MLflow's answer, relayed as is (JSON, an artifact stream, a UI page...)"},
    "502": {"description": "MLflow could not be reached or answered garbage", "content": ERROR_CONTENT},
    "503": {"description": "The circuit breaker on MLflow is open", "content": ERROR_CONTENT},
    "504": {"description": "MLflow did not answer in time", "content": ERROR_CONTENT},
}


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (and /openapi.json) return the completed document."""
    generate = app.openapi
    completed: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        document = generate()  # FastAPI's own, cached until the routes change
        if completed.get("from") is not document:
            completed["from"] = document
            completed["document"] = complete_document(app, document)
        return completed["document"]

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the document


def complete_document(app: FastAPI, generated: dict[str, Any]) -> dict[str, Any]:
    document = copy.deepcopy(generated)
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
    components.setdefault("schemas", {})[ERROR_SCHEMA_NAME] = ERROR_SCHEMA
    paths = document.setdefault("paths", {})
    for path, method, scope in guarded_operations(app):
        operation = paths.get(path, {}).get(method)
        if operation is None:  # not in the document (include_in_schema=False)
            continue
        operation["security"] = KEY_REQUIRED
        operation["x-required-scope"] = scope.value
        responses = operation.setdefault("responses", {})
        for status, response in GUARD_RESPONSES.items():
            responses.setdefault(status, copy.deepcopy(response))
        responses["422"] = copy.deepcopy(VALIDATION_RESPONSE)
        note = f"Needs a key with the `{scope.value}` scope."
        operation["description"] = f"{operation['description']}\n\n{note}" if operation.get("description") else note
    for operations in paths.values():  # public routes with parameters: FastAPI's 422 entry, widened the same way
        for operation in operations.values():
            if isinstance(operation, dict) and "422" in operation.get("responses", {}):
                operation["responses"]["422"] = copy.deepcopy(VALIDATION_RESPONSE)
    if "HTTPValidationError" not in components["schemas"]:  # only when no route has parameters at all
        components["schemas"].update(_validation_schemas())
    for prefix in GATEWAY_PREFIXES:
        paths[f"{prefix}/{{path}}"] = _gateway_path(prefix)
    return document


def guarded_operations(app: FastAPI) -> list[tuple[str, str, Scope]]:
    """(path template, lower-case method, scope) of every route that a scope guard protects."""
    found = []
    for route in iter_route_contexts(app.routes):
        dependant = getattr(route, "dependant", None)
        if dependant is None:
            continue
        scope = required_scope(dependant)
        if scope is None:
            continue
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                found.append((route.path_format, method.lower(), scope))
    return found


def required_scope(dependant: Any) -> Scope | None:
    """The highest scope any guard among the route's dependencies (at any depth) requires, if any."""
    scopes, pending = [], [dependant]
    while pending:
        current = pending.pop()
        for sub in current.dependencies:
            scope = getattr(sub.call, "required_scope", None)
            if isinstance(scope, Scope):
                scopes.append(scope)
            pending.append(sub)
    return max(scopes, key=lambda scope: scope.rank, default=None)


def _gateway_path(prefix: str) -> dict[str, Any]:
    described: dict[str, Any] = {
        "parameters": [
            {
                "name": "path",
                "in": "path",
                "required": True,
                "description": "MLflow's own path below the prefix, slashes included (e.g. `api/2.0/mlflow/runs/get`)",
                "schema": {"type": "string"},
            }
        ]
    }
    for method in GATEWAY_METHODS:
        described[method] = {
            "tags": ["mlflow gateway"],
            "summary": f"MLflow through the gateway ({method.upper()})",
            "description": (
                f"`{prefix}/<path>` is MLflow's `/<path>`, for the stock `mlflow` client "
                f"(`MLFLOW_TRACKING_URI=<service>{prefix}`, `MLFLOW_TRACKING_TOKEN=<key>`) and MLflow's UI. "
                "Each MLflow route needs the scope the gateway's table gives it (reads `read`, changes `write`, "
                "the rest `admin`); a route missing from the table is refused. Requests and answers are streamed "
                "(artifact uploads of any size); the circuit breaker on MLflow applies. "
                "Not served by FastAPI routes: documented here, not fuzzed."
            ),
            "operationId": f"mlflow_gateway_{prefix.strip('/').replace('/', '_')}_{method}",
            "security": KEY_REQUIRED,
            "responses": {**copy.deepcopy(GATEWAY_RESPONSES), **copy.deepcopy(GUARD_RESPONSES)},
            GATEWAY_EXTENSION: True,
        }
    return described


def _validation_schemas() -> dict[str, Any]:
    return {
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {
                    "title": "Detail",
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/ValidationError"},
                }
            },
        },
        "ValidationError": {
            "title": "ValidationError",
            "type": "object",
            "required": ["loc", "msg", "type"],
            "properties": {
                "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                "msg": {"type": "string"},
                "type": {"type": "string"},
            },
        },
    }
