"""`hokusai serve --workers N` behind a proxy: the workers share the port, one embedded MLflow, metrics that add up
whichever worker answers, and a failed-authentication lockout keyed by the forwarded client address."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hokusai.server.auth.keys import generate_api_key
from hokusai.server.config import ConfigurationError, load_settings
from hokusai.server.mlflow.embedded import free_loopback_port
from tests.support import ServiceProcess, service_environment, spawn_service, stop_process_group, wait_for_status
from tests.test_rate_limits import start_well_inside_window

CLIENT_X = "203.0.113.7"  # documentation addresses (RFC 5737): what a proxy would forward
CLIENT_Y = "198.51.100.9"


def worker_of(response: httpx.Response) -> str:
    """Which worker process answered: request ids start with a random prefix drawn once per process."""
    return response.headers["x-request-id"][:16]


def counter(metrics_text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def samples_named(metrics_text: str, name: str) -> list:
    return [s for family in text_string_to_metric_families(metrics_text) for s in family.samples if s.name == name]


def children(service: ServiceProcess, marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.Process(service.process.pid).children(recursive=True):
        try:
            if marker in " ".join(process.cmdline()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def api_workers(service: ServiceProcess) -> list[psutil.Process]:
    return children(service, "multiprocessing.spawn")


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fresh_connection_gets(base_url: str, path: str, count: int) -> list[httpx.Response]:
    """`count` GETs, eight at a time, each on a new connection: the kernel hands each new connection to whichever
    worker accepts it first, so idle workers share them."""

    def get(_: int) -> httpx.Response:
        response = httpx.get(base_url + path, timeout=30)
        assert response.status_code == 200, response.text
        return response

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(get, range(count)))


def ready_workers(base_url: str) -> set[str]:
    """The workers that answered /ready with 200 among sixteen fresh-connection GETs."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: httpx.get(base_url + "/ready", timeout=30), range(16)))
    return {worker_of(answer) for answer in answers if answer.status_code == 200}


def answering_workers(base_url: str, path: str, want: int = 2, rounds: int = 50) -> dict[str, list[httpx.Response]]:
    """Responses by the worker that gave them, from rounds of eight fresh-connection GETs until `want` workers
    have answered (or the rounds ran out)."""
    seen: dict[str, list[httpx.Response]] = {}
    for _ in range(rounds):
        for response in fresh_connection_gets(base_url, path, 8):
            seen.setdefault(worker_of(response), []).append(response)
        if len(seen) >= want:
            break
    return seen


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Iterator[ServiceProcess]:
    """`hokusai serve --workers 2` with the embedded MLflow, behind a (simulated) proxy on 127.0.0.1."""
    home = tmp_path_factory.mktemp("workers-home")
    port = free_loopback_port()
    admin_key = generate_api_key()
    env = service_environment(
        HOKUSAI_HOME=str(home),
        HOKUSAI_PORT=str(port),
        HOKUSAI_ENVIRONMENT="test",
        HOKUSAI_BOOTSTRAP_ADMIN_KEY=admin_key,
    )
    log_path = home / "service.log"
    args = ("--workers", "2", "--proxy-headers", "--forwarded-allow-ips", "127.0.0.1")
    process = spawn_service(env, log_path, args=args)
    service = ServiceProcess(f"http://127.0.0.1:{port}", home, log_path, process, env, admin_key)
    try:
        wait_for_status(service.base_url + "/ready", 200, timeout=180, process=process, log=log_path)
        # One worker ready is not both: the other may have checked MLflow while the serve process was still
        # starting it, and keeps that answer for its health cache's few seconds.
        wait_until(lambda: len(ready_workers(service.base_url)) >= 2, 120, "both workers ready")
        yield service
    finally:
        stop_process_group(process)


@pytest.mark.slow
def test_two_workers_answer_on_one_port_with_one_embedded_mlflow(two_workers):
    workers = wait_until(lambda: len(api_workers(two_workers)) == 2 and api_workers(two_workers), 60, "2 workers")
    seen = answering_workers(two_workers.base_url, "/ready")
    assert len(seen) == 2, f"only {list(seen)} answered"
    # One MLflow for the deployment, started and supervised by the serve process itself, not one per worker.
    mlflow = children(two_workers, "hokusai.server.mlflow.launcher")
    assert len(mlflow) == 1 and mlflow[0].ppid() == two_workers.process.pid
    assert all(worker.ppid() == two_workers.process.pid for worker in workers)
    statuses = [answers[0].json() for answers in answering_workers(two_workers.base_url, "/health/status").values()]
    assert len(statuses) == 2
    for status in statuses:
        assert status["mlflow"]["embedded"] is True
        assert status["mlflow"]["status"]["connected"] is True
    assert len({status["mlflow"]["server"] for status in statuses}) == 1
    # The schema was migrated and the first admin key stored once, by the serve process, before the workers.
    assert two_workers.logs().count("Running upgrade  -> 0001_api_keys") == 1
    with two_workers.client(two_workers.admin_key) as admin:
        assert len(admin.get("/api/v1/keys").json()) == 1


@pytest.mark.slow
def test_metrics_add_up_across_workers_whichever_answers(two_workers):
    with httpx.Client(base_url=two_workers.base_url) as client:
        before = counter(client.get("/metrics").text, "http_requests_total", route="/live", method="GET", status="2xx")
    requests = 40
    answered = {worker_of(r) for r in fresh_connection_gets(two_workers.base_url, "/live", requests)}
    assert len(answered) == 2, "the 40 requests were all served by one worker"

    scrapes = answering_workers(two_workers.base_url, "/metrics")
    assert len(scrapes) == 2
    for responses in scrapes.values():
        for scrape in responses:
            assert counter(scrape.text, "http_requests_total", route="/live", method="GET", status="2xx") == (
                before + requests
            )
            # Gauges combine across workers too (the worst breaker), rather than one series per process.
            assert [s.value for s in samples_named(scrape.text, "mlflow_circuit_breaker_state")] == [0.0]


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_its_counts_are_kept(two_workers):
    with httpx.Client(base_url=two_workers.base_url) as client:
        for _ in range(5):
            assert client.get("/version").status_code == 200
        total = counter(client.get("/metrics").text, "http_requests_total", route="/version", method="GET")
    victim = api_workers(two_workers)[0]
    victim.send_signal(signal.SIGKILL)
    wait_until(
        lambda: victim.pid not in {w.pid for w in api_workers(two_workers)} and len(api_workers(two_workers)) == 2,
        120,
        "the supervisor to replace the killed worker",
    )
    assert len(answering_workers(two_workers.base_url, "/ready")) == 2  # the replacement serves too
    for responses in answering_workers(two_workers.base_url, "/metrics").values():
        for scrape in responses:  # the killed worker's requests still count
            assert counter(scrape.text, "http_requests_total", route="/version", method="GET") == total
    assert two_workers.process.poll() is None


# --- behind a proxy: the failed-authentication lockout is per forwarded address ---------------------------------


def bad_key_attempts(service, forwarded_for: str, attempts: int) -> list[int]:
    with httpx.Client(base_url=service.base_url) as client:
        return [
            client.get(
                "/api/v1/keys", headers={"X-API-Key": generate_api_key(), "X-Forwarded-For": forwarded_for}
            ).status_code
            for _ in range(attempts)
        ]


def admin_call(service, forwarded_for: str) -> int:
    with service.client(service.admin_key) as client:
        return client.get("/api/v1/keys", headers={"X-Forwarded-For": forwarded_for}).status_code


def test_behind_a_trusted_proxy_the_lockout_is_per_forwarded_address(start_service, mlflow_server):
    service = start_service(
        mlflow_url=mlflow_server.url,
        proxy_headers="true",
        forwarded_allow_ips="127.0.0.1",  # the test client is the proxy
        rate_limit_auth_failures="5/minute",
        auth_cache_ttl="0",  # every call looks its key up: a blocked address is refused before the lookup
    )
    start_well_inside_window(60)
    assert bad_key_attempts(service, CLIENT_X, 6) == [401] * 5 + [429]
    assert admin_call(service, CLIENT_X) == 429  # X is locked out, whatever key it sends now
    assert admin_call(service, CLIENT_Y) == 200  # everyone else behind the same proxy is not
    # A proxy appends the address it saw: X cannot get out by sending an X-Forwarded-For of its own.
    assert admin_call(service, f"{CLIENT_Y}, {CLIENT_X}") == 429


def test_without_proxy_headers_a_forwarded_address_is_ignored(start_service, mlflow_server):
    service = start_service(mlflow_url=mlflow_server.url, rate_limit_auth_failures="5/minute", auth_cache_ttl="0")
    start_well_inside_window(60)
    assert bad_key_attempts(service, CLIENT_X, 6) == [401] * 5 + [429]
    # The lockout is on the connection's address: claiming another one does not lift it.
    assert admin_call(service, CLIENT_Y) == 429


def test_trusted_proxies_must_be_addresses_or_networks():
    assert load_settings(forwarded_allow_ips=" 10.0.0.0/8, 127.0.0.1").forwarded_allow_ips == "10.0.0.0/8,127.0.0.1"
    assert load_settings(forwarded_allow_ips=" * ").forwarded_allow_ips == "*"
    for bad in ("10.0.0.1/8", "proxy.internal", "127.0.0.1,*"):
        with pytest.raises(ConfigurationError, match="HOKUSAI_FORWARDED_ALLOW_IPS"):
            load_settings(forwarded_allow_ips=bad)
