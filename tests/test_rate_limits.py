"""Rate limits over HTTP: exact counting at the boundary, headers, shared counters, Redis, failed-auth limits."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import httpx
import pytest
from redis.asyncio import Redis

from hokusai.server.ratelimit.counters import CounterLimit, MemoryCounters, RedisCounters
from hokusai.server.ratelimit.policies import parse_limit, route_id, route_limits
from hokusai.server.ratelimit.service import RateLimited, RequestRateLimiter
from hokusai.server.redis_breaker import RedisBreaker

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
REFUSED = {"detail": "Rate limit exceeded"}


def new_key(service, **body) -> str:
    with service.client(service.admin_key) as admin:
        response = admin.post("/api/v1/keys", json={"name": "limited", "scopes": ["read"], **body})
    assert response.status_code == 201, response.text
    return response.json()["key"]


def call(service, key: str, prefix: str = "/mlflow") -> httpx.Response:
    with service.client(key) as client:
        return client.get(prefix + SEARCH)


def start_well_inside_window(window_seconds: int, needed: float = 20.0) -> None:
    """Wait for the next window when this one ends within `needed` seconds.

    The sliding window counter weighs the previous window's hits by how much of it still overlaps, so a run that
    straddles a window edge may be allowed one more hit than the limit; counting tests start well inside one.
    Windows are aligned to the epoch.
    """
    left = window_seconds - time.time() % window_seconds
    if left < needed:
        time.sleep(left + 0.1)


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["detail"] == "Rate limit exceeded"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-remaining"] == "0"


@pytest.fixture(scope="module")
def limited_service(start_service, mlflow_server):
    return start_service(
        mlflow_url=mlflow_server.url,
        rate_limit_default_per_hour="5",
        rate_limit_routes=json.dumps({"GET /mlflow/{path:path}": "4/minute"}),
        rate_limit_auth_failures="3/minute",
    )


def test_default_limit_counts_exactly_and_sends_headers(start_service, mlflow_server):
    service = start_service(mlflow_url=mlflow_server.url, rate_limit_default_per_hour="5")
    key = new_key(service)
    start_well_inside_window(3600)
    before = time.time()
    for expected_remaining in (4, 3, 2, 1, 0):
        prefix = "/mlflow" if expected_remaining % 2 else "/api/mlflow"  # both prefixes spend one budget
        response = call(service, key, prefix)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit"] == "5"
        assert response.headers["x-ratelimit-remaining"] == str(expected_remaining)
        assert before < int(response.headers["x-ratelimit-reset"]) <= time.time() + 3601
        assert response.headers["ratelimit-policy"] == '"key";q=5;w=3600'
        assert response.headers["ratelimit"].startswith(f'"key";r={expected_remaining};t=')
    refused = call(service, key)
    assert_refused(refused)
    assert 1 <= int(refused.headers["retry-after"]) <= 3600
    assert call(service, new_key(service)).status_code == 200  # another key has its own budget


def test_a_keys_own_limit_overrides_the_default(start_service, mlflow_server):
    service = start_service(mlflow_url=mlflow_server.url, rate_limit_default_per_hour="5")
    key = new_key(service, rate_limit_per_hour=3)
    start_well_inside_window(3600)
    assert [call(service, key).status_code for _ in range(3)] == [200, 200, 200]
    assert_refused(call(service, key))
    admin = new_key(service, rate_limit_per_hour=2, scopes=["admin"])
    with service.client(admin) as client:
        assert [client.get("/api/v1/keys").status_code for _ in range(2)] == [200, 200]
        refused = client.get("/api/v1/keys")
    assert refused.status_code == 429 and refused.json() == REFUSED  # the reference's body, exactly
    generous = new_key(service, rate_limit_per_hour=8)
    assert [call(service, generous).status_code for _ in range(8)] == [200] * 8
    assert_refused(call(service, generous))


def test_route_policy_counts_once_across_prefixes(limited_service):
    key = new_key(limited_service, rate_limit_per_hour=100)
    start_well_inside_window(60)
    statuses, responses = [], []
    for index in range(5):
        response = call(limited_service, key, "/mlflow" if index % 2 else "/api/mlflow")
        statuses.append(response.status_code)
        responses.append(response)
    assert statuses == [200, 200, 200, 200, 429]
    first = responses[0]
    assert first.headers["x-ratelimit-limit"] == "4" and first.headers["x-ratelimit-remaining"] == "3"
    assert first.headers["ratelimit-policy"] == '"route";q=4;w=60, "key";q=100;w=3600'
    assert_refused(responses[-1])
    assert int(responses[-1].headers["retry-after"]) <= 60
    with limited_service.client(key) as client:  # other routes only spend the hourly budget
        assert client.get("/api/v1/keys").status_code == 403
        assert client.get("/api/v1/keys").headers["x-ratelimit-limit"] == "100"


def test_failed_authentication_is_limited_per_address(limited_service):
    good = new_key(limited_service)
    bad = good[:-1] + ("A" if good[-1] != "A" else "B")
    start_well_inside_window(60)
    with httpx.Client(base_url=limited_service.base_url) as client:
        statuses = [client.get("/mlflow" + SEARCH, headers={"X-API-Key": bad}).status_code for _ in range(3)]
        assert statuses == [401, 401, 401]
        blocked = client.get("/mlflow" + SEARCH, headers={"X-API-Key": bad})
        assert blocked.status_code == 429 and blocked.json()["detail"] == REFUSED["detail"]
        assert "retry-after" in blocked.headers
        # The address is blocked for the window, whatever key it sends now; without a key it is just 401.
        assert client.get("/mlflow" + SEARCH, headers={"X-API-Key": good}).status_code == 429
        assert client.get("/mlflow" + SEARCH).status_code == 401


def test_named_route_policies_of_the_reference():
    table = route_limits("20/minute", "100/minute", "100/minute", {"get /api/models/{model_name}": "7/second"})
    assert table["POST /models/register"].amount == 20 and table["POST /models/register"].get_expiry() == 60
    assert table["GET /models/{model_name}/{version}/lineage"].amount == 100
    assert table["GET /models/{model_id}/lineage"].amount == 100
    assert table["GET /models/contributors/{address}/impact"].amount == 100
    assert table["GET /models/{model_name}"].amount == 7
    assert route_id("post", "/api/models/register") == route_id("POST", "/models/register") == "POST /models/register"
    assert route_id("GET", "/api/mlflow/{path:path}") == "GET /mlflow/{path:path}"
    assert route_id("GET", "/api/v1/keys") == "GET /api/v1/keys"


@pytest.mark.redis
def test_two_processes_share_one_count_through_redis(start_service, mlflow_server, redis_url, tmp_path):
    shared = {
        "mlflow_url": mlflow_server.url,
        "redis_url": redis_url,
        "database_url": f"sqlite:///{tmp_path / 'shared.db'}",
    }
    first = start_service(**shared, process=True)
    second = start_service(**shared, process=True, bootstrap=False)
    key = new_key(first, rate_limit_per_hour=7)
    start_well_inside_window(3600)
    statuses = [call(service, key).status_code for _ in range(5) for service in (first, second)]
    assert statuses.count(200) == 7 and statuses[:7] == [200] * 7 and set(statuses[7:]) == {429}


@pytest.mark.redis
def test_redis_stopped_mid_run_fails_open_by_default(start_service, mlflow_server, private_redis):
    service = start_service(mlflow_url=mlflow_server.url, redis_url=private_redis.url, rate_limit_default_per_hour="3")
    key = new_key(service)
    start_well_inside_window(3600)
    assert [call(service, key).status_code for _ in range(3)] == [200, 200, 200]
    private_redis.stop()
    after = [call(service, key) for _ in range(5)]
    assert [r.status_code for r in after] == [200] * 5  # served, without limits, while Redis is away
    assert "x-ratelimit-limit" not in after[0].headers
    with httpx.Client(base_url=service.base_url) as client:
        health = client.get("/health").json()
    assert health["status"] == "degraded" and health["services"]["redis"] == "unhealthy"
    assert service.logs().count("Rate limit storage unreachable") == 1  # warned once per interval, not per request


@pytest.mark.redis
def test_redis_stopped_mid_run_can_fail_closed(start_service, mlflow_server, private_redis):
    service = start_service(mlflow_url=mlflow_server.url, redis_url=private_redis.url, rate_limit_fail_open="false")
    key = new_key(service)
    assert call(service, key).status_code == 200
    private_redis.stop()
    refused = call(service, key)
    assert refused.status_code == 503 and refused.json()["detail"] == "Rate limiting is unavailable"


def test_registration_policy_counts_both_prefixes(start_service, mlflow_server):
    service = start_service(mlflow_url=mlflow_server.url, rate_limit_registration="3/minute")
    key = new_key(service, scopes=["write"], rate_limit_per_hour=100)
    start_well_inside_window(60)
    body = {"model_data": "models:/m-" + "0" * 32, "model_type": "c", "model_name": "limited"}
    with service.client(key) as client:
        statuses = [
            client.post(prefix + "/register", json=body).status_code
            for prefix in ("/models", "/api/models", "/models", "/api/models")
        ]
        assert statuses == [400, 400, 400, 429]  # refused or not, each attempt is a registration request
        other = client.get("/models/", params={"name": "limited"})
    assert other.status_code == 200 and other.headers["x-ratelimit-limit"] == "100"


def test_a_separate_gateway_budget_when_configured(start_service, mlflow_server):
    """HOKUSAI_RATE_LIMIT_GATEWAY_PER_HOUR: a training run's tracking calls do not spend the key's API budget."""
    service = start_service(
        mlflow_url=mlflow_server.url, rate_limit_default_per_hour="3", rate_limit_gateway_per_hour="6"
    )
    start_well_inside_window(3600)
    key = new_key(service)
    for _ in range(6):
        assert call(service, key).status_code == 200
    assert_refused(call(service, key, "/api/mlflow"))  # both gateway prefixes spend the gateway budget
    with service.client(key) as client:
        for _ in range(3):
            assert client.get("/models/").status_code == 200  # the key's own budget is untouched
        assert_refused(client.get("/models/"))
    own_limit = new_key(service, rate_limit_per_hour=2)  # a key's own limit covers all of its traffic
    assert call(service, own_limit).status_code == 200
    with service.client(own_limit) as client:
        assert client.get("/models/").status_code == 200
    assert_refused(call(service, own_limit))


# The counters themselves: the same decisions in process and in Redis, one round trip per request in Redis.

ROUTE_LIMIT = CounterLimit("route:k:GET /x:60", 3, 60)
KEY_LIMIT = CounterLimit("key:k:3600", 5, 3600)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_the_previous_window_is_weighed_by_its_overlap():
    clock = FakeClock(60 * 1_000_000 + 30)  # halfway through a minute
    counters = MemoryCounters(clock)
    limit = CounterLimit("key:k:60", 10, 60)
    decisions = [await counters.acquire([limit]) for _ in range(11)]
    assert [d.refused for d in decisions] == [None] * 10 + [0]  # exact within a window: N admitted, N+1 refused
    assert decisions[-1].states[0].remaining == 0 and decisions[-1].states[0].reset_in == 30  # the window's end
    clock.now += 45  # 15 s into the next minute: the previous 10 still weigh 45/60 (7.5 requests)
    decisions = [await counters.acquire([limit]) for _ in range(4)]
    assert [d.refused for d in decisions] == [None, None, None, 0]
    assert [d.states[0].remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[-1].states[0].reset_in == pytest.approx(3)  # 45 % (60 / 10): when one more request weighs less
    clock.now += 120  # two windows later nothing weighs, and the sweep has dropped the entry
    assert (await counters.acquire([limit], count=False)).states[0].remaining == 10
    assert len(counters) == 0


@pytest.mark.anyio
async def test_a_request_refused_by_one_policy_is_counted_in_none():
    counters = MemoryCounters(FakeClock(3600 * 500_000 + 10))
    key = CounterLimit("key:k:3600", 2, 3600)
    assert [(await counters.acquire([ROUTE_LIMIT, key])).refused for _ in range(3)] == [None, None, 1]
    route_state = (await counters.acquire([ROUTE_LIMIT], count=False)).states[0]
    assert route_state.remaining == 1  # the route's 3/minute spent by the two admitted requests only


@pytest.mark.redis
@pytest.mark.anyio
async def test_redis_decides_like_the_process(redis_url):
    start_well_inside_window(60, needed=5)
    prefix = f"test-{secrets.token_hex(4)}:ratelimit:"
    client = Redis.from_url(redis_url)
    in_redis, in_process = RedisCounters(client, prefix), MemoryCounters()
    try:
        for _ in range(5):
            shared, local = (
                await in_redis.acquire([ROUTE_LIMIT, KEY_LIMIT]),
                await in_process.acquire([ROUTE_LIMIT, KEY_LIMIT]),
            )
            assert shared.refused == local.refused
            assert [s.remaining for s in shared.states] == [s.remaining for s in local.states]
            assert [s.reset_in for s in shared.states] == pytest.approx([s.reset_in for s in local.states], abs=1)
        assert shared.refused == 0 and len(shared.states) == 1  # the route refused: the key's budget not asked
        key_state = (await in_redis.acquire([KEY_LIMIT], count=False)).states[0]
        assert key_state.remaining == 2  # three admitted requests; the refused ones spent nothing
        written = sorted([key.decode() async for key in client.scan_iter(f"{prefix}*")])
        assert written == sorted([prefix + ROUTE_LIMIT.key, prefix + KEY_LIMIT.key])
        assert 3600 < await client.pttl(prefix + KEY_LIMIT.key) <= 2 * 3600 * 1000  # gone once it weighs nothing
    finally:
        keys = [key async for key in client.scan_iter(f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def redis_limiter(url: str, prefix: str, timeout: float = 1.0, **options) -> RequestRateLimiter:
    settings = {"default_per_hour": 5, "auth_failure_limit": parse_limit("3/minute"), "fail_open": False}
    settings["route_limits"] = route_limits("20/minute", "100/minute", "100/minute", {"GET /x": "3/minute"})
    return RequestRateLimiter.on_redis(url, timeout, RedisBreaker(3, 1.0), prefix=prefix, **{**settings, **options})


@pytest.mark.redis
@pytest.mark.anyio
async def test_one_round_trip_per_request(private_redis):
    """Both policies decided, counted and reported by one EVALSHA: no second call for the headers."""
    limiter = redis_limiter(private_redis.url, "hk:")
    admin = Redis.from_url(private_redis.url)
    try:
        await limiter.hit_key("k1", None, "GET /x")  # loads the script (NOSCRIPT, SCRIPT LOAD) once
        await admin.config_resetstat()
        for remaining in (1, 0):
            headers = await limiter.hit_key("k1", None, "GET /x")
            assert headers["X-RateLimit-Remaining"] == str(remaining)
        with pytest.raises(RateLimited):
            await limiter.hit_key("k1", None, "GET /x")
        stats = await admin.info("commandstats")
        called = {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}
        assert called.pop("evalsha") == 3, called  # one call per request (`limits` made two per policy)
        # Everything else Redis ran was inside the script (or this test's own INFO/CONFIG): nothing sent after it.
        assert set(called) <= {"time", "hmget", "hset", "pexpire", "config|resetstat", "info"}, called
    finally:
        await limiter.counters.aclose()
        await admin.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_the_script_is_loaded_again_after_redis_restarts(private_redis):
    limiter = redis_limiter(private_redis.url, "hk:")
    try:
        assert (await limiter.hit_key("k1", None, None))["X-RateLimit-Remaining"] == "4"
        private_redis.restart()  # empty: no script, no counts; the pooled connection is broken
        assert (await limiter.hit_key("k1", None, None))["X-RateLimit-Remaining"] == "4"
        assert limiter.breaker.snapshot().consecutive_failures == 0
    finally:
        await limiter.counters.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_concurrent_requests_share_calls_and_are_counted_exactly(private_redis):
    limiter = redis_limiter(private_redis.url, "hk:", default_per_hour=12)
    admin = Redis.from_url(private_redis.url)

    async def request() -> str:
        try:
            return (await limiter.hit_key("k1", None, None))["X-RateLimit-Remaining"]
        except RateLimited:
            return "refused"

    try:
        await limiter.hit_key("warm-up", None, None)
        await admin.config_resetstat()
        answers = await asyncio.gather(*(request() for _ in range(20)))
        assert sorted(answers) == sorted([str(n) for n in range(12)] + ["refused"] * 8)  # each once: no race
        calls = (await admin.info("commandstats"))["cmdstat_evalsha"]["calls"]
        assert calls < 20, calls  # those that came while a call was out went together in the next one
        # A request given up while waiting (client gone) leaves the others' answers alone.
        waiting = [asyncio.ensure_future(limiter.hit_key(f"k{n}", None, None)) for n in range(2, 6)]
        await asyncio.sleep(0)  # all four are waiting for their call now
        waiting[0].cancel()
        done = await asyncio.gather(*waiting, return_exceptions=True)
        assert isinstance(done[0], asyncio.CancelledError)
        assert [answer["X-RateLimit-Remaining"] for answer in done[1:]] == ["11"] * 3
    finally:
        await limiter.counters.aclose()
        await admin.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_failed_call_counts_once_against_the_breaker(private_redis):
    """The requests one call carried all fail open with it, but it is one Redis failure: one slow call under load
    does not open the breaker for everyone."""
    limiter = redis_limiter(private_redis.url, "hk:", timeout=0.2, fail_open=True)
    try:
        await limiter.hit_key("k1", None, None)  # connected, script loaded
        private_redis.pause()
        try:
            answers = await asyncio.gather(*(limiter.hit_key("k1", None, None) for _ in range(10)))
        finally:
            private_redis.resume()
        assert answers == [{}] * 10  # served without limits
        breaker = limiter.breaker.snapshot()
        assert breaker.consecutive_failures == 1 and breaker.state == "closed", breaker
        # Used again at once (Redis may have run the calls it was sent while paused: another key here).
        assert (await limiter.hit_key("k2", None, None))["X-RateLimit-Remaining"] == "4"
    finally:
        await limiter.counters.aclose()
