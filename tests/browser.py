"""Shared helpers of the browser tests: Debian's Chromium driven by Playwright, a network log, screenshots.

The browser is the system's (`apt-get install chromium`, see .ci/run; HOKUSAI_TEST_CHROMIUM names another binary):
Playwright never downloads one. Screenshots go to test-results/screenshots/ at the repository root, or to
$HOKUSAI_TEST_OUTPUT/screenshots/. Each test module starts its own browser (pytest-xdist runs a module whole on one
worker), through `launch_chromium()`:

    @pytest.fixture(scope="module")
    def browser() -> Iterator[Browser]:
        with launch_chromium() as launched:
            yield launched
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import Browser, BrowserContext, Page, Request, Response, sync_playwright

from tests.support import unavailable

CHROMIUM_VARIABLE = "HOKUSAI_TEST_CHROMIUM"
OUTPUT_VARIABLE = "HOKUSAI_TEST_OUTPUT"
REPOSITORY = Path(__file__).resolve().parents[1]
# The two widths every page is checked at: a laptop and a phone.
VIEWPORTS = {"1280": {"width": 1280, "height": 800}, "390": {"width": 390, "height": 844}}
DESKTOP_VIEWPORT = VIEWPORTS["1280"]
REFUSED_STATUSES = frozenset({401, 403})
OFF_MACHINE = re.compile(r"^(?!https?://(127\.0\.0\.1|localhost|\[::1\])[:/])[a-z]+://")


def chromium_executable() -> str:
    """The Chromium binary to drive: $HOKUSAI_TEST_CHROMIUM, else `chromium` on PATH. Missing: skip outside CI,
    fail under CI (where .ci/run installs it)."""
    named = os.environ.get(CHROMIUM_VARIABLE)
    found = shutil.which(named) if named else shutil.which("chromium")
    if found is None:
        unavailable(
            "Chromium",
            f"install it (Debian: apt-get install chromium; see .ci/run) or set {CHROMIUM_VARIABLE}",
            FileNotFoundError(named or "chromium"),
        )
    return found


@contextmanager
def launch_chromium() -> Iterator[Browser]:
    """A headless Chromium for the duration of the block (sync Playwright: one per test module)."""
    executable = chromium_executable()
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start.
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def output_directory() -> Path:
    """Where the browser tests write what a person looks at afterwards (screenshots)."""
    configured = os.environ.get(OUTPUT_VARIABLE)
    return Path(configured) if configured else REPOSITORY / "test-results"


def screenshot(page: Page, name: str) -> list[Path]:
    """PNGs of the page as it is now at both widths (`<name>-1280.png`, `<name>-390.png`); the viewport is put
    back afterwards. Returns the files written."""
    directory = output_directory() / "screenshots"
    directory.mkdir(parents=True, exist_ok=True)
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
    original = page.viewport_size
    written = []
    try:
        for width, viewport in VIEWPORTS.items():
            page.set_viewport_size(viewport)
            # Two animation frames: the layout for the new width has been computed and painted.
            page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
            path = directory / f"{safe_name}-{width}.png"
            page.screenshot(path=str(path))
            written.append(path)
    finally:
        if original is not None:
            page.set_viewport_size(original)
    return written


@dataclass(frozen=True)
class Exchange:
    """One request the browser made and the status it got back."""

    method: str
    url: str
    status: int
    request_body: str | None = None

    @property
    def path(self) -> str:
        return urlsplit(self.url).path

    def __str__(self) -> str:
        body = f" {self.request_body[:300]}" if self.request_body else ""
        return f"{self.method} {self.url} -> {self.status}{body}"


@dataclass
class NetworkLog:
    """Every response a browser context received (method, URL, status, request body), and requests that got none.

    Attach it before the first page load: `log = NetworkLog.of(context)`.
    """

    exchanges: list[Exchange] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # method, url, Chromium's error text

    @classmethod
    def of(cls, context: BrowserContext) -> NetworkLog:
        log = cls()
        context.on("response", log._record)
        context.on("requestfailed", log._record_failure)
        return log

    def _record(self, response: Response) -> None:
        request = response.request
        self.exchanges.append(Exchange(request.method, response.url, response.status, _body_text(request)))

    def _record_failure(self, request: Request) -> None:
        self.failed.append((request.method, request.url, request.failure or ""))

    def refused(self) -> list[Exchange]:
        """The exchanges answered 401 or 403."""
        return [exchange for exchange in self.exchanges if exchange.status in REFUSED_STATUSES]

    def matching(self, method: str, path_pattern: str) -> list[Exchange]:
        """The exchanges of `method` whose URL path matches the regular expression `path_pattern` (searched)."""
        pattern = re.compile(path_pattern)
        return [e for e in self.exchanges if e.method == method and pattern.search(e.path)]

    def clear(self) -> None:
        self.exchanges.clear()
        self.failed.clear()

    def describe(self, exchanges: list[Exchange] | None = None) -> str:
        """One line per exchange, for assertion messages."""
        shown = self.exchanges if exchanges is None else exchanges
        return "\n".join(str(exchange) for exchange in shown) or "(none)"


def _body_text(request: Request) -> str | None:
    try:
        return request.post_data
    except UnicodeDecodeError:  # a binary upload: its shape is not what the log is for
        return "<binary>"


def keep_offline(context: BrowserContext) -> None:
    """Refuse every request that leaves the loopback interface: the pages must work with no network (MLflow's UI
    links a video on mlflow.org), and a test must not depend on one. (Routing turns Chromium's HTTP cache off for
    the context: fine for tests, not for timing warm loads.)"""
    context.route(OFF_MACHINE, lambda route: route.abort("internetdisconnected"))
