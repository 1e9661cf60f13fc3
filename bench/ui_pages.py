"""How long do the browser pages take to load: MLflow's web UI through the gateway against straight from MLflow, and
the Hokusai dashboard; and how many requests of a page load count against the key's rate limit?

One MLflow server (one worker, as embedded) and one `hokusai serve` in front of it. The data: one run logged by the
stock client (tests/mlflow_workflow.py), and two versions of one model, trained and logged by the analytics scenario
(tests/analytics_scenario.py) and registered through `POST /models/register`, the second with a contributor (what
the browser tests use). Debian's Chromium (Playwright; HOKUSAI_TEST_CHROMIUM names another binary) loads, in one run:
  - MLflow's UI, alternating direct and gateway (which goes first alternates too): the experiments list
    (`#/experiments`, until the logged experiment's link shows) and the run page (until its heading and metric show);
  - the dashboard: `/ui/` (models), `/ui/models/<name>` (until its improvement chart has both versions),
    `/ui/contributors` (until the leaderboard has rows), and the sign-in page `/login` (signed out).
Through the service the browser is signed in with a read key on the sign-in page (the session cookie rides along), as
a user is; the sign-in is not timed. Cold: a new browser context (an empty cache: the page's scripts and styles are
fetched, as after `hokusai ui`'s link) carrying the session's cookie; warm: reloads in the same context (the
browser's cache, what a user clicking around sees).

Prints medians and p90s, and per load: the requests the page made, those that reached the server, and those counted
against the key's rate limit. Counted is measured by the key's budget (X-RateLimit-Remaining of a probe before and
after each load), and checked against the responses the browser saw carrying X-RateLimit-Remaining; what the server
answered that the page never saw (a web worker's calls) is listed from its access log, by request id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from _common import HOKUSAI_SERVE, clean_env, median, spawn, stop_group, wait_for  # noqa: E402
from playwright.sync_api import Browser, BrowserContext, Page, Response, sync_playwright  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402
from hokusai.server.mlflow.embedded import embedded_mlflow_command, free_loopback_port  # noqa: E402

MLFLOW_ROUNDS = 4  # cold loads per side and MLflow page (after one discarded warm-up load)
DASHBOARD_ROUNDS = 6  # cold loads per dashboard page (after one discarded warm-up load)
RELOADS = 3  # warm loads after each cold one
RUN_NAME = "gateway-e2e"  # the run tests/mlflow_workflow.py logs
TESTS = Path(__file__).resolve().parent.parent / "tests"
MODEL = "bench-ui-model"
CONTRIBUTOR = "0x" + "be0c4a11" * 5
PATIENCE_MS = 60_000  # a page that has not rendered by then is broken, not slow
MLFLOW_TRAILING_MS = 500  # MLflow's UI keeps calling after its content shows: wait before counting and reloading
DASHBOARD_TRAILING_MS = 150  # server-rendered pages: everything is in by the load event; a margin for the favicon
ACCESS_LINE = re.compile(r"hokusai\.access \[([^\]]+)\] (\S+) (\S+) (\d{3})")


def chromium_executable() -> str:
    found = shutil.which(os.environ.get("HOKUSAI_TEST_CHROMIUM") or "chromium")
    if found is None:
        raise SystemExit("bench/ui_pages.py needs Chromium: apt-get install chromium (or set HOKUSAI_TEST_CHROMIUM)")
    return found


@dataclass
class Stack:
    mlflow_url: str
    service_url: str
    service_log: Path
    processes: list[subprocess.Popen]

    def stop(self) -> None:
        for process in self.processes:
            stop_group(process)


def start_stack(home: Path, admin_key: str) -> Stack:
    (home / "mlflow").mkdir()
    (home / "service").mkdir()
    mlflow_port = free_loopback_port()
    stack = Stack(f"http://127.0.0.1:{mlflow_port}", "", home / "service.log", [])
    stack.processes.append(spawn(embedded_mlflow_command(home / "mlflow", "127.0.0.1", mlflow_port)))
    try:
        wait_for(f"{stack.mlflow_url}/health")
        port = free_loopback_port()
        env = clean_env(
            HOKUSAI_HOME=str(home / "service"),
            HOKUSAI_PORT=str(port),
            HOKUSAI_MLFLOW_URL=stack.mlflow_url,
            HOKUSAI_BOOTSTRAP_ADMIN_KEY=admin_key,
            HOKUSAI_LOG_LEVEL="INFO",  # the access log: requests the browser's pages did not see
            # The run makes thousands of counted requests with one key: the default 1000/hour would end it early.
            # (What a page costs against the real limit is what the run counts.)
            HOKUSAI_RATE_LIMIT_DEFAULT_PER_HOUR="100000000",
        )
        with open(stack.service_log, "wb") as log:
            stack.processes.insert(
                0,
                subprocess.Popen(HOKUSAI_SERVE, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
            )
        stack.service_url = f"http://127.0.0.1:{port}"
        wait_for(f"{stack.service_url}/ready")
    except BaseException:
        stack.stop()
        raise
    return stack


def stock_client(script: str, service_url: str, key: str, *args: str) -> subprocess.Popen:
    """A script of tests/ run by the stock mlflow client through the gateway, as the tests run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HOKUSAI_"))}
    env.update(MLFLOW_TRACKING_URI=f"{service_url}/mlflow", MLFLOW_TRACKING_TOKEN=key)
    return subprocess.Popen(
        [sys.executable, str(TESTS / script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def last_json_line(process: subprocess.Popen, what: str) -> dict:
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    if process.returncode != 0:
        raise SystemExit(f"{what} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def make_data(service_url: str, admin_key: str, service_home: Path) -> tuple[str, str, str]:
    """A run for MLflow's pages, and two registered versions of MODEL for the dashboard (the second contributed by
    CONTRIBUTOR, its benchmark the validation accuracy, as tests/support.py `benchmark_metadata` writes it).
    The two clients run at once. Returns (experiment name, experiment id, run id) of the run."""
    experiment_name = "bench-ui-pages"
    datasets = service_home / "datasets"  # where the analytics scenario's holdout goes, as in the tests
    datasets.mkdir(exist_ok=True)
    workflow = stock_client("mlflow_workflow.py", service_url, admin_key, experiment_name)
    scenario = stock_client("analytics_scenario.py", service_url, admin_key, MODEL, str(datasets))
    run_id = last_json_line(workflow, "tests/mlflow_workflow.py")["run_id"]
    logged = last_json_line(scenario, "tests/analytics_scenario.py")
    admin = {"Authorization": f"Bearer {admin_key}"}
    for index, version in enumerate(logged["versions"]):
        metadata = {"benchmark_metric": "val_accuracy", "benchmark_value": version["metrics"]["val_accuracy"]}
        if index:
            metadata["contributor_address"] = CONTRIBUTOR
        body = {"model_data": version["model_uri"], "model_type": "classifier", "model_name": MODEL}
        answer = httpx.post(f"{service_url}/models/register", json={**body, "metadata": metadata}, headers=admin)
        answer.raise_for_status()
    answer = httpx.get(
        f"{service_url}/mlflow/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": experiment_name},
        headers=admin,
    )
    answer.raise_for_status()
    return experiment_name, answer.json()["experiment"]["experiment_id"], run_id


def read_key(service_url: str, admin_key: str) -> str:
    answer = httpx.post(
        f"{service_url}/api/v1/keys",
        json={"name": "bench ui pages", "scopes": ["read"]},
        headers={"Authorization": f"Bearer {admin_key}"},
    )
    answer.raise_for_status()
    return answer.json()["key"]


class Budget:
    """The read key's remaining hourly budget, read with a probe of its own (which is counted too)."""

    def __init__(self, service_url: str, key: str) -> None:
        self._client = httpx.Client(base_url=service_url, headers={"Authorization": f"Bearer {key}"})
        self.last = self._probe()

    def _probe(self) -> int:
        answer = self._client.get("/models")
        answer.raise_for_status()
        return int(answer.headers["x-ratelimit-remaining"])

    def spent_since_last(self) -> int:
        """Requests counted since the previous probe (this probe itself not included)."""
        before, self.last = self.last, self._probe()
        return before - self.last - 1

    def close(self) -> None:
        self._client.close()


# After a page has rendered: its requests (the document and every resource) and those that reached the server
# (the rest came from the browser's cache; a 304 revalidation counts as reaching it).
COUNT_REQUESTS = """() => {
    const loads = [...performance.getEntriesByType("navigation"), ...performance.getEntriesByType("resource")];
    return [loads.length, loads.filter(entry => entry.transferSize > 0).length];
}"""


@dataclass
class ResponseLog:
    """Every response the browser's pages received, the sign-in's included: how many carried X-RateLimit-Remaining,
    the service's request ids (to find in its access log what the pages did not see), and any refused (401, 403,
    429) or failed (5xx). MLflow's UI asks for `users/current` (MLflow's auth app) and gets 404, directly as
    through the gateway: not a refusal."""

    with_limit_header: int = 0
    request_ids: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)

    def record(self, response: Response) -> None:
        headers = response.headers
        if "x-ratelimit-remaining" in headers:
            self.with_limit_header += 1
        if "x-request-id" in headers:
            self.request_ids.add(headers["x-request-id"])
        if response.status in (401, 403, 429) or response.status >= 500:
            self.failed.append(f"{response.status} {response.request.method} {response.url}")


@dataclass(frozen=True)
class Target:
    """A page to load: its URL, whether the browser carries the session, when the page counts as shown, how long
    its trailing calls take, and whether it is the service's (its requests may count against the key)."""

    url: str
    signed_in: bool
    shown: Callable[[Page], None]
    trailing_ms: int
    through_service: bool


def signed_in_state(browser: Browser, service_url: str, key: str, responses: ResponseLog) -> dict:
    """Sign in as a user does (the sign-in page: type the key, click Sign in, land on the dashboard), in a context
    of its own; returns its cookies (the session's) for the contexts that measure, whose cache then stays empty."""
    context = browser.new_context()
    context.on("response", responses.record)
    try:
        page = context.new_page()
        page.goto(f"{service_url}/login")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{service_url}/ui/")
        page.locator("p.signed-in").wait_for(timeout=PATIENCE_MS)
        return context.storage_state()
    finally:
        context.close()


def measure(
    browser: Browser, target: Target, session: dict, responses: ResponseLog, budget: Budget, reloads: int = RELOADS
) -> dict[str, list[float]]:
    """One cold load in a new context, then `reloads` warm reloads in it: seconds until shown; requests made, those
    that reached the server, those counted against the key (by its budget) and those the browser saw saying so."""
    context: BrowserContext = browser.new_context(
        viewport={"width": 1280, "height": 800}, storage_state=session if target.signed_in else None
    )
    context.on("response", responses.record)
    found: dict[str, list[float]] = {
        f"{kind}{what}": []
        for kind in ("cold", "warm")
        for what in ("", "_requests", "_fetched", "_counted", "_with_header")
    }
    try:
        page = context.new_page()
        if target.through_service:
            budget.spent_since_last()  # whatever came before (the sign-in, another page) is not this page's
        for load in range(reloads + 1):
            kind = "warm" if load else "cold"
            seen_before = responses.with_limit_header
            started = time.perf_counter()
            if load:
                page.reload()
            else:
                page.goto(target.url)
            target.shown(page)
            found[kind].append(time.perf_counter() - started)
            page.wait_for_timeout(target.trailing_ms)
            requests, fetched = page.evaluate(COUNT_REQUESTS)
            found[f"{kind}_requests"].append(requests)
            found[f"{kind}_fetched"].append(fetched)
            found[f"{kind}_with_header"].append(responses.with_limit_header - seen_before)
            found[f"{kind}_counted"].append(budget.spent_since_last() if target.through_service else 0)
        return found
    finally:
        context.close()


def run_rounds(
    browser: Browser,
    rounds: int,
    targets: dict[tuple[str, str], Target],
    session: dict,
    responses: ResponseLog,
    budget: Budget,
) -> dict[tuple[str, str], dict[str, list[float]]]:
    """`rounds` measured rounds after one discarded cold load of each target (it warms the servers: imports, SQLite
    pages, caches). Targets are (page, side) pairs; the order of a page's sides alternates by round, so neither
    always meets the other's leftovers."""
    results: dict[tuple[str, str], dict[str, list[float]]] = {name: {} for name in targets}
    pages = list(dict.fromkeys(page for page, _ in targets))
    for round_index in range(rounds + 1):
        for page_name in pages:
            sides = [name for name in targets if name[0] == page_name]
            for name in sides if round_index % 2 else reversed(sides):
                if not round_index:
                    measure(browser, targets[name], session, responses, budget, reloads=0)
                    continue
                measured = measure(browser, targets[name], session, responses, budget)
                for what, values in measured.items():
                    results[name].setdefault(what, []).extend(values)
    return results


def unseen_by_pages(service_log: Path, seen_ids: set[str], since_id: str) -> Counter[str]:
    """Requests in the service's access log after `since_id` (a request made just before the browser's first) whose
    responses no page saw."""
    unseen: Counter[str] = Counter()
    started = False
    for line in service_log.read_text(errors="replace").splitlines():
        match = ACCESS_LINE.search(line)
        if match is None:
            continue
        request_id, method, path, status = match.groups()
        if request_id == since_id:
            started = True
        elif started and request_id not in seen_ids and not path.startswith("/models"):  # /models: the budget probe
            unseen[f"{method} {path} {status}"] += 1
    return unseen


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


def timing(values: list[float]) -> str:
    return f"{median(values) * 1000:.0f} ms (p90 {p90(values) * 1000:.0f})"


def counts(found: dict[str, list[float]], kind: str) -> str:
    counted, with_header = median(found[f"{kind}_counted"]), median(found[f"{kind}_with_header"])
    return (
        f"{median(found[f'{kind}_requests']):.0f} requests, {median(found[f'{kind}_fetched']):.0f} reaching the"
        f" server, {counted:.0f} counted ({with_header:.0f} seen with X-RateLimit-Remaining)"
    )


def main() -> None:
    executable = chromium_executable()
    admin_key = generate_api_key()
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        stack = start_stack(Path(scratch), admin_key)
        try:
            service_url = stack.service_url
            experiment_name, experiment_id, run_id = make_data(service_url, admin_key, Path(scratch) / "service")
            key = read_key(service_url, admin_key)
            setup_seconds = time.perf_counter() - started

            def experiments_shown(page: Page) -> None:
                page.get_by_role("link", name=experiment_name).wait_for(timeout=PATIENCE_MS)

            def run_shown(page: Page) -> None:
                page.get_by_role("heading", name=RUN_NAME).wait_for(timeout=PATIENCE_MS)
                page.get_by_role("row", name="accuracy 0.95").first.wait_for(timeout=PATIENCE_MS)

            def selector_shown(selector: str) -> Callable[[Page], None]:
                return lambda page: page.locator(selector).first.wait_for(timeout=PATIENCE_MS)

            mlflow_targets = {}
            for page_name, fragment, shown in (
                ("experiments list", "#/experiments", experiments_shown),
                ("run page", f"#/experiments/{experiment_id}/runs/{run_id}", run_shown),
            ):
                direct, gateway = f"{stack.mlflow_url}/{fragment}", f"{service_url}/mlflow/{fragment}"
                mlflow_targets[(page_name, "direct")] = Target(direct, False, shown, MLFLOW_TRAILING_MS, False)
                mlflow_targets[(page_name, "gateway")] = Target(gateway, True, shown, MLFLOW_TRAILING_MS, True)
            dashboard_targets = {
                (path, "service"): Target(
                    f"{service_url}{path}", path != "/login", selector_shown(selector), DASHBOARD_TRAILING_MS, True
                )
                for path, selector in (
                    ("/ui/", f'tr[data-model="{MODEL}"]'),
                    (f"/ui/models/{MODEL}", '#improvement-chart g[data-version="2"]'),
                    ("/ui/contributors", "#leaderboard-table tbody tr"),
                    ("/login", "#api_key"),
                )
            }

            responses = ResponseLog()
            budget = Budget(service_url, key)
            first_request_id = httpx.get(f"{service_url}/live").headers["x-request-id"]
            phase_started = time.perf_counter()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
                try:
                    session = signed_in_state(browser, service_url, key, responses)
                    sign_in_counted = budget.spent_since_last()
                    mlflow = run_rounds(browser, MLFLOW_ROUNDS, mlflow_targets, session, responses, budget)
                    mlflow_seconds = time.perf_counter() - phase_started
                    dashboard = run_rounds(browser, DASHBOARD_ROUNDS, dashboard_targets, session, responses, budget)
                    dashboard_seconds = time.perf_counter() - phase_started - mlflow_seconds
                finally:
                    browser.close()
            budget.close()
        finally:
            stack.stop()
        unseen = unseen_by_pages(stack.service_log, responses.request_ids, first_request_id)

    print(
        "Browser page loads in Chromium until the content shows; through the service signed in with a read key (the"
        f" sign-in not timed). Cold: a new context (empty cache, the session's cookie); warm: {RELOADS} reloads"
        " after each cold load. Median (p90). Per load (median): requests the page made, those reaching the server"
        " (the rest from the browser's cache), those counted against the key's rate limit (its budget's fall), of"
        " them seen by the page carrying X-RateLimit-Remaining."
    )
    print(f"MLflow UI, direct vs through the gateway ({MLFLOW_ROUNDS} cold loads per side and page):")
    for page_name in dict.fromkeys(page for page, _ in mlflow_targets):
        direct, gateway = mlflow[(page_name, "direct")], mlflow[(page_name, "gateway")]
        print(f"  {page_name}:")
        for kind in ("cold", "warm"):
            ratio = median(gateway[kind]) / median(direct[kind])
            print(
                f"    {kind}: direct {timing(direct[kind])}, gateway {timing(gateway[kind])}; ratio {ratio:.2f};"
                f" gateway: {counts(gateway, kind)}; direct: {median(direct[f'{kind}_fetched']):.0f} reaching it"
            )
    print(f"Hokusai dashboard ({DASHBOARD_ROUNDS} cold loads per page; /login signed out):")
    for path, _ in dashboard_targets:
        found = dashboard[(path, "service")]
        print(f"  {path}:")
        for kind in ("cold", "warm"):
            print(f"    {kind}: {timing(found[kind])}; {counts(found, kind)}")
    print(f"Signing in (the sign-in page, POST /login, landing on /ui/): {sign_in_counted} counted against the key.")
    print("Answered by the service but never seen by a page (a web worker's requests), over the whole run:")
    for request, times in sorted(unseen.items()) or [("none", 0)]:
        print(f"  {request}" + (f" x{times}" if times else ""))
    if responses.failed:
        print(f"Refused or failed responses ({len(responses.failed)}):", *sorted(set(responses.failed)), sep="\n  ")
    else:
        print("No response was refused (401/403/429) or failed (5xx).")
    print(
        f"(setup {setup_seconds:.0f} s, MLflow pages {mlflow_seconds:.0f} s, dashboard {dashboard_seconds:.0f} s,"
        f" whole run {time.perf_counter() - started:.0f} s; load average {load_at_start:.1f} at the start,"
        f" {os.getloadavg()[0]:.1f} at the end)"
    )


if __name__ == "__main__":
    main()
