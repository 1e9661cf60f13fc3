"""Single-flight cache fills: when a registry answer is missing from the cache (first read, expiry), concurrent
readers of that key share one MLflow call instead of each making their own; in one process, and with Redis in
every process of the deployment. An error is shared with those waiting, not kept; a write starts a new generation
whose readers never wait for a fetch begun before it; a filler that died holds no one up beyond a bounded wait."""

from __future__ import annotations

import asyncio
import http.server
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import httpx
import pytest
from redis.asyncio import Redis

from hokusai.server.registry.cache import RegistryReadCache
from tests.support import mlflow_model_with_versions

API = "/api/2.0/mlflow"
READERS = 12


class Upstream:
    """A fetch that counts its calls and answers once released (or raises `error`)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.entered = asyncio.Event()  # set at the first call
        self.error = error

    async def __call__(self) -> dict:
        self.calls += 1
        call = self.calls
        self.entered.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return {"answer": call}


async def settle() -> None:
    """Let every task run up to its next real wait (no I/O here: a bounded number of loop turns)."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.anyio
async def test_concurrent_misses_of_one_key_share_one_fetch():
    cache, upstream = RegistryReadCache(30), Upstream()
    readers = [asyncio.create_task(cache.fill("models", upstream)) for _ in range(READERS)]
    await settle()
    upstream.release.set()
    assert await asyncio.gather(*readers) == [{"answer": 1}] * READERS
    assert upstream.calls == 1
    assert await cache.fill("models", upstream) == {"answer": 1} and upstream.calls == 1  # kept


@pytest.mark.anyio
async def test_without_single_flight_each_miss_fetches():
    """HOKUSAI_CACHE_SINGLE_FLIGHT=false: the behaviour before (what a benchmark compares against)."""
    cache, upstream = RegistryReadCache(30, single_flight=False), Upstream()
    readers = [asyncio.create_task(cache.fill("models", upstream)) for _ in range(READERS)]
    await settle()
    upstream.release.set()
    await asyncio.gather(*readers)
    assert upstream.calls == READERS


@pytest.mark.anyio
async def test_an_error_is_shared_with_the_waiters_and_not_kept():
    cache, failing = RegistryReadCache(30), Upstream(error=LookupError("MLflow said no"))
    readers = [asyncio.create_task(cache.fill("models", failing)) for _ in range(READERS)]
    await settle()
    failing.release.set()
    outcomes = await asyncio.gather(*readers, return_exceptions=True)
    assert all(isinstance(o, LookupError) for o in outcomes) and failing.calls == 1
    working = Upstream()
    working.release.set()
    assert await cache.fill("models", working) == {"answer": 1} and working.calls == 1  # asked again


@pytest.mark.anyio
async def test_a_reader_after_a_write_does_not_wait_for_a_fetch_begun_before_it():
    cache, before = RegistryReadCache(30), Upstream()
    early = asyncio.create_task(cache.fill("models", before))
    await settle()
    await cache.invalidate()  # a write
    after = Upstream()
    after.release.set()
    assert await cache.fill("models", after) == {"answer": 1} and after.calls == 1
    before.release.set()
    assert await early == {"answer": 1}  # its own (older) answer, to the reader that asked before the write
    unused = Upstream()
    assert await cache.fill("models", unused) == {"answer": 1} and unused.calls == 0  # the newer one was kept


@pytest.mark.anyio
async def test_a_waiter_that_goes_away_does_not_cancel_the_fill_of_the_others():
    cache, upstream = RegistryReadCache(30), Upstream()
    first = asyncio.create_task(cache.fill("models", upstream))
    second = asyncio.create_task(cache.fill("models", upstream))
    await settle()
    first.cancel()  # its client disconnected
    await settle()
    upstream.release.set()
    assert await second == {"answer": 1} and upstream.calls == 1
    assert first.cancelled()


# --- across processes, with Redis -------------------------------------------------------------------------------


@pytest.fixture
async def shared_redis(redis_url):
    """A client of the machine's Redis and a prefix of this test; what it wrote is deleted at the end."""
    client = Redis.from_url(redis_url)
    prefix = f"test-flight-{secrets.token_hex(4)}:"
    yield client, prefix
    keys = [key async for key in client.scan_iter(f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_two_processes_on_one_redis_share_one_fetch(shared_redis):
    client, prefix = shared_redis
    # Two caches on one Redis with one prefix: two service processes of one deployment.
    first, second = RegistryReadCache(30, client, prefix=prefix), RegistryReadCache(30, client, prefix=prefix)
    upstream = Upstream()
    readers = [asyncio.create_task(cache.fill("models", upstream)) for cache in (first, second) * (READERS // 2)]
    deadline = time.monotonic() + 30
    while not (upstream.calls and first._flights and second._flights):  # both processes are filling or waiting
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    upstream.release.set()
    assert await asyncio.gather(*readers) == [{"answer": 1}] * READERS
    assert upstream.calls == 1


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_filler_that_died_holding_the_lock_delays_the_others_only_for_the_bounded_wait(shared_redis):
    client, prefix = shared_redis
    cache = RegistryReadCache(30, client, prefix=prefix, fill_wait=0.3)
    generation = await cache.generation()
    # What a process leaves behind when it dies between taking the fill lock and storing the entry.
    await client.set(f"{prefix}registry-cache:fill:{generation}:models", "dead", px=60_000)
    upstream = Upstream()
    upstream.release.set()
    assert await cache.fill("models", upstream) == {"answer": 1} and upstream.calls == 1


@pytest.mark.redis
@pytest.mark.anyio
async def test_when_the_filler_fails_a_waiting_process_fetches_at_once(shared_redis):
    client, prefix = shared_redis
    first, second = RegistryReadCache(30, client, prefix=prefix), RegistryReadCache(30, client, prefix=prefix)
    failing = Upstream(error=LookupError("MLflow said no"))
    filling = asyncio.create_task(first.fill("models", failing))
    await failing.entered.wait()
    working = Upstream()
    working.release.set()
    waiting = asyncio.create_task(second.fill("models", working))
    await asyncio.sleep(0.1)  # waiting on the first's lock (were it not, the assertions below hold all the same)
    failing.release.set()
    with pytest.raises(LookupError):
        await filling
    assert await waiting == {"answer": 1} and working.calls == 1  # its lock released: no wait for the expiry


# --- over HTTP: upstream calls counted in front of the real MLflow ---------------------------------------------


class CountingMlflow:
    """A pass-through in front of the real MLflow that counts the model-version reads reaching it, by model name,
    and holds each a little so that concurrent readers overlap; `every` counts every call, by method and path."""

    def __init__(self, mlflow_url: str, hold: float = 0.5) -> None:
        self.searches: Counter[str] = Counter()
        self.every: Counter[str] = Counter()
        lock = threading.Lock()
        counter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with lock:
                    counter.every[f"{self.command} {self.path.split('?')[0]}"] += 1
                if self.path.startswith(f"{API}/model-versions/"):
                    with lock:
                        counter.searches[unquote(self.path)] += 1
                    time.sleep(hold)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                answer = httpx.request(self.command, mlflow_url + self.path, content=body, headers=headers, timeout=30)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def calls_about(self, name: str) -> int:
        return sum(count for path, count in self.searches.items() if f"'{name}'" in path or f"={name}&" in path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def counting_mlflow(mlflow_server):
    upstream = CountingMlflow(mlflow_server.url)
    yield upstream
    upstream.close()


@pytest.fixture
def model_name(mlflow_server) -> str:
    """A model with two versions, made in MLflow."""
    return mlflow_model_with_versions(mlflow_server.url, "flight")


def read_at_once(services: list, paths: list[str]) -> list[httpx.Response]:
    """Every path read at the same time, spread over the services."""
    clients = [service.client(service.admin_key) for service in services]
    try:
        with ThreadPoolExecutor(len(paths)) as pool:
            return list(pool.map(lambda i: clients[i % len(clients)].get(paths[i]), range(len(paths))))
    finally:
        for client in clients:
            client.close()


def test_concurrent_reads_of_a_cold_key_make_one_mlflow_call(start_service, counting_mlflow, model_name):
    service = start_service(mlflow_url=counting_mlflow.url, registry_cache_ttl="30")
    answers = read_at_once([service], [f"/models/?name={model_name}"] * READERS)
    assert [a.status_code for a in answers] == [200] * READERS
    assert all(len(a.json()["models"]) == 2 for a in answers)
    assert counting_mlflow.calls_about(model_name) == 1, counting_mlflow.searches

    gets = read_at_once([service], [f"/models/{model_name}/2"] * READERS)
    assert {a.json()["version"] for a in gets} == {"2"}
    assert counting_mlflow.calls_about(model_name) == 2, counting_mlflow.searches


@pytest.mark.redis
def test_concurrent_reads_across_two_processes_make_one_mlflow_call(
    start_service, counting_mlflow, model_name, redis_url
):
    prefix = f"test-flight-{secrets.token_hex(4)}:"  # one deployment (each test service has its own database)
    shared = {"mlflow_url": counting_mlflow.url, "registry_cache_ttl": "30", "redis_url": redis_url}
    services = [start_service(redis_prefix=prefix, **shared), start_service(redis_prefix=prefix, **shared)]
    try:
        answers = read_at_once(services, [f"/models/?name={model_name}"] * READERS)
        assert [a.status_code for a in answers] == [200] * READERS
        assert all(len(a.json()["models"]) == 2 for a in answers)
        assert counting_mlflow.calls_about(model_name) == 1, counting_mlflow.searches
    finally:
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
