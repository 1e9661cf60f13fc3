"""Operations asked of one service process that act on every process's memory (the MLflow breaker reset, the DSPy
cache clear): with Redis they reach the other processes of the deployment, without it they act on the one process,
and with Redis down they still act here and say that the others were not reached."""

from __future__ import annotations

import json
import secrets
import time

import httpx
import pytest
import redis

from hokusai.server.mlflow.embedded import free_loopback_port

pytestmark = pytest.mark.redis

TRUSTED = json.dumps({"shouting-summary": "tests.dspy_programs:ShoutingSummary"})


@pytest.fixture
def deployment(redis_url):
    """A Redis prefix for the services of one test: one deployment (each test service has its own database, from
    which the default prefix derives). What they wrote under it is deleted at the end (db 15 is shared)."""
    prefix = f"test-cluster-{secrets.token_hex(4)}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def breaker_of(service) -> dict:
    with httpx.Client(base_url=service.base_url) as public:
        return public.get("/health/status").json()["mlflow"]["circuit_breaker"]


def open_breaker(service) -> None:
    """Reads the service's MLflow (nothing listens there) until its breaker opens."""
    with service.client(service.admin_key) as admin:
        for _ in range(3):
            admin.get("/models/")
    assert breaker_of(service)["state"] == "OPEN"


def wait_for_subscribers(redis_url: str, prefix: str, count: int) -> None:
    """Until `count` service processes listen on the deployment's cluster channel (each subscribes as it starts,
    and again after Redis comes back)."""
    channel = f"{prefix}cluster"
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 30
    while dict(client.pubsub_numsub(channel)).get(channel.encode(), 0) != count:
        assert time.monotonic() < deadline, client.pubsub_numsub(channel)
        time.sleep(0.05)
    client.close()


def wait_for_redis(service) -> None:
    """Until the service uses Redis again (an authenticated request is counted there: the breaker's trial call)."""
    deadline = time.monotonic() + 30
    with service.client(service.admin_key) as admin:
        while admin.get("/health/status").json()["redis"]["circuit_breaker"]["state"] != "closed":
            assert time.monotonic() < deadline
            time.sleep(0.1)


def reset(service) -> httpx.Response:
    with service.client(service.admin_key) as admin:
        return admin.post("/health/mlflow/reset")


def test_a_reset_asked_of_one_process_closes_the_breaker_of_another(
    start_service, mlflow_server, redis_url, deployment
):
    prefix = deployment
    asked = start_service(mlflow_url=mlflow_server.url, redis_url=redis_url, redis_prefix=prefix)
    # Another process of the deployment, whose MLflow does not answer: its breaker opens and stays open.
    other = start_service(
        wait_until="live",
        mlflow_url=f"http://127.0.0.1:{free_loopback_port()}",
        redis_url=redis_url,
        redis_prefix=prefix,
        breaker_failure_threshold="2",
        breaker_recovery_timeout="300",
    )
    wait_for_subscribers(redis_url, prefix, 2)
    open_breaker(other)

    answer = reset(asked)

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["message"] == "Circuit breaker reset successfully" and body["reset_by"] == "manual_api_call"
    assert body["processes_reached"] == 2 and "warning" not in body
    breaker = breaker_of(other)  # each process keeps its own state: this one was reset by the message
    assert breaker["state"] == "CLOSED" and breaker["failure_count"] == 0, breaker
    assert "Cluster operation mlflow.breaker.reset applied, asked by" in other.logs()


def test_without_redis_a_reset_acts_on_the_one_process(start_service):
    service = start_service(
        wait_until="live",
        mlflow_url=f"http://127.0.0.1:{free_loopback_port()}",
        breaker_failure_threshold="2",
        breaker_recovery_timeout="300",
    )
    open_breaker(service)
    answer = reset(service)
    assert answer.status_code == 200 and answer.json()["processes_reached"] == 1
    assert "warning" not in answer.json()
    assert breaker_of(service)["state"] == "CLOSED"


@pytest.mark.slow
def test_with_redis_down_a_reset_acts_here_says_so_and_reaches_the_others_once_redis_is_back(
    start_service, mlflow_server, private_redis
):
    prefix = "deployment:"
    asked = start_service(
        mlflow_url=mlflow_server.url, redis_url=private_redis.url, redis_prefix=prefix, redis_retry_after="0.5"
    )
    other = start_service(
        wait_until="live",
        mlflow_url=f"http://127.0.0.1:{free_loopback_port()}",
        redis_url=private_redis.url,
        redis_prefix=prefix,
        breaker_failure_threshold="2",
        breaker_recovery_timeout="300",
    )
    wait_for_subscribers(private_redis.url, prefix, 2)
    open_breaker(other)

    private_redis.pause()  # stalled: the publish times out (Redis may still deliver it once it runs again)
    try:
        stalled = reset(asked)
    finally:
        private_redis.resume()
    assert stalled.status_code == 200, stalled.text
    assert stalled.json()["processes_reached"] == 1 and "may not have been reached" in stalled.json()["warning"]
    assert "mlflow.breaker.reset: Redis did not answer" in asked.logs()

    open_breaker(other)
    private_redis.stop()  # down: the publish is refused
    down = reset(asked)
    assert down.status_code == 200, down.text
    assert down.json()["processes_reached"] == 1 and "may not have been reached" in down.json()["warning"]
    assert breaker_of(other)["state"] == "OPEN"  # not reached: said so, not pretended

    private_redis.restart()  # both subscriptions break; each process subscribes again by itself
    wait_for_subscribers(private_redis.url, prefix, 2)
    wait_for_redis(asked)  # its Redis breaker opened while Redis was down: the next publish would skip Redis
    answer = reset(asked)
    assert answer.status_code == 200 and answer.json()["processes_reached"] == 2
    assert breaker_of(other)["state"] == "CLOSED"


def shout(service, key: str, text: str) -> None:
    with service.client(key) as client:
        answer = client.post("/api/v1/dspy/execute", json={"program_id": "shouting-summary", "inputs": {"text": text}})
    assert answer.status_code == 200, answer.text


def clear(service) -> httpx.Response:
    with service.client(service.admin_key) as admin:
        return admin.post("/api/v1/dspy/cache/clear")


def dspy_settings(fake_lm) -> dict[str, str]:
    return {
        "dspy_lm": "openai/instant",
        "dspy_api_base": fake_lm.base_url,
        "dspy_num_retries": "0",
        "dspy_cache": "true",
        "dspy_trusted_programs": TRUSTED,
    }


@pytest.mark.slow
def test_a_cache_clear_asked_of_one_process_empties_the_dspy_cache_of_another(
    start_service, mlflow_server, redis_url, deployment, fake_lm
):
    prefix = deployment
    shared = {"mlflow_url": mlflow_server.url, "redis_url": redis_url, "redis_prefix": prefix, **dspy_settings(fake_lm)}
    asked = start_service(**shared)
    other = start_service(process=True, **shared)  # its own process: DSPy's response cache is per process
    wait_for_subscribers(redis_url, prefix, 2)
    text = f"cluster clear {secrets.token_hex(4)}"
    before = fake_lm.started["instant"]
    shout(other, other.admin_key, text)
    shout(other, other.admin_key, text)
    assert fake_lm.started["instant"] == before + 1  # the second answer came from the other process's cache

    cleared = clear(asked)

    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["message"].startswith("Cache cleared successfully")
    assert cleared.json()["processes_reached"] == 2 and "warning" not in cleared.json()
    shout(other, other.admin_key, text)
    assert fake_lm.started["instant"] == before + 2  # asked the language model again: its cache was emptied
    assert "Cluster operation dspy.cache.clear applied" in other.logs()


def test_without_redis_a_cache_clear_empties_this_process_cache(start_service, mlflow_server, fake_lm):
    service = start_service(mlflow_url=mlflow_server.url, **dspy_settings(fake_lm))
    text = f"local clear {secrets.token_hex(4)}"
    before = fake_lm.started["instant"]
    shout(service, service.admin_key, text)
    shout(service, service.admin_key, text)
    assert fake_lm.started["instant"] == before + 1
    cleared = clear(service)
    assert cleared.status_code == 200 and cleared.json()["processes_reached"] == 1
    assert "warning" not in cleared.json()
    shout(service, service.admin_key, text)
    assert fake_lm.started["instant"] == before + 2
