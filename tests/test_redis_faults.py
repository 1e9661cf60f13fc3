"""A Redis that stalls (SIGSTOP: connections accepted, never answered): authenticated calls keep being served
without waiting on it, the service says so, and it uses Redis again once Redis answers."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SEARCH = "/mlflow/api/2.0/mlflow/experiments/search?max_results=1"


def redis_status(service) -> dict:
    with httpx.Client(base_url=service.base_url) as client:
        return client.get("/health/status").json()["redis"]


@pytest.mark.parametrize("fail_open", ["true", "false"])
def test_a_stalled_redis_is_skipped_and_used_again_when_it_answers(
    start_service, mlflow_server, private_redis, fail_open
):
    service = start_service(
        mlflow_url=mlflow_server.url,
        redis_url=private_redis.url,
        redis_retry_after="1",
        rate_limit_fail_open=fail_open,
        registry_cache_ttl="30",
    )
    with service.client(service.admin_key) as admin:
        key = admin.post("/api/v1/keys", json={"name": "redis faults", "scopes": ["read"]}).json()["key"]
    with service.client(key) as client:
        assert client.get(SEARCH).headers.get("x-ratelimit-limit") is not None  # counted in Redis
        assert client.get("/models/").status_code == 200  # listed through the registry cache in Redis
        assert redis_status(service)["circuit_breaker"]["state"] == "closed"

        private_redis.pause()
        try:
            answers = [client.get(path) for _ in range(6) for path in (SEARCH, "/models/")]
            breaker = redis_status(service)["circuit_breaker"]
            with httpx.Client(base_url=service.base_url) as public:
                health = public.get("/health").json()
        finally:
            private_redis.resume()

        if fail_open == "true":
            assert [a.status_code for a in answers] == [200] * len(answers)  # served without limits
            assert "x-ratelimit-limit" not in answers[-2].headers
        else:
            assert {a.status_code for a in answers} == {503}
            assert {a.json()["detail"] for a in answers} == {"Rate limiting is unavailable"}
        # Redis was skipped, not waited on: the breaker opened after a few failures and later calls went around.
        assert breaker["state"] == "open" and breaker["times_opened"] >= 1
        assert breaker["skipped_calls"] >= len(answers) - 4, breaker
        assert health["services"]["redis"] == "unhealthy" and health["status"] == "degraded"
        assert "Redis failed 3 times in a row" in service.logs()

        deadline = time.monotonic() + 30
        while redis_status(service)["circuit_breaker"]["state"] != "closed":  # a later call tries Redis again
            assert time.monotonic() < deadline, redis_status(service)
            client.get(SEARCH)
            time.sleep(0.2)
        recovered = client.get(SEARCH)
        assert recovered.status_code == 200 and recovered.headers.get("x-ratelimit-limit") is not None
    assert "Redis answers again" in service.logs()
