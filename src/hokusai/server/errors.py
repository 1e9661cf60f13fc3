"""The one place that turns exceptions into `{"detail": ...}` responses.

Domain code raises these classes and knows nothing of HTTP; each class carries the status it maps to.
Unexpected exceptions are caught by `RequestContextMiddleware`, logged with the request id and answered
with a bare 500.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request

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


class InvalidApiKey(AuthenticationError):
    """Unknown, malformed, revoked and expired keys all look the same from outside."""

    def __init__(self) -> None:
        super().__init__("Invalid or expired API key")


class PermissionDenied(HokusaiError):
    status_code = 403


class ServiceUnavailable(HokusaiError):
    status_code = 503


# The stock mlflow client reads `error_code` and `message` from an error body and shows nothing else, so errors
# on the gateway carry those too (beside `detail`): the client then says "UNAUTHENTICATED: API key required"
# rather than "INTERNAL_ERROR: Response: {...}".
MLFLOW_GATEWAY_PREFIXES = ("/mlflow/", "/api/mlflow/")
MLFLOW_ERROR_CODES = {
    400: "INVALID_PARAMETER_VALUE",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_DOES_NOT_EXIST",
    429: "REQUEST_LIMIT_EXCEEDED",
    502: "TEMPORARILY_UNAVAILABLE",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "TEMPORARILY_UNAVAILABLE",
}


def error_response_for(request: Request, exc: HokusaiError) -> JSONResponse:
    body: dict[str, object] = {"detail": exc.detail}
    if request.url.path.startswith(MLFLOW_GATEWAY_PREFIXES):
        body["error_code"] = MLFLOW_ERROR_CODES.get(exc.status_code, "INTERNAL_ERROR")
        body["message"] = exc.detail
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _hokusai_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HokusaiError)
    return error_response_for(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    # FastAPI already answers HTTPException (404/405 included) and validation errors as {"detail": ...}.
    app.add_exception_handler(HokusaiError, _hokusai_error_handler)
