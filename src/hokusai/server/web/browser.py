"""What the server knows of browsers, with no dependency of its own (errors.py and the gate both use it)."""

from __future__ import annotations

from urllib.parse import quote

from starlette.requests import Request

SESSION_COOKIE = "hokusai_session"
LOGIN_PATH = "/login"
HOME_PATH = "/ui/"


def is_page_load(request: Request) -> bool:
    """A browser navigating to a page (not a script's fetch, a stylesheet or an API client): Sec-Fetch-Mode says
    so in every current browser; an HTML Accept header stands in for the others."""
    if request.method not in ("GET", "HEAD"):
        return False
    mode = request.headers.get("sec-fetch-mode")
    if mode is not None:
        return mode == "navigate"
    return "text/html" in request.headers.get("accept", "")


def login_location(request: Request) -> str:
    """/login?next=<this path and query>: where an unauthenticated page load is sent."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"{LOGIN_PATH}?next={quote(target, safe='/')}"


def local_path(candidate: str | None, default: str = HOME_PATH) -> str:
    """`candidate` when it is a path on this site, else `default`: a `next` never leads to another site
    (`//evil.example`, `/\\evil.example`, `https://...` are all refused)."""
    if (
        not candidate
        or not candidate.startswith("/")
        or candidate.startswith("//")
        or "\\" in candidate
        or any(ord(char) < 0x20 for char in candidate)
        or len(candidate) > 2000
    ):
        return default
    return candidate
