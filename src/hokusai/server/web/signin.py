"""Sign-in with a key: the login page, sessions (cookie), sign-out and one-time login links (`hokusai ui`).

The cookie holds an opaque random id (auth/sessions.py); it is HttpOnly, SameSite=Lax, Path=/, and Secure when
the browser reached us over HTTPS (through a proxy with proxy_headers) or in production.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from hokusai.server.auth.caller import Caller as CallerRecord
from hokusai.server.auth.dependencies import get_gate
from hokusai.server.auth.gate import Gate
from hokusai.server.auth.identity import client_address
from hokusai.server.auth.sessions import BrowserSessions, LoginLinkInvalid, NewSession
from hokusai.server.deps import AppSettings, Caller
from hokusai.server.errors import InvalidApiKey
from hokusai.server.ratelimit.service import RateLimited
from hokusai.server.web.browser import LOGIN_PATH, SESSION_COOKIE, local_path
from hokusai.server.web.csrf import check_form_token, refuse_cross_site, session_token
from hokusai.server.web.templating import PAGE_HEADERS, templates

router = APIRouter(tags=["sign-in"])


def get_sessions(request: Request) -> BrowserSessions:
    return request.app.state.sessions


Sessions = Annotated[BrowserSessions, Depends(get_sessions)]
KeyGate = Annotated[Gate, Depends(get_gate)]


class LoginLinkRequest(BaseModel):
    next: str = Field("/ui/", max_length=2000, description="Where the browser goes once signed in (a local path)")


class LoginLinkResponse(BaseModel):
    url: str = Field(description="Open it in a browser within a minute; it works once")
    expires_at: datetime


def login_page(request: Request, next_path: str, error: str | None = None, status_code: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        "login.html",
        {"next": next_path, "error": error},
        status_code=status_code,
        headers=PAGE_HEADERS,
    )


def signed_in(request: Request, opened: NewSession, settings_environment: str, next_path: str) -> Response:
    """303 to `next_path`, with the session cookie set."""
    response = RedirectResponse(next_path, status_code=303, headers={"Cache-Control": "no-store"})
    max_age = max(0, int((opened.expires_at - datetime.now(UTC)).total_seconds()))
    response.set_cookie(
        SESSION_COOKIE,
        opened.token,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="lax",
        secure=request.scope.get("scheme") == "https" or settings_environment == "production",
    )
    return response


@router.get(LOGIN_PATH, response_class=HTMLResponse, include_in_schema=False)
async def show_login(request: Request, next: str | None = None) -> HTMLResponse:
    return login_page(request, local_path(next))


@router.post(LOGIN_PATH, include_in_schema=False)
async def sign_in(
    request: Request,
    settings: AppSettings,
    sessions: Sessions,
    gate: KeyGate,
    api_key: Annotated[str, Form(max_length=512)] = "",
    next: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """Check the key and open a session. Another site cannot sign a visitor in (to a key of its choosing). A
    sign-in counts against the key's budget like any request: a key cannot make sessions without bound."""
    refuse_cross_site(request, require_token=False)
    next_path = local_path(next)
    if not api_key.strip():
        return login_page(request, next_path, "Enter an API key.", status_code=400)
    address = client_address(request)
    try:
        key = await gate.identifier.check_key(api_key.strip(), address)
        await gate.throttle.count(request, CallerRecord.of_key(key, address))
    except InvalidApiKey:
        return login_page(request, next_path, "That API key is not valid (unknown, revoked or expired).", 401)
    except RateLimited as exc:
        page = login_page(request, next_path, "Too many sign-in attempts or requests: try again later.", 429)
        page.headers.update(exc.headers or {})
        return page
    if (previous := session_token(request)) is not None:
        await sessions.close(previous)  # signing in again (perhaps with another key) ends the old session
    opened = await sessions.open(key, address)
    return signed_in(request, opened, settings.environment, next_path)


@router.post("/logout", include_in_schema=False)
async def sign_out(
    request: Request, sessions: Sessions, csrf_token: Annotated[str | None, Form(max_length=200)] = None
) -> Response:
    token = session_token(request)
    if token is not None:
        check_form_token(request, csrf_token)
        await sessions.close(token)
    response = RedirectResponse(LOGIN_PATH, status_code=303, headers={"Cache-Control": "no-store"})
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.post("/login/links", status_code=201, response_model=LoginLinkResponse)
async def mint_login_link(
    request: Request, caller: Caller, sessions: Sessions, body: LoginLinkRequest | None = None
) -> LoginLinkResponse:
    """A one-time link that signs a browser in with the calling key (what `hokusai ui` opens): single use,
    valid for 60 seconds."""
    next_path = local_path((body or LoginLinkRequest()).next)
    link = await sessions.mint_link(caller.id, next_path)
    url = str(request.url_for("redeem_login_link", token=link.token))
    return LoginLinkResponse(url=url, expires_at=link.expires_at)


@router.get("/login/link/{token}", name="redeem_login_link", include_in_schema=False)
async def redeem_login_link(request: Request, token: str, settings: AppSettings, sessions: Sessions) -> Response:
    try:
        opened = await sessions.redeem_link(token, client_address(request))
    except LoginLinkInvalid as exc:
        return login_page(request, "/ui/", f"{exc.detail}: sign in with your key, or run `hokusai ui` again.", 401)
    return signed_in(request, opened, settings.environment, local_path(opened.next_path))
