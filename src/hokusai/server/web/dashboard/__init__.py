"""The Hokusai dashboard: server-rendered pages under /ui/, assets under /ui/static/ (shipped in the package)."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from hokusai.server.web.dashboard.router import router
from hokusai.server.web.templating import STATIC_DIR, STATIC_URL


def install_dashboard(app: FastAPI) -> None:
    """The /ui/ pages and the public /ui/static/ assets (the sign-in page uses them too). Call after
    `install_error_handlers` (the app-wide dependency it adds reaches only routers included afterwards)."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="ui-static")
    app.include_router(router)
