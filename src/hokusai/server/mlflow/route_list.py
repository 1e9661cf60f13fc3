"""Every (method, path template) the MLflow server answers, read from MLflow's own apps.

Used by scripts/generate_mlflow_scopes.py (to draft the gateway's scope table) and by the test that fails when
MLflow serves a route the table does not classify. Never imported by the running service: it imports MLflow's
whole server (~4 s, and MLflow's Flask app is built at import).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# What the stock uvicorn server answers for a GET route on its own: HEAD is looked up as GET, OPTIONS is a
# preflight that changes nothing.
IMPLICIT_METHODS = frozenset({"HEAD", "OPTIONS"})


@dataclass(frozen=True, order=True)
class MlflowRoute:
    method: str
    template: str  # Starlette spelling: `{name}` is one path segment, `{name:path}` any number of them
    handler: str


def to_template(path: str) -> str:
    """Flask's `<name>` / `<path:name>` in Starlette's spelling, so one route served by both reads the same."""
    path = re.sub(r"<path:(\w+)>", r"{\1:path}", path)
    path = re.sub(r"<(?:string:)?(\w+)>", r"{\1}", path)
    if "<" in path:
        raise ValueError(f"unexpected Flask converter in MLflow route {path!r}")
    return path


def mlflow_routes() -> list[MlflowRoute]:
    """The routes of the app `mlflow server` runs with uvicorn (mlflow.server.fastapi_app: MLflow's FastAPI
    routers (OTLP, jobs, AI gateway, assistant, artifacts, MCP servers, server info) in front of its Flask app)."""
    from mlflow.server.handlers import STATIC_PREFIX_ENV_VAR

    if os.environ.get(STATIC_PREFIX_ENV_VAR):
        raise RuntimeError(f"unset {STATIC_PREFIX_ENV_VAR}: the gateway forwards to an MLflow without a static prefix")

    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import create_fastapi_app
    from starlette.routing import Mount

    routes: set[MlflowRoute] = set()
    for route in _fastapi_routes(create_fastapi_app(flask_app).routes):
        if isinstance(route, Mount):
            continue  # the catch-all mount of the Flask app, listed below rule by rule
        for method in set(route.methods or ()) - IMPLICIT_METHODS:
            routes.add(MlflowRoute(method, route.path, getattr(route.endpoint, "__name__", str(route.endpoint))))
    for rule in flask_app.url_map.iter_rules():
        for method in set(rule.methods or ()) - IMPLICIT_METHODS:
            routes.add(MlflowRoute(method, to_template(rule.rule), rule.endpoint))
    # A route served by both apps (artifact downloads) counts once: the FastAPI one answers first.
    unique: dict[tuple[str, str], MlflowRoute] = {}
    for route in sorted(routes):
        unique.setdefault((route.method, route.template), route)
    return sorted(unique.values(), key=lambda route: (route.template, route.method))


def _fastapi_routes(routes: list) -> list:
    """FastAPI keeps included routers lazily (`_IncludedRouter`); their effective routes carry the full path."""
    flat = []
    for route in routes:
        if hasattr(route, "effective_route_contexts"):
            flat.extend(route.effective_route_contexts())
        else:
            flat.append(route)
    return flat
