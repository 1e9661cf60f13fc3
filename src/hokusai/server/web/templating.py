"""The Jinja2 templates and static assets of the browser pages (sign-in and dashboard), shipped in the package.

One environment for every page, so the sign-in page and the dashboard share `base.html`. Autoescaping is on for
every template: a model name, tag or address is text, never markup.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from starlette.templating import Jinja2Templates

WEB_DIR = Path(__file__).parent
TEMPLATES_DIR = WEB_DIR / "templates"
STATIC_DIR = WEB_DIR / "static"
STATIC_URL = "/ui/static"

environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
environment.globals["static_url"] = STATIC_URL
templates = Jinja2Templates(env=environment)

# The pages run no inline script and load nothing from elsewhere; nobody may frame them (clickjacking), and a page
# that shows a session's data is not kept by caches.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
