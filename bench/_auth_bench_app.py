"""The service app plus two trivial routes, identical but for authentication and rate limiting.

Served by bench/auth_overhead.py with `uvicorn --factory _auth_bench_app:create`; configured by HOKUSAI_* variables.
"""

from fastapi import Depends

from hokusai.server.app import create_app
from hokusai.server.auth.dependencies import allow


def create():
    app = create_app(announce_admin_key=lambda key, path: None)

    @app.get("/bench/open")
    async def open_route() -> dict:
        return {"ok": True}

    @app.get("/bench/guarded", dependencies=[Depends(allow("models:read"))])
    async def guarded_route() -> dict:
        return {"ok": True}

    return app
