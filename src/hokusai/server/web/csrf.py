"""Cross-site request checks for cookie-authenticated requests (pure functions over the request).

A browser sends the session cookie with any request to this site, including ones a hostile page makes it send.
So a state-changing request that was authenticated by the cookie must be shown to come from our own pages:
`Sec-Fetch-Site` (every current browser) and `Origin` must not name another site, and our own form posts also
carry a CSRF token. The token needs no server secret: it is a hash of the session's random id, which only the
signed-in browser (HttpOnly cookie) and the server know. Header-key clients are not concerned: a page cannot make
a browser send an Authorization header to another site.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request

from hokusai.server.errors import PermissionDenied
from hokusai.server.web.browser import SESSION_COOKIE

CSRF_FORM_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CSRF_CONTEXT = b"hokusai-csrf:"


class CrossSiteRequest(PermissionDenied):
    def __init__(self, why: str) -> None:
        super().__init__(f"Cross-site request refused: {why}")


def session_token(request: Request) -> str | None:
    """The session id the browser sent in its cookie, if any."""
    return request.cookies.get(SESSION_COOKIE) or None


def csrf_token_for(token: str) -> str:
    return hashlib.sha256(_CSRF_CONTEXT + token.encode()).hexdigest()


def csrf_token(request: Request) -> str:
    """The CSRF token for forms on a page served to this browser ("" when it has no session cookie)."""
    token = session_token(request)
    return csrf_token_for(token) if token else ""


def own_origin(request: Request) -> str:
    """scheme://host of this service as the browser addressed it (the scheme is the proxy's, with proxy_headers)."""
    return f"{request.url.scheme}://{request.headers.get('host', '')}".lower()


def refuse_cross_site(request: Request, require_token: bool = True) -> None:
    """For a cookie-authenticated request: nothing for safe methods or same-origin writes, CrossSiteRequest (403)
    for a write another site made (by Sec-Fetch-Site, else Origin, else a missing CSRF header unless
    `require_token` is False: the sign-in form, which has no session yet)."""
    if request.method in SAFE_METHODS:
        return
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site.lower() not in ("same-origin", "none"):
        raise CrossSiteRequest(f"Sec-Fetch-Site is {fetch_site!r}")
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() != own_origin(request):
        raise CrossSiteRequest("the Origin is another site")
    if fetch_site is None and origin is None and require_token:
        # No browser metadata at all: only a request that carries the CSRF token is shown to be ours.
        token = session_token(request)
        presented = request.headers.get(CSRF_HEADER, "")
        if not token or not hmac.compare_digest(presented, csrf_token_for(token)):
            raise CrossSiteRequest("no Origin, no Sec-Fetch-Site and no CSRF token")


def check_form_token(request: Request, presented: str | None) -> None:
    """Our own form posts: the form's csrf_token must match the session's (when the caller came by cookie)."""
    token = session_token(request)
    if token is None:
        return
    if not presented or not hmac.compare_digest(presented, csrf_token_for(token)):
        raise CrossSiteRequest("the form's CSRF token does not match the session")
