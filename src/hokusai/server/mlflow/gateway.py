"""The gateway's rules: what it forwards and what scope each MLflow route needs, as pure functions over paths,
headers and queries (no I/O). The forwarding itself (the ASGI middleware) is proxy.py."""

from __future__ import annotations

from urllib.parse import unquote, unquote_to_bytes

from hokusai.server.auth.keys import Scope
from hokusai.server.errors import InvalidRequest, NotFound, PermissionDenied
from hokusai.server.mlflow.scopes import GRAPHQL, MLFLOW_SCOPES, RouteRule, graphql_scope

UNCLASSIFIED_ROUTE = "This MLflow route is not classified for the gateway; it is refused until it is reviewed"
NO_SUCH_ROUTE = "MLflow serves no such route"


class MlflowRouteNotFound(NotFound):
    """A path no MLflow route serves, by any method: MLflow would answer 404 (the UI probes a few such paths, e.g.
    `users/current` of MLflow's optional auth app, and expects exactly that)."""

    def __init__(self) -> None:
        super().__init__(NO_SUCH_ROUTE)


HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# The client's credentials and browser context never reach MLflow: the gateway authenticates, MLflow trusts it.
# Origin/Referer/Sec-Fetch-* are dropped so MLflow's cross-origin write protection sees a server-to-server call.
REQUEST_HEADERS_DROPPED = HOP_BY_HOP | frozenset(
    {
        "host",
        "authorization",
        "x-api-key",
        "cookie",
        "origin",
        "referer",
        "sec-fetch-site",
        "sec-fetch-mode",
        "sec-fetch-dest",
        "sec-fetch-user",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-prefix",
        "forwarded",
    }
)
RESPONSE_HEADERS_DROPPED = HOP_BY_HOP | frozenset({"server", "date", "set-cookie"})
# The same sets as the raw (latin-1) header names compare against: every call filters every header, so without
# a decode per header.
_REQUEST_HEADERS_DROPPED_RAW = frozenset(name.encode("latin-1") for name in REQUEST_HEADERS_DROPPED)
_RESPONSE_HEADERS_DROPPED_RAW = frozenset(name.encode("latin-1") for name in RESPONSE_HEADERS_DROPPED)
KEY_QUERY_PARAMETER = "api_key"
# The MLflow UI's page and its bundled scripts, styles and images: what one page load fetches by the dozen.
STATIC_ASSET_PREFIXES = ("/static-files/",)


def is_static_asset(method: str, upstream_path: str) -> bool:
    """Whether a gateway call fetches the UI's page or its static files (authenticated, but not rate counted)."""
    return method in ("GET", "HEAD") and (upstream_path in ("", "/") or upstream_path.startswith(STATIC_ASSET_PREFIXES))


def route_rule(method: str, upstream_path: str) -> RouteRule:
    """The rule of MLflow's route from the reviewed table (scopes.py): a scope, or GRAPHQL when the operation in
    the body decides (`scope_for`). `upstream_path` is the raw path: it is decoded once, as MLflow's server decodes
    it before routing. A route the table does not classify is refused (PermissionDenied); a path MLflow does not
    serve at all is MlflowRouteNotFound (404)."""
    decoded = unquote(upstream_path)
    rule = MLFLOW_SCOPES.lookup(method, decoded)
    if rule is None:
        # A path MLflow serves by another method, or by a route not yet reviewed, is refused; one it does not serve
        # at all is not found, as MLflow itself would say.
        raise PermissionDenied(UNCLASSIFIED_ROUTE) if MLFLOW_SCOPES.serves(decoded) else MlflowRouteNotFound()
    return rule


def scope_for(rule: RouteRule, body: bytes | None = None) -> Scope:
    """The scope a route's rule asks for; for GraphQL, that of the operation in `body`."""
    if rule == GRAPHQL:
        if body is None:
            raise InvalidRequest("GraphQL request body must be JSON")
        return graphql_scope(body)
    return rule


def required_scope(method: str, upstream_path: str, body: bytes | None = None) -> Scope:
    """The scope MLflow's route needs (`route_rule`, then `scope_for`)."""
    return scope_for(route_rule(method, upstream_path), body)


def upstream_raw_path(raw_path: bytes, prefix: str) -> bytes:
    """The path to send upstream: the request path minus the gateway prefix, with traversal refused.

    The raw (still percent-encoded) path is forwarded unchanged, so MLflow decodes it exactly once, as it would
    for a direct call. What is checked is every decoding of it, so `%2e%2e` and `%252e%252e` are refused too.
    """
    encoded_prefix = prefix.encode()
    if not raw_path.startswith(encoded_prefix):
        raise InvalidRequest("Path is outside the MLflow gateway")
    rest = raw_path[len(encoded_prefix) :]
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    decoded = rest
    for _ in range(3):
        _refuse_unsafe(decoded)
        undone = unquote_to_bytes(decoded)
        if undone == decoded:
            break
        decoded = undone
    else:
        _refuse_unsafe(decoded)
    return rest


def _refuse_unsafe(path: bytes) -> None:
    if b"\\" in path or b"\x00" in path:
        raise InvalidRequest("Invalid characters in MLflow path")
    if any(segment in (b"..", b".") for segment in path.split(b"/")):
        raise InvalidRequest("Path traversal is not allowed in MLflow paths")
    if path.startswith(b"//"):
        raise InvalidRequest("Invalid MLflow path")


def upstream_query(raw_query: bytes) -> bytes:
    """The query string minus the client's credential, however its name is spelled (`api_key`, `api%5Fkey`,
    `API_KEY`, `%61pi_key`...); every other parameter is forwarded byte for byte."""
    if b"%" not in raw_query and b"key" not in raw_query.lower():
        return raw_query  # the common case: nothing that could name a key
    pairs = raw_query.split(b"&")
    kept = [pair for pair in pairs if not _names_the_key(pair.split(b"=", 1)[0])]
    return raw_query if len(kept) == len(pairs) else b"&".join(kept)


def _names_the_key(name: bytes) -> bool:
    """Whether a raw parameter name is `api_key` once decoded, as Starlette decodes it to authenticate (once) or
    as anything downstream might (again): decoded until it no longer changes, in any case, spaces around."""
    for _ in range(4):
        decoded = unquote_to_bytes(name.replace(b"+", b" "))
        if decoded == name:
            break
        name = decoded
    return name.strip().lower() == KEY_QUERY_PARAMETER.encode()


def forwarded_request_headers(
    headers: list[tuple[bytes, bytes]], client_host: str | None, scheme: str, host: str | None, prefix: str
) -> list[tuple[str, str]]:
    kept = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if name.lower() not in _REQUEST_HEADERS_DROPPED_RAW
    ]
    if client_host:
        kept.append(("X-Forwarded-For", client_host))
    kept.append(("X-Forwarded-Proto", scheme))
    if host:
        kept.append(("X-Forwarded-Host", host))
    kept.append(("X-Forwarded-Prefix", prefix))
    return kept


def forwarded_response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in headers if name.lower() not in _RESPONSE_HEADERS_DROPPED_RAW]
