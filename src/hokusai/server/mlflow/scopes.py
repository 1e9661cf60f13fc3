"""Which scope each MLflow route needs through the gateway: the reviewed table, matched per request.

The table (mlflow_scopes.json beside this file) lists every route MLflow serves, generated from MLflow's own route
list by scripts/generate_mlflow_scopes.py and reviewed by hand: a name-based guess let a read key create through a
POST called `get-or-create-user` and refused reads MLflow sends as POST. A path MLflow does not serve, or a route
added by a newer MLflow and not yet reviewed, matches nothing here and is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from graphql import GraphQLError, OperationDefinitionNode, OperationType, parse

from hokusai.server.auth.keys import Scope
from hokusai.server.errors import InvalidRequest

TABLE_FILE = "mlflow_scopes.json"
GRAPHQL = "graphql"  # the scope is that of the operation in the body
UNREVIEWED = "review"
RouteRule = Scope | Literal["graphql"]
# Bounds of what the gateway parses itself: MLflow's UI sends GraphQL documents of a few hundred tokens.
GRAPHQL_MAX_TOKENS = 10_000
_PARAMETER = re.compile(r"\{(\w+)(:path)?\}")


@dataclass(frozen=True)
class _Template:
    literal_prefix: str
    pattern: re.Pattern[str]
    rule: RouteRule


class ScopeTable:
    """Exact paths in one dict lookup; templated ones tried only when their literal prefix matches."""

    def __init__(self, routes: list[tuple[str, str, RouteRule]]) -> None:
        self._exact: dict[tuple[str, str], RouteRule] = {}
        self._templates: dict[str, list[_Template]] = {}
        for method, template, rule in routes:
            if "{" not in template:
                self._exact[(method, template)] = rule
            else:
                self._templates.setdefault(method, []).append(_compile(template, rule))
        self._methods = frozenset(method for method, _, _ in routes)

    @classmethod
    def load(cls) -> ScopeTable:
        document = json.loads(resources.files(__package__).joinpath(TABLE_FILE).read_text())
        # A row still marked "review" is left out: refused like any route the table does not know.
        return cls(
            [
                (method, template, GRAPHQL if scope == GRAPHQL else Scope(scope))
                for method, template, scope, _, _ in document["routes"]
                if scope != UNREVIEWED
            ]
        )

    def serves(self, path: str) -> bool:
        """Whether MLflow serves `path` (decoded) by any method: a path it does not serve is answered 404 by MLflow
        itself, so the gateway may answer so too, without asking it."""
        return any(self._match(method, path) is not None for method in self._methods)

    def lookup(self, method: str, path: str) -> RouteRule | None:
        """The rule of (method, decoded path), or None when MLflow serves no such route (or it is unreviewed).

        HEAD is answered by the GET route; OPTIONS (a CORS preflight, which changes nothing) is a read of any
        path some method is served on. Where templates overlap, the strictest match wins.
        """
        if method == "OPTIONS":
            return Scope.READ if self.serves(path) else None
        return self._match("GET" if method == "HEAD" else method, path)

    def _match(self, method: str, path: str) -> RouteRule | None:
        exact = self._exact.get((method, path))
        if exact is not None:
            return exact
        found: list[RouteRule] = []
        for template in self._templates.get(method, ()):
            if path.startswith(template.literal_prefix) and template.pattern.fullmatch(path):
                found.append(template.rule)
        if not found:
            return None
        if GRAPHQL in found:
            return GRAPHQL
        return max(found, key=lambda rule: Scope(rule).rank)


def _compile(template: str, rule: RouteRule) -> _Template:
    parts, position = [], 0
    for parameter in _PARAMETER.finditer(template):
        parts.append(re.escape(template[position : parameter.start()]))
        parts.append(".+" if parameter.group(2) else "[^/]+")
        position = parameter.end()
    parts.append(re.escape(template[position:]))
    literal_prefix = template[: template.index("{")]
    return _Template(literal_prefix, re.compile("".join(parts), re.DOTALL), rule)


def graphql_scope(body: bytes) -> Scope:
    """`read` for a document of queries only; `write` when it holds a mutation (or a subscription).

    MLflow runs the operation named by `operationName`, but every operation of the document is counted: a
    document that could run a mutation needs `write` whichever one is named.
    """
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest("GraphQL request body must be JSON") from exc
    query = payload.get("query") if isinstance(payload, dict) else None
    if not isinstance(query, str):
        raise InvalidRequest("GraphQL request body must be a JSON object with a 'query' string")
    try:
        document = parse(query, no_location=True, max_tokens=GRAPHQL_MAX_TOKENS)
    except (GraphQLError, RecursionError) as exc:
        raise InvalidRequest("GraphQL query could not be parsed") from exc
    operations = [node for node in document.definitions if isinstance(node, OperationDefinitionNode)]
    if not operations:
        raise InvalidRequest("GraphQL document holds no operation")
    if all(operation.operation is OperationType.QUERY for operation in operations):
        return Scope.READ
    return Scope.WRITE


MLFLOW_SCOPES = ScopeTable.load()
