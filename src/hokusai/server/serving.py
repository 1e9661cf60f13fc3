"""How `hokusai serve` runs the app under uvicorn: one place, so the in-process test services run it the same way."""

from __future__ import annotations

import uvicorn

from hokusai.server.app import create_app
from hokusai.server.config import Settings
from hokusai.server.http_protocol import header_timeout_protocol


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    """The app for `settings` on its host and port, with our httptools protocol (header timeout, lingering close).

    uvicorn's own logging and access log are off: ours (logs.py) redacts keys and escapes control characters, and
    uvicorn's access log would print query strings (a `?api_key=`)."""
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http=header_timeout_protocol(settings.header_timeout),
        limit_concurrency=settings.max_connections,
        log_config=None,
        access_log=False,
        proxy_headers=False,
    )
