"""What the gateway forwards, and what it needs: pure functions over paths, headers and queries (no I/O)."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote_to_bytes, urlencode

from hokusai.server.auth.keys import Scope
from hokusai.server.errors import InvalidRequest

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# MLflow's read endpoints that are POSTs: experiments/search, runs/search, logged-models/search, traces/search,
# experiments/search-datasets, traces/batch-get ...
READ_POST_ACTIONS = ("search", "get")

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
KEY_QUERY_PARAMETER = "api_key"


def required_scope(method: str, upstream_path: str) -> Scope:
    """Reads (GET, and POST search/get style calls) need `read`; anything that creates, updates or deletes `write`."""
    if method in READ_METHODS:
        return Scope.READ
    action = upstream_path.rstrip("/").rsplit("/", 1)[-1].lower()
    if method == "POST" and any(
        action == verb or action.startswith(f"{verb}-") or action.endswith(f"-{verb}") for verb in READ_POST_ACTIONS
    ):
        return Scope.READ
    return Scope.WRITE


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
    """The query string minus any api_key (the client's credential); untouched when there is none."""
    if KEY_QUERY_PARAMETER.encode() not in raw_query.lower():
        return raw_query
    pairs = parse_qsl(raw_query.decode("latin-1"), keep_blank_values=True)
    return urlencode([(k, v) for k, v in pairs if k.lower() != KEY_QUERY_PARAMETER]).encode("latin-1")


def forwarded_request_headers(
    headers: list[tuple[bytes, bytes]], client_host: str | None, scheme: str, host: str | None, prefix: str
) -> list[tuple[str, str]]:
    kept = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if name.decode("latin-1").lower() not in REQUEST_HEADERS_DROPPED
    ]
    if client_host:
        kept.append(("X-Forwarded-For", client_host))
    kept.append(("X-Forwarded-Proto", scheme))
    if host:
        kept.append(("X-Forwarded-Host", host))
    kept.append(("X-Forwarded-Prefix", prefix))
    return kept


def forwarded_response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in headers if name.decode("latin-1").lower() not in RESPONSE_HEADERS_DROPPED]
