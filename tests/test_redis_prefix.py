"""HOKUSAI_REDIS_PREFIX: services sharing one Redis see each other's keys only when they share the prefix (by default,
when they share their database), and every key a service writes starts with its prefix."""

from __future__ import annotations

import asyncio
import re
import secrets

import pytest
import redis
from redis.asyncio import Redis

from hokusai.server.config import load_settings
from hokusai.server.ratelimit.service import RateLimited
from hokusai.server.registry.cache import RegistryReadCache
from hokusai.server.registry.locks import ModelLocks
from hokusai.server.runtime import build_rate_limiter

pytestmark = pytest.mark.redis


def unique_prefix() -> str:
    return f"test-{secrets.token_hex(4)}:"


async def delete_prefixed(client: Redis, *prefixes: str) -> None:
    """Remove what a test wrote under its prefixes (db 15 is shared by the suite)."""
    for prefix in prefixes:
        keys = [key async for key in client.scan_iter(f"{prefix}*")]
        if keys:
            await client.delete(*keys)


@pytest.mark.anyio
async def test_caches_with_different_prefixes_do_not_see_each_other(redis_url):
    client = Redis.from_url(redis_url)
    one, two = unique_prefix(), unique_prefix()
    first, second = RegistryReadCache(60, client, prefix=one), RegistryReadCache(60, client, prefix=two)
    try:
        generation = await first.generation()
        await first.put("models", generation, {"models": ["a"]})
        assert await first.get("models", generation) == {"models": ["a"]}
        assert await second.get("models", await second.generation()) is None
        await second.invalidate()  # a write through the other service does not drop this one's entries
        assert await first.generation() == generation
        assert await first.get("models", generation) == {"models": ["a"]}
        assert [key async for key in client.scan_iter(f"{one}*")]
        assert [key async for key in client.scan_iter(f"{two}*")] == [f"{two}registry-cache:generation".encode()]
    finally:
        await delete_prefixed(client, one, two)
        await client.aclose()


@pytest.mark.anyio
async def test_rate_limit_counts_are_kept_per_prefix(redis_url):
    one, two = unique_prefix(), unique_prefix()
    limiters = [
        build_rate_limiter(load_settings(redis_url=redis_url, redis_prefix=prefix, rate_limit_default_per_hour=2))
        for prefix in (one, two)
    ]
    key_id = f"key-{secrets.token_hex(3)}"
    client = Redis.from_url(redis_url)
    try:
        for _ in range(2):
            await limiters[0].hit_key(key_id, None, None)
        with pytest.raises(RateLimited):
            await limiters[0].hit_key(key_id, None, None)
        headers = await limiters[1].hit_key(key_id, None, None)  # the same key id, another service: its own count
        assert headers["X-RateLimit-Remaining"] == "1"
        written = [key.decode() async for key in client.scan_iter(f"*{key_id}*")]
        assert written and all(key.startswith((one, two)) for key in written), written
        assert any(key.startswith(one) for key in written) and any(key.startswith(two) for key in written)
    finally:
        await delete_prefixed(client, one, two)
        await client.aclose()


@pytest.mark.anyio
async def test_model_locks_are_kept_per_prefix(redis_url):
    one, two = unique_prefix(), unique_prefix()
    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url)]
    first, second = ModelLocks(clients[0], prefix=one), ModelLocks(clients[1], wait=1.0, prefix=two)
    name = f"lock-{secrets.token_hex(3)}"
    try:
        async with first.hold(name):
            held = [key.decode() async for key in clients[0].scan_iter(f"{one}*")]
            assert len(held) == 1 and held[0].startswith(f"{one}model-lock:")
            async with asyncio.timeout(0.5), second.hold(name):  # another service's model of that name: no wait
                pass
        assert [key async for key in clients[0].scan_iter(f"{one}*")] == []  # released
    finally:
        for client in clients:
            await client.aclose()


@pytest.mark.parametrize("prefix", [None, "tenant-a:"])
def test_every_key_the_service_writes_starts_with_its_prefix(start_service, mlflow_server, private_redis, prefix):
    """A Redis of this test alone: after requests through the API and the gateway, SCAN sees only prefixed keys."""
    options = {"redis_prefix": prefix} if prefix else {}
    service = start_service(mlflow_url=mlflow_server.url, redis_url=private_redis.url, **options)
    with service.client(service.admin_key) as admin:
        created = admin.post("/api/v1/keys", json={"name": "prefixed", "scopes": ["read"]})
        assert created.status_code == 201, created.text
    with service.client(created.json()["key"]) as client:
        for _ in range(2):
            assert client.get("/models/").status_code == 200
            assert client.get("/mlflow/api/2.0/mlflow/experiments/search?max_results=1").status_code == 200
    with service.client("hk_not_a_key") as stranger:
        assert stranger.get("/models/").status_code == 401
    keys = [key.decode() for key in redis.Redis.from_url(private_redis.url).scan_iter("*")]
    assert len(keys) >= 3, keys  # cache generation and entries, rate limit counters
    pattern = re.escape(prefix) if prefix else r"hokusai:[0-9a-f]{12}:"
    assert all(re.match(pattern, key) for key in keys), keys
    assert any("registry-cache" in key for key in keys) and any("ratelimit" in key for key in keys), keys
