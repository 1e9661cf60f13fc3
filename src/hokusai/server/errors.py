"""The one place that turns exceptions into `{"detail": ...}` responses.

Domain code raises these classes and knows nothing of HTTP; each class carries the status it maps to.
Unexpected exceptions are caught by `RequestContextMiddleware`, logged with the request id and answered
with a bare 500.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

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


def error_response(status_code: int, detail: object, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


async def _hokusai_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HokusaiError)
    return error_response(exc.status_code, exc.detail, exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    # FastAPI already answers HTTPException (404/405 included) and validation errors as {"detail": ...}.
    app.add_exception_handler(HokusaiError, _hokusai_error_handler)
