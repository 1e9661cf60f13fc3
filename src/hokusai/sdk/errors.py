"""What the SDK raises: one class per kind of failure, each carrying the server's `detail` and request id."""

from __future__ import annotations

from typing import Any


class HokusaiError(Exception):
    """A request the server refused or could not serve (or a server that could not be reached)."""

    status_code: int | None = None

    def __init__(
        self, detail: str, status_code: int | None = None, request_id: str | None = None, body: Any = None
    ) -> None:
        super().__init__(f"{detail} (HTTP {status_code}, request {request_id})" if status_code else detail)
        self.detail = detail
        self.status_code = status_code if status_code is not None else type(self).status_code
        self.request_id = request_id
        self.body = body


class BadRequest(HokusaiError):
    status_code = 400


class AuthenticationError(HokusaiError):
    status_code = 401


class PermissionDenied(HokusaiError):
    status_code = 403


class NotFound(HokusaiError):
    status_code = 404


class Conflict(HokusaiError):
    status_code = 409


class ValidationError(HokusaiError):
    """422: `errors` holds the server's field errors (FastAPI's `loc`/`msg`/`type` entries) when it sent them."""

    status_code = 422

    @property
    def errors(self) -> list[dict[str, Any]]:
        detail = self.body.get("detail") if isinstance(self.body, dict) else None
        return detail if isinstance(detail, list) else []


class RateLimited(HokusaiError):
    status_code = 429

    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class UpstreamError(HokusaiError):
    """502/503/504: MLflow or the language model behind the service failed, or the service is unavailable."""


class ServerError(HokusaiError):
    """Any other 5xx."""


class ConnectionFailed(HokusaiError):
    """The service could not be reached at all."""


BY_STATUS: dict[int, type[HokusaiError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    422: ValidationError,
    429: RateLimited,
    502: UpstreamError,
    503: UpstreamError,
    504: UpstreamError,
}


def error_for(status_code: int) -> type[HokusaiError]:
    return BY_STATUS.get(status_code) or (ServerError if status_code >= 500 else HokusaiError)
