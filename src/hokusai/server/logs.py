"""Logging with the request id on every line, and nothing secret in any of them."""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

# Anything shaped like one of our keys is masked, whatever logger or library produced the line.
_KEY_SHAPE = re.compile(r"hk_(live|test)_[0-9A-Za-z]{4,}")
_QUERY_KEY = re.compile(r"(api(?:_|%5f)key=)[^&\s\"']*", re.IGNORECASE)
# A one-time sign-in link is a credential until it is used (`hokusai ui`): its token is not logged either.
_LOGIN_LINK = re.compile(r"(/login/link/)[^/?\s\"']+")

# Control characters (C0 but tab and newline, DEL, C1) and Unicode line breaks are written as escapes, and every line
# after a record's first (a traceback, a multi-line message) is indented: a line at column 0 always starts a record,
# whatever a message holds. A request path such as /models/x%0d%0aFORGED cannot forge a line of its own.
_CONTROLS = [code for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029) if code not in (0x09, 0x0A)]
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _CONTROLS}
CONTINUATION_INDENT = "    "


def redact(text: str) -> str:
    text = _QUERY_KEY.sub(r"\1[REDACTED]", _KEY_SHAPE.sub(r"hk_\1_[REDACTED]", text))
    return _LOGIN_LINK.sub(r"\1[REDACTED]", text)


def single_line(text: str) -> str:
    """Control characters as escapes, newlines included: for values that belong on one line (a request path)."""
    return text.translate(_CONTROL_ESCAPES).replace("\n", "\\x0a")


def escape_for_log(text: str) -> str:
    """A formatted record: control characters escaped, continuation lines indented."""
    return text.translate(_CONTROL_ESCAPES).replace("\n", "\n" + CONTINUATION_INDENT)


class RequestContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class RedactingFormatter(logging.Formatter):
    """Masks keys, and keeps a line at column 0 for the start of a record, whatever a message holds."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(escape_for_log(super().format(record)))


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
