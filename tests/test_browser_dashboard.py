"""Signing in, the MLflow UI with a session, and the Hokusai dashboard in a real browser (Debian's Chromium).

The data is the analytics scenario's: two trained versions of one model, the second contributed by an address.
Every number a page is checked for comes from that scenario or from the service's JSON API. Screenshots of each
page at 1280 and 390 px wide go to test-results/screenshots/ (tests/browser.py).
"""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.browser import DESKTOP_VIEWPORT, NetworkLog, keep_offline, launch_chromium, screenshot
from tests.support import (
    Service,
    benchmark_metadata,
    free_loopback_port,
    run_analytics_scenario,
    run_cli,
    service_environment,
)

MODEL = "browser-dashboard"
CONTRIBUTOR = "0x" + "b40e5e12" * 5
PATIENCE_MS = 60_000  # a bound against hanging on a loaded machine, not a timing assertion
pytestmark = pytest.mark.slow
# Assertions wait as long as actions do (Playwright's own default for `expect` is 5 s: too short for a loaded CI).
expect.set_options(timeout=PATIENCE_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launch_chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def scenario(service: Service, keys: dict[str, str], writer) -> dict:
    """Two versions of MODEL (v2 better, contributed by CONTRIBUTOR), registered through /models/register."""
    logged = run_analytics_scenario(service, keys["write"], MODEL)
    for index, version in enumerate(logged["versions"]):
        body = {
            "model_data": version["model_uri"],
            "model_type": "classifier",
            "model_name": MODEL,
            "metadata": benchmark_metadata(version, CONTRIBUTOR if index else None),
        }
        answer = writer.post("/models/register", json=body)
        assert answer.status_code == 201, answer.text
    return logged


def new_context(browser: Browser, service: Service) -> tuple[BrowserContext, Page, NetworkLog]:
    context = browser.new_context(viewport=DESKTOP_VIEWPORT, base_url=service.base_url)
    context.set_default_timeout(PATIENCE_MS)
    keep_offline(context)
    log = NetworkLog.of(context)
    return context, context.new_page(), log


def sign_in(page: Page, key: str, path: str = "/ui/") -> None:
    """Load `path` signed out: the service sends the browser to the sign-in page; the key is typed there."""
    page.goto(path)
    expect(page).to_have_url(re.compile(r"^[^?#]*/login\?"))
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: urlsplit(url).path != "/login")


def show(page: Page, name: str) -> None:
    """Screenshots at both widths, and the page fits a 390 px phone: only wide tables scroll, inside their frame."""
    screenshot(page, name)
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        overflow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{name}: the page is {overflow} px wider than a 390 px screen"
    finally:
        page.set_viewport_size(DESKTOP_VIEWPORT)


def assert_nothing_refused(log: NetworkLog) -> None:
    assert not log.refused(), log.describe(log.refused())


def test_the_dashboard_pages_render_real_data_for_a_signed_in_read_key(browser, service, keys, reader, scenario):
    context, page, log = new_context(browser, service)
    try:
        page.goto("/login")
        show(page, "ui-login")
        sign_in(page, keys["read"])
        show(page, "ui-models")
        page.keyboard.press("Tab")  # the first stop of the keyboard is the skip link to the content
        assert page.evaluate("() => document.activeElement.getAttribute('href')") == "#main"
        expect(page.locator(f'tr[data-model="{MODEL}"]')).to_be_visible()
        expect(page.locator("p.signed-in")).to_contain_text("read")

        page.goto(f"/ui/models/{MODEL}")
        points = page.locator("#improvement-chart g[data-version]")
        expect(points).to_have_count(2)
        plotted = {
            points.nth(i).get_attribute("data-version"): points.nth(i).get_attribute("data-value") for i in (0, 1)
        }
        for number, version in zip(("1", "2"), scenario["versions"], strict=True):
            assert float(plotted[number]) == pytest.approx(version["metrics"]["val_accuracy"])
        expect(page.get_by_role("button", name="Move")).to_have_count(0)  # a read key gets no actions
        show(page, "ui-model")

        page.goto(f"/ui/models/{MODEL}/compare?a=1&b=2")
        expect(page.locator("table").first).to_contain_text("val_accuracy")
        show(page, "ui-compare")

        page.goto("/ui/contributors?limit=200")
        rows = page.locator("#leaderboard-table tbody tr")
        shown = [rows.nth(i).get_attribute("data-address") for i in range(rows.count())]
        ranked = reader.get("/models/contributors", params={"limit": 200}).json()["contributors"]
        assert shown == [entry["address"] for entry in ranked]
        ours = page.locator(f'#leaderboard-table tr[data-address="{ranked_address(ranked)}"]')
        impact = reader.get(f"/models/contributors/{CONTRIBUTOR}/impact").json()
        assert float(ours.get_attribute("data-score")) == pytest.approx(impact["total_improvement_score"])
        show(page, "ui-contributors")

        ours.get_by_role("link").first.click()
        expect(page.locator("h1")).to_contain_text(impact["address"])
        show(page, "ui-contributor")

        for path, name in (("/ui/dspy", "ui-dspy"), ("/ui/health", "ui-health")):
            page.goto(path)
            expect(page.locator("main h1")).to_be_visible()
            show(page, name)
        assert_nothing_refused(log)
    finally:
        context.close()


def ranked_address(ranked: list[dict]) -> str:
    return next(entry["address"] for entry in ranked if entry["address"].lower() == CONTRIBUTOR)


def test_a_printed_run_link_signs_in_and_lands_on_the_run_with_a_read_key(browser, service, keys, reader, scenario):
    """What the stock client prints after a run (`<tracking URI>/#/experiments/<id>/runs/<id>`), opened signed out."""
    run = scenario["versions"][1]
    found = reader.get("/mlflow/api/2.0/mlflow/runs/get", params={"run_id": run["run_id"]})
    run_name = found.json()["run"]["info"]["run_name"]
    link = f"/mlflow/#/experiments/{scenario['experiment_id']}/runs/{run['run_id']}"
    context, page, log = new_context(browser, service)
    try:
        sign_in(page, keys["read"], link)
        assert page.url.endswith(link)
        expect(page.get_by_role("heading", name=run_name)).to_be_visible()
        expect(page.get_by_role("row", name=re.compile(r"^val_accuracy ")).first).to_be_visible()
        screenshot(page, "mlflow-run-session")
        page.goto("/mlflow/#/experiments")
        expect(page.get_by_role("link", name=MODEL)).to_be_visible()
        screenshot(page, "mlflow-experiments-session")
        assert_nothing_refused(log)
        # A write the UI would make, from the page itself (same origin, the session's cookie): the read key lacks it.
        status = page.evaluate(
            """async (runId) => (await fetch("/mlflow/ajax-api/2.0/mlflow/runs/set-tag", {
                method: "POST", headers: {"Content-Type": "application/json"},
                body: JSON.stringify({run_id: runId, key: "from-the-ui", value: "x"})})).status""",
            run["run_id"],
        )
        assert status == 403
    finally:
        context.close()


def test_a_write_key_promotes_from_the_dashboard_with_its_session(browser, service, keys, reader, scenario):
    context, page, _ = new_context(browser, service)
    try:
        sign_in(page, keys["write"], f"/ui/models/{MODEL}")
        form = page.locator("#tag-form")
        form.get_by_label("Version").select_option("2")
        form.get_by_label("Tag").fill("reviewed-in")
        form.get_by_label("Value").fill("browser")
        form.get_by_role("button", name="Set tag").click()
        expect(page.locator("p.notice-ok")).to_be_visible()
        tags = reader.get(f"/models/{MODEL}/2").json().get("tags", {})
        assert tags.get("reviewed-in") == "browser", tags
    finally:
        context.close()


def test_sign_out_ends_the_session(browser, service, keys, scenario):
    context, page, _ = new_context(browser, service)
    try:
        sign_in(page, keys["read"])
        session = next(cookie for cookie in context.cookies() if cookie["name"] == "hokusai_session")
        assert session["httpOnly"] and session["sameSite"] == "Lax"
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(lambda url: urlsplit(url).path == "/login")
        screenshot(page, "ui-signed-out")
        page.goto("/ui/")
        assert urlsplit(page.url).path == "/login"
    finally:
        context.close()
    with httpx.Client(base_url=service.base_url, cookies={"hokusai_session": session["value"]}) as stale:
        assert stale.get("/ui/", headers={"Accept": "text/html"}).status_code == 303


def test_a_revoked_keys_session_stops_working(browser, service, scenario):
    with service.client(service.admin_key) as admin:
        created = admin.post("/api/v1/keys", json={"name": "browser revoked", "scopes": ["read"]}).json()
    context, page, _ = new_context(browser, service)
    try:
        sign_in(page, created["key"])
        expect(page.locator("p.signed-in")).to_contain_text("browser revoked")
        with service.client(service.admin_key) as admin:
            assert admin.delete(f"/api/v1/keys/{created['id']}").status_code in (200, 204)
        for _ in range(60):  # the service trusts a read session for HOKUSAI_AUTH_CACHE_TTL (1 s here)
            page.goto("/ui/")
            if urlsplit(page.url).path == "/login":
                break
            page.wait_for_timeout(500)
        assert urlsplit(page.url).path == "/login"
    finally:
        context.close()


class _HostilePage(http.server.BaseHTTPRequestHandler):
    """Another origin on the same machine (same site: the Lax cookie goes along) that posts a form to the service."""

    target = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = (
            f'<form id="f" method="post" action="{self.target}"><input name="version" value="1">'
            '<input name="key" value="planted"><input name="value" value="by-another-site"></form>'
            "<script>document.getElementById('f').submit()</script>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_cross_site_post_with_the_cookie_is_refused(browser, service, keys, reader, scenario):
    port = free_loopback_port()
    handler = type("Hostile", (_HostilePage,), {"target": f"{service.base_url}/ui/models/{MODEL}/tags"})
    hostile = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    context, page, log = new_context(browser, service)
    try:
        sign_in(page, keys["write"])
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_url(lambda url: urlsplit(url).port == urlsplit(service.base_url).port)
        posted = log.matching("POST", f"^/ui/models/{MODEL}/tags$")
        assert [exchange.status for exchange in posted] == [403], log.describe()
        expect(page.locator("body")).to_contain_text("Cross-site request refused")
        tags = reader.get(f"/models/{MODEL}/1").json().get("tags", {})
        assert "planted" not in tags
    finally:
        context.close()
        hostile.shutdown()


def test_the_link_of_hokusai_ui_signs_in_once(browser, service, keys, scenario):
    env = service_environment(HOME=str(service.home))
    done = run_cli("ui", "--no-open", "--url", service.base_url, "--api-key", keys["read"], env=env)
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip().splitlines()[-1]
    context, page, _ = new_context(browser, service)
    try:
        page.goto(link)
        assert urlsplit(page.url).path == "/ui/"
        expect(page.locator("p.signed-in")).to_be_visible()
    finally:
        context.close()
    context, page, _ = new_context(browser, service)
    try:
        page.goto(link)
        assert urlsplit(page.url).path == f"/login/link/{link.rsplit('/', 1)[1]}"
        expect(page.get_by_role("alert")).to_contain_text("already used")
        screenshot(page, "ui-login-link-used")
    finally:
        context.close()
