"""MLflow's own web UI in a real browser (Debian's Chromium), through the gateway at <service>/mlflow/.

A run is logged first by the stock mlflow client through the gateway; then the UI's experiments list and that run's
page are loaded with a read key, the UI's write (adding a run tag) is tried with a read key and a write key, and
the same pages are loaded straight from the MLflow server to compare. The browser signs in with the key on the
service's login page first, as a person does; its session cookie then carries the key's scope.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.browser import DESKTOP_VIEWPORT, NetworkLog, keep_offline, launch_chromium, screenshot
from tests.support import MlflowServer, Service, through_the_gateway

WORKFLOW = Path(__file__).with_name("mlflow_workflow.py")
RUN_NAME = "gateway-e2e"  # the run tests/mlflow_workflow.py logs
# Long enough for a page of the UI on a loaded CI machine; a bound against hanging, not a timing assertion.
RENDER_PATIENCE_MS = 60_000
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class LoggedRun:
    experiment_name: str
    experiment_id: str
    run_id: str
    metrics: dict[str, float]
    params: dict[str, str]
    printed_run_url: str  # the "View run ... at: <url>" line the client printed


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launch_chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def logged_run(service: Service, keys: dict[str, str]) -> LoggedRun:
    """One run, logged by the stock mlflow client through the gateway with a write key (params, metrics, tags,
    artifacts, a registered model)."""
    name = f"browser-mlflow-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [sys.executable, str(WORKFLOW), name],
        env=through_the_gateway(service, keys["write"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    printed = [line.split(" at: ", 1)[1] for line in result.stdout.splitlines() if line.startswith("🏃 View run ")]
    assert printed, result.stdout[-3000:]
    with service.client(keys["read"]) as reader:
        found = reader.get("/mlflow/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
    assert found.status_code == 200, found.text
    experiment_id = found.json()["experiment"]["experiment_id"]
    return LoggedRun(name, experiment_id, seen["run_id"], seen["metrics"], seen["params"], printed[0])


def open_context(
    browser: Browser, key: str | None, service_url: str | None = None
) -> tuple[BrowserContext, Page, NetworkLog]:
    """A fresh browser context (no cache, no cookies), offline beyond loopback, with its network log; with `key`, it
    is first signed in to the service at `service_url` with that key (the session cookie then rides along)."""
    context = browser.new_context(viewport=DESKTOP_VIEWPORT)
    context.set_default_timeout(RENDER_PATIENCE_MS)
    keep_offline(context)
    log = NetworkLog.of(context)
    page = context.new_page()
    if key is not None and service_url is not None:
        page.goto(f"{service_url}/login")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{service_url}/ui/")
        log.clear()
    return context, page, log


def settle(page: Page, log: NetworkLog, quiet_ms: int = 1500) -> None:
    """Wait until no response has arrived for `quiet_ms`, so the log holds the calls a page makes after its first
    content too. (Playwright's "networkidle" never comes on MLflow's UI, hence judged from the responses; the
    count bounds the wait against a page that never goes quiet.)"""
    for _ in range(40):
        seen = len(log.exchanges)
        page.wait_for_timeout(quiet_ms)
        if len(log.exchanges) == seen:
            return


def ui_calls(log: NetworkLog, prefix: str) -> list[tuple[str, str, int]]:
    """The UI's API calls (method, path below `prefix`, status): ajax-api and GraphQL, not its static files."""
    calls = []
    for exchange in log.exchanges:
        path = exchange.path.removeprefix(prefix)
        if path.startswith(("/ajax-api/", "/graphql")):
            calls.append((exchange.method, path, exchange.status))
    return calls


def show_experiments(page: Page, base: str, run: LoggedRun) -> None:
    page.goto(f"{base}/#/experiments")
    expect(page.get_by_role("link", name=run.experiment_name)).to_be_visible(timeout=RENDER_PATIENCE_MS)


def run_page_url(base: str, run: LoggedRun) -> str:
    return f"{base}/#/experiments/{run.experiment_id}/runs/{run.run_id}"


def show_run(page: Page, base: str, run: LoggedRun) -> None:
    page.goto(run_page_url(base, run))
    expect(page.get_by_role("heading", name=RUN_NAME)).to_be_visible(timeout=RENDER_PATIENCE_MS)
    # The overview's metric and parameter tables: the values the client logged.
    for metric, value in run.metrics.items():
        expect(page.get_by_role("row", name=f"{metric} {value:g}").first).to_be_visible(timeout=RENDER_PATIENCE_MS)
    for param, value in run.params.items():
        expect(page.get_by_role("row", name=f"{param} {value}").first).to_be_visible(timeout=RENDER_PATIENCE_MS)


def refused_message(log: NetworkLog) -> str:
    return f"calls refused with a read key:\n{log.describe(log.refused())}"


def test_experiments_list_through_the_gateway_with_a_read_key(
    browser: Browser, service: Service, keys: dict[str, str], logged_run: LoggedRun
) -> None:
    context, page, log = open_context(browser, keys["read"], service.base_url)
    try:
        show_experiments(page, f"{service.base_url}/mlflow", logged_run)
        settle(page, log)
        screenshot(page, "mlflow-experiments-gateway")
        searches = log.matching("GET", r"^/mlflow/ajax-api/2\.0/mlflow/experiments/search$")
        assert searches and all(exchange.status == 200 for exchange in searches), log.describe()
        assert not log.refused(), refused_message(log)
    finally:
        context.close()


def test_run_page_through_the_gateway_with_a_read_key(
    browser: Browser, service: Service, keys: dict[str, str], logged_run: LoggedRun
) -> None:
    # The link the stock client printed for the run is the run page through the gateway.
    assert logged_run.printed_run_url == run_page_url(f"{service.base_url}/mlflow", logged_run)
    context, page, log = open_context(browser, keys["read"], service.base_url)
    try:
        show_run(page, f"{service.base_url}/mlflow", logged_run)
        settle(page, log)
        screenshot(page, "mlflow-run-gateway")
        # The run page reads through GraphQL (a POST): a query is a read, answered for a read key.
        graphql = log.matching("POST", r"^/mlflow/graphql$")
        assert graphql, log.describe()
        assert all(exchange.status == 200 for exchange in graphql), log.describe(graphql)
        assert any('"operationName":"GetRun"' in (exchange.request_body or "") for exchange in graphql)
        assert not log.refused(), refused_message(log)
    finally:
        context.close()


def tour_pages(run: LoggedRun) -> list[tuple[str, str]]:
    """(page, text it shows once its data is in) for the rest of the UI a reader browses: runs table and charts,
    comparison, artifacts, metric charts, traces, evaluation, datasets, judges, models, prompts, AI gateway."""
    runs = quote(json.dumps([run.run_id]))
    experiments = quote(json.dumps([run.experiment_id]))
    experiment = f"#/experiments/{run.experiment_id}"
    return [
        ("#/", run.experiment_name),
        (f"{experiment}/runs", RUN_NAME),
        (f"{experiment}/runs?compareRunsMode=CHART", "accuracy"),
        (f"#/compare-runs?runs={runs}&experiments={experiments}", RUN_NAME),
        (f"{experiment}/runs/{run.run_id}/artifacts/docs/notes.txt", "artifact through the gateway"),
        (f"{experiment}/runs/{run.run_id}/model-metrics", "accuracy"),
        (f"{experiment}/runs/{run.run_id}/traces", "Traces"),
        (f"{experiment}/traces", "Traces"),
        (f"{experiment}/evaluation-runs", "Evaluation"),
        (f"{experiment}/datasets", "Datasets"),
        (f"{experiment}/judges", "Judges"),
        ("#/models", run.experiment_name),
        (f"#/models/{run.experiment_name}/versions/1", "Staging"),
        ("#/prompts", "Prompts"),
        ("#/gateway", "AI Gateway"),
    ]


# The AI Gateway page asks whether MLflow's secret store is set up (and whether it still uses the default passphrase):
# server-wide configuration, kept for admin keys; a reader's page then offers to set the gateway up.
ADMIN_ONLY_READS = frozenset({"/mlflow/ajax-api/3.0/mlflow/gateway/secrets/config"})


def test_every_page_a_reader_browses_makes_no_refused_call(
    browser: Browser, service: Service, keys: dict[str, str], logged_run: LoggedRun
) -> None:
    """The read key's tour of the UI: whatever a page asks for to show data is a read, and is answered."""
    context, page, log = open_context(browser, keys["read"], service.base_url)
    refused_by_page = {}
    try:
        for fragment, shown in tour_pages(logged_run):
            log.clear()
            page.goto(f"{service.base_url}/mlflow/{fragment}")
            try:
                expect(page.get_by_text(shown).first).to_be_visible(timeout=RENDER_PATIENCE_MS)
            except AssertionError as error:
                screenshot(page, f"mlflow-unrendered-{fragment.removeprefix('#/') or 'home'}")
                raise AssertionError(f"{fragment} did not show {shown!r}; refused: {log.refused()}") from error
            settle(page, log, quiet_ms=1000)
            refused = [exchange for exchange in log.refused() if exchange.path not in ADMIN_ONLY_READS]
            if refused:
                refused_by_page[fragment] = log.describe(refused)
                screenshot(page, f"mlflow-refused-{fragment.removeprefix('#/') or 'home'}")
    finally:
        context.close()
    assert not refused_by_page, "\n".join(f"{page}:\n{calls}" for page, calls in refused_by_page.items())


def add_run_tag_in_the_ui(page: Page, key: str, value: str) -> int:
    """Adds a run tag through the run page's "Edit tags" dialog; returns the status of the UI's set-tag call."""
    page.get_by_role("button", name="Edit tags").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("combobox").fill(key)
    dialog.get_by_role("combobox").press("Enter")
    dialog.get_by_label("Value").fill(value)
    dialog.get_by_role("button", name="Add tag").click()
    with page.expect_response(lambda response: response.url.endswith("/runs/set-tag")) as answered:
        dialog.get_by_role("button", name="Save tags").click()
    return answered.value.status


def run_tags(mlflow_server: MlflowServer, run_id: str) -> dict[str, str]:
    answer = httpx.get(f"{mlflow_server.url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=30)
    return {tag["key"]: tag["value"] for tag in answer.json()["run"]["data"].get("tags", [])}


def test_a_write_from_the_ui_with_a_read_key_is_refused(
    browser: Browser, service: Service, keys: dict[str, str], logged_run: LoggedRun, mlflow_server: MlflowServer
) -> None:
    context, page, log = open_context(browser, keys["read"], service.base_url)
    try:
        show_run(page, f"{service.base_url}/mlflow", logged_run)
        assert add_run_tag_in_the_ui(page, "reviewed-by", "a-reader") == 403
        # The UI shows the gateway's reason (its MLflow-shaped `message`) in the dialog.
        expect(page.get_by_role("dialog").get_by_text("lacks the 'write' scope")).to_be_visible()
        screenshot(page, "mlflow-run-write-refused")
        # Any write the page's own code could send is refused the same way (a fetch from the page, with the key).
        answer = page.evaluate(
            """async ([url, runId]) => {
                const response = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                    body: JSON.stringify({experiment_id: runId, key: "renamed", value: "by-a-reader"})});
                return {status: response.status, body: await response.json()};
            }""",
            [f"{service.base_url}/mlflow/ajax-api/2.0/mlflow/experiments/set-experiment-tag", logged_run.experiment_id],
        )
        assert answer["status"] == 403 and "write" in answer["body"]["detail"], answer
        set_tags = log.matching("POST", r"/runs/set-tag$")
        assert [exchange.status for exchange in set_tags] == [403], log.describe(set_tags)
        assert '"key":"reviewed-by"' in (set_tags[0].request_body or "")
    finally:
        context.close()
    assert "reviewed-by" not in run_tags(mlflow_server, logged_run.run_id)


def test_the_same_write_from_the_ui_with_a_write_key_goes_through(
    browser: Browser, service: Service, keys: dict[str, str], logged_run: LoggedRun, mlflow_server: MlflowServer
) -> None:
    context, page, _ = open_context(browser, keys["write"], service.base_url)
    try:
        show_run(page, f"{service.base_url}/mlflow", logged_run)
        assert add_run_tag_in_the_ui(page, "reviewed-by", "a-writer") == 200
    finally:
        context.close()
    assert run_tags(mlflow_server, logged_run.run_id)["reviewed-by"] == "a-writer"


def test_direct_mlflow_renders_the_same_experiment_and_run(
    browser: Browser, service: Service, keys: dict[str, str], logged_run: LoggedRun, mlflow_server: MlflowServer
) -> None:
    """The same pages straight from MLflow show the same run, and the UI makes the same calls with the same
    answers through the gateway (with a read key) as directly."""
    calls = {}
    for way, base, key in (
        ("direct", mlflow_server.url, None),
        ("gateway", f"{service.base_url}/mlflow", keys["read"]),
    ):
        context, page, log = open_context(browser, key, service.base_url if key else None)
        try:
            show_experiments(page, base, logged_run)
            show_run(page, base, logged_run)
            settle(page, log)
            screenshot(page, f"mlflow-run-{way}")
            calls[way] = ui_calls(log, "/mlflow" if way == "gateway" else "")
        finally:
            context.close()
    # Same calls, same statuses (order aside: the UI fires several at once).
    assert sorted(set(calls["gateway"])) == sorted(set(calls["direct"]))
