"""The one place that turns exceptions into `{"detail": ...}` responses.

Domain code raises these classes and knows nothing of HTTP; each class carries the status it maps to.
Unexpected exceptions are caught by `RequestContextMiddleware`, logged with the request id and answered
with a bare 500.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from hokusai.server.web.browser import SESSION_COOKIE, is_page_load, login_location

INTERNAL_ERROR_DETAIL = "Internal server error"


class HokusaiError(Exception):
    status_code = 500
    headers: dict[str, str] | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequest(HokusaiError):
    status_code = 400


class NotFound(HokusaiError):
    status_code = 404


class Conflict(HokusaiError):
    status_code = 409


class Unprocessable(HokusaiError):
    """Well-formed but unusable input (422), where the problem is only found by looking things up."""

    status_code = 422


class AuthenticationError(HokusaiError):
    status_code = 401
    headers = {"WWW-Authenticate": 'Bearer realm="hokusai"'}


class ApiKeyRequired(AuthenticationError):
    def __init__(self) -> None:
        super().__init__("API key required")


class SessionExpired(AuthenticationError):
    """Unknown, signed-out and expired sessions, and sessions of revoked keys, all look the same from outside."""

    def __init__(self) -> None:
        super().__init__("Session expired or signed out: sign in again")


class InvalidApiKey(AuthenticationError):
    """Unknown, malformed, revoked and expired keys all look the same from outside."""

    def __init__(self) -> None:
        super().__init__("Invalid or expired API key")


class PermissionDenied(HokusaiError):
    status_code = 403


class ServiceUnavailable(HokusaiError):
    status_code = 503


class ErrorDetail(BaseModel):
    """The body of every error answer (validation errors carry a list of problems instead of a string)."""

    detail: str


# The stock mlflow client reads `error_code` and `message` from an error body and shows nothing else, so errors
# on the gateway carry those too (beside `detail`): the client then says "UNAUTHENTICATED: API key required"
# rather than "INTERNAL_ERROR: Response: {...}".
MLFLOW_GATEWAY_PREFIXES = ("/mlflow/", "/api/mlflow/")
MLFLOW_ERROR_CODES = {
    400: "INVALID_PARAMETER_VALUE",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_DOES_NOT_EXIST",
    408: "DEADLINE_EXCEEDED",
    409: "RESOURCE_ALREADY_EXISTS",
    413: "RESOURCE_LIMIT_EXCEEDED",
    429: "REQUEST_LIMIT_EXCEEDED",
    502: "TEMPORARILY_UNAVAILABLE",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "TEMPORARILY_UNAVAILABLE",
}


def error_response_for(request: Request, exc: HokusaiError) -> Response:
    if isinstance(exc, AuthenticationError):
        return _unauthenticated(request, exc)
    return _json_error(request, exc)


def _unauthenticated(request: Request, exc: AuthenticationError) -> Response:
    """A browser loading a page is sent to sign in (and back after); API clients get the JSON 401. A session
    cookie that no longer works is cleared, so the browser stops sending it."""
    response = RedirectResponse(login_location(request), status_code=303) if is_page_load(request) else None
    response = response or _json_error(request, exc)
    if isinstance(exc, SessionExpired):
        response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _json_error(request: Request, exc: HokusaiError) -> JSONResponse:
    body: dict[str, object] = {"detail": exc.detail}
    if request.url.path.startswith(MLFLOW_GATEWAY_PREFIXES):
        body["error_code"] = MLFLOW_ERROR_CODES.get(exc.status_code, "INTERNAL_ERROR")
        body["message"] = exc.detail
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _hokusai_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HokusaiError)
    return error_response_for(request, exc)


# What a 422 echoes of the caller's input: enough to see the problem, never the whole body back.
MAX_ECHOED_CHARS = 200
MAX_ECHOED_NODES = 50
MAX_ECHOED_DEPTH = 4
_SURROGATES = re.compile("[\ud800-\udfff]")


class _TooLarge(Exception):
    """An input too large or too deep to echo: the error is rendered without it."""


def _printable(text: str, limit: int = MAX_ECHOED_CHARS) -> str:
    """Text that UTF-8 can encode (a lone surrogate cannot: JSON allows it as `\\ud800`, UTF-8 does not),
    shortened to `limit` characters."""
    text = _SURROGATES.sub("\ufffd", text)
    return text if len(text) <= limit else text[:limit] + "\u2026"


def _echoable(value: Any, budget: list[int], depth: int = 0) -> Any:
    """`value` as plain JSON with every string printable; _TooLarge past MAX_ECHOED_NODES/MAX_ECHOED_DEPTH."""
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_ECHOED_DEPTH:
        raise _TooLarge()
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _printable(value)
    if isinstance(value, bytes | bytearray):
        return _printable(bytes(value[: MAX_ECHOED_CHARS * 4]).decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {_printable(str(k)): _echoable(v, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_echoable(item, budget, depth + 1) for item in value]
    return _printable(str(value))  # exceptions in `ctx`, enums, decimals...


def renderable_validation_errors(errors: Any) -> list[dict[str, Any]]:
    """pydantic's error list in its own shape ({"type", "loc", "msg", "input", "ctx"}), safe to encode.

    FastAPI's default handler renders `jsonable_encoder(exc.errors())`, which echoes the offending input as is:
    a lone surrogate in it made the 422 itself fail to encode (a 500), and a huge input was sent back whole. Here
    every string is made encodable and shortened, and an input too large to echo is left out.
    """
    rendered = []
    for error in errors:
        item: dict[str, Any] = {}
        for field, value in error.items():
            if field == "loc":
                item["loc"] = [part if isinstance(part, int) else _printable(str(part)) for part in value]
            elif field in ("type", "msg"):
                item[field] = _printable(str(value), limit=1000)
            elif field in ("input", "ctx"):
                try:
                    item[field] = _echoable(value, [MAX_ECHOED_NODES])
                except _TooLarge:
                    continue
            # other fields (url: a link to pydantic's docs) are left out
        rendered.append(item)
    return rendered


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": renderable_validation_errors(exc.errors())}, status_code=422)


# A JSON body may carry a lone surrogate as an escape (`"\\ud800"`): valid JSON, a valid Python str, but no
# UTF-8 text: the database, MLflow and our own responses cannot take it. Escapes of surrogates are rare (emoji
# written as escaped pairs), so the body is walked only when its bytes contain one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_unpaired_surrogate(document: Any) -> bool:
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATES.search(value):
                return True
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


async def refuse_unencodable_text(request: Request) -> None:
    """Refuse (422) a JSON body with a string no UTF-8 text can hold, before any handler sees it.

    Installed for every route; it looks only at a body FastAPI has already read for the route. The route's own
    scope guard runs first, so a caller without a valid key still gets 401/403/429, as for any other body.
    """
    route = request.scope.get("route")
    if getattr(route, "body_field", None) is None:
        return
    if "json" not in request.headers.get("content-type", "json"):
        return  # a form (sign-in, the dashboard's actions): FastAPI parsed it as a stream, no body is kept
    body = await request.body()  # already read by FastAPI: cached, not read again
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        document = await request.json()
    except ValueError:  # not JSON: validation answers it
        return
    if not _has_unpaired_surrogate(document):
        return
    for guard in _scope_guards(getattr(route, "dependant", None)):
        await guard(request)
    raise Unprocessable("The JSON body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")


def _scope_guards(dependant: Any) -> list[Any]:
    """The route's scope guards (marked by `required_scope`, see auth.dependencies.allow)."""
    guards, pending = [], [dependant] if dependant is not None else []
    while pending:
        current = pending.pop()
        for sub in current.dependencies:
            if getattr(sub.call, "required_scope", None) is not None:
                guards.append(sub.call)
            pending.append(sub)
    return guards


def install_error_handlers(app: FastAPI) -> None:
    """Domain errors and validation errors as `{"detail": ...}`; call before including routers (the unencodable
    text check is an app-wide dependency, which routers pick up when they are included)."""
    # FastAPI already answers HTTPException (404/405 included) as {"detail": ...}.
    app.add_exception_handler(HokusaiError, _hokusai_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.router.dependencies.append(Depends(refuse_unencodable_text))
