"""Logging with the request id on every line, and nothing secret in any of them."""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

# Anything shaped like one of our keys is masked, whatever logger or library produced the line.
_KEY_SHAPE = re.compile(r"hk_(live|test)_[0-9A-Za-z]{4,}")
_QUERY_KEY = re.compile(r"(api_key=)[^&\s\"']*", re.IGNORECASE)


def redact(text: str) -> str:
    return _QUERY_KEY.sub(r"\1[REDACTED]", _KEY_SHAPE.sub(r"hk_\1_[REDACTED]", text))


class RequestContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # uvicorn's access log prints raw query strings; our middleware logs requests instead.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every upstream URL at INFO; keep it for debugging only.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))
