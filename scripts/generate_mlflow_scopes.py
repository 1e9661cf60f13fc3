"""Draft, and keep up to date, the gateway's scope table: src/hokusai/server/mlflow/mlflow_scopes.json.

    .venv/bin/python scripts/generate_mlflow_scopes.py          # rewrite the table for the installed MLflow
    .venv/bin/python scripts/generate_mlflow_scopes.py --check  # exit 1 if it would change or needs review

Every route the installed MLflow serves (hokusai.server.mlflow.route_list) gets one line: method, path template,
scope (read, write, admin, graphql: by the operation in the body) and why. A route already in the table keeps its
reviewed scope and reason; a new route is drafted by the rules below, and one the rules cannot decide is written
as "review", which the gateway refuses (403) and the test suite fails on until a person reads its handler and
sets the scope. Routes MLflow no longer serves are dropped (and listed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from hokusai.server.mlflow.route_list import MlflowRoute, mlflow_routes

TABLE = Path(__file__).resolve().parents[1] / "src/hokusai/server/mlflow/mlflow_scopes.json"
REVIEW = "review"

# Server-wide configuration and anything that makes the server act on its own (outbound calls, jobs, a shell):
# not for a key that can merely write experiment data. Reads of these stay `read` unless listed in ADMIN_ALL.
ADMIN_WRITES = [
    (r"/mlflow/gateway/(endpoints|model-definitions|budgets|guardrails)/", "AI gateway configuration"),
    (r"/mlflow/workspaces", "workspace management"),
    (r"/ajax-api/3\.0/jobs/", "server job management (jobs run server-side functions)"),
    (r"/mlflow/jobs/cancel/", "server job management"),
    (r"/mlflow/assistant/", "the assistant runs an agent (with a shell tool) on the MLflow host"),
]
ADMIN_ALL = [
    (r"/mlflow/gateway/secrets/", "AI gateway provider credentials"),
    (r"/mlflow/webhooks", "webhooks make the server call any URL"),
]
READ_POST_SEGMENTS = {"search", "search-datasets", "get-latest-versions"}
WRITE_POST_VERBS = (
    "create",
    "delete",
    "update",
    "set",
    "log",
    "restore",
    "rename",
    "add",
    "remove",
    "link",
    "attach",
    "detach",
    "register",
    "cancel",
    "upload",
    "complete",
    "abort",
    "outputs",
    "install",
)


def draft(route: MlflowRoute) -> tuple[str, str]:
    """(scope, reason) by rule, or ("review", why the rules cannot tell)."""
    method, path = route.method, route.template
    for pattern, why in ADMIN_ALL:
        if re.search(pattern, path):
            return "admin", f"rule: {why}"
    if path.endswith("/graphql"):
        return "graphql", "rule: GraphQL, by the operation in the body (query: read, anything else: write)"
    if method == "GET":
        return "read", "rule: GET reads"
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if method == "POST" and last in READ_POST_SEGMENTS:
        return "read", "rule: POST search"
    for pattern, why in ADMIN_WRITES:
        if re.search(pattern, path):
            return "admin", f"rule: {why}"
    if method in ("PUT", "PATCH", "DELETE"):
        return "write", f"rule: {method} changes state"
    if any(last == verb or last.startswith(f"{verb}-") for verb in WRITE_POST_VERBS):
        return "write", "rule: POST named for a change"
    return REVIEW, f"rules cannot tell what POST {last!r} does: read handler {route.handler}"


def load_table(path: Path) -> dict[tuple[str, str], dict]:
    if not path.exists():
        return {}
    document = json.loads(path.read_text())
    return {
        (method, template): {"scope": scope, "handler": handler, "why": why}
        for method, template, scope, handler, why in document["routes"]
    }


def build(existing: dict[tuple[str, str], dict]) -> tuple[list[list[str]], list[str]]:
    rows, notes = [], []
    routes = mlflow_routes()
    for route in routes:
        known = existing.get((route.method, route.template))
        if known and known["scope"] != REVIEW:
            scope, why = known["scope"], known["why"]
        else:
            scope, why = draft(route)
            notes.append(f"new: {route.method} {route.template} -> {scope} ({why})")
        rows.append([route.method, route.template, scope, route.handler, why])
    current = {(route.method, route.template) for route in routes}
    notes += [f"gone from MLflow: {method} {template}" for method, template in sorted(set(existing) - current)]
    return rows, notes


def render(rows: list[list[str]], mlflow_version: str) -> str:
    """One route a line, so a review reads as a diff."""
    lines = ",\n".join("    " + json.dumps(row) for row in rows)
    header = {
        "mlflow_version": mlflow_version,
        "about": "Scope each MLflow route needs through the gateway; drafted by scripts/generate_mlflow_scopes.py, "
        "reviewed by hand. Rows: method, path template, scope, MLflow handler, why.",
    }
    head = json.dumps(header, indent=2)[:-2]
    return f'{head},\n  "routes": [\n{lines}\n  ]\n}}\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the table is not current")
    args = parser.parse_args(argv)

    import mlflow

    rows, notes = build(load_table(TABLE))
    text = render(rows, mlflow.__version__)
    for note in notes:
        print(note)
    pending = [row for row in rows if row[2] == REVIEW]
    for method, template, _, handler, _ in pending:
        print(f"NEEDS REVIEW: {method} {template} ({handler})")
    changed = not TABLE.exists() or TABLE.read_text() != text
    if args.check:
        return 1 if changed or pending else 0
    if changed:
        TABLE.write_text(text)
    print(f"{len(rows)} routes, {len(pending)} to review; {TABLE} {'written' if changed else 'unchanged'}")
    return 1 if pending else 0


if __name__ == "__main__":
    sys.exit(main())
