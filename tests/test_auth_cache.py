"""ApiKeyService's cache of validated keys: trusted for its TTL, never past the key's own expiry."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from hokusai.server.auth.keys import Scope
from hokusai.server.auth.service import ApiKeyService
from hokusai.server.auth.store import ApiKeyStore
from hokusai.server.config import Settings
from hokusai.server.db import Database, run_migrations
from hokusai.server.errors import InvalidApiKey

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path):
    settings = Settings(home=tmp_path)
    run_migrations(settings.database_dsn)
    database = Database(settings.async_database_dsn)
    yield ApiKeyStore(database)
    await database.dispose()


async def test_a_cached_key_is_refused_once_it_expires(store):
    service = ApiKeyService(store, cache_ttl=3600)
    created = await store.create("short-lived", {Scope.READ}, expires_in=timedelta(seconds=1.5))
    assert (await service.authenticate(created.key)).id == created.info.id
    assert (await service.authenticate(created.key)).id == created.info.id  # from the cache
    await asyncio.sleep(1.6)  # past the key's expiry, well within the cache's hour
    with pytest.raises(InvalidApiKey):
        await service.authenticate(created.key)


async def test_a_key_revoked_elsewhere_is_refused_after_the_ttl(store):
    clock = FakeClock()
    service = ApiKeyService(store, cache_ttl=5, clock=clock)
    created = await store.create("revoked elsewhere", {Scope.READ})
    await service.authenticate(created.key)
    await store.revoke(created.info.id)  # another process: this one's cache does not know yet
    clock.now += 4
    assert (await service.authenticate(created.key)).id == created.info.id
    clock.now += 1
    with pytest.raises(InvalidApiKey):
        await service.authenticate(created.key)
    with pytest.raises(InvalidApiKey):  # and it is not remembered as valid on the way out
        await service.authenticate(created.key)


async def test_a_malformed_key_is_refused_without_a_lookup(store):
    service = ApiKeyService(store, cache_ttl=5)
    looked_up = []

    async def before_lookup() -> None:
        looked_up.append(True)

    for presented in ("", "hk_live_short", "hk_live_" + "A" * 38):
        with pytest.raises(InvalidApiKey):
            await service.authenticate(presented, before_lookup=before_lookup)
    assert looked_up == []


class CountingStore(ApiKeyStore):
    """The real store, counting the reads and writes authentication makes."""

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        self.reads = self.writes = 0

    async def find_by_hash(self, key_hash: str):
        self.reads += 1
        return await super().find_by_hash(key_hash)

    async def mark_used(self, key_id: str, when):
        self.writes += 1
        return await super().mark_used(key_id, when)


async def test_requests_in_flight_share_one_read_when_the_entry_expires(store):
    counting = CountingStore(store._database)
    clock = FakeClock()
    service = ApiKeyService(counting, cache_ttl=5, clock=clock)
    created = await store.create("busy", {Scope.READ})
    answers = await asyncio.gather(*(service.authenticate(created.key) for _ in range(12)))
    assert {info.id for info in answers} == {created.info.id}
    assert (counting.reads, counting.writes) == (1, 1)
    clock.now += 5  # expired: the next burst reads it once again
    await asyncio.gather(*(service.authenticate(created.key) for _ in range(12)))
    assert (counting.reads, counting.writes) == (2, 2)
    unknown = created.key[:-8] + "A" * 8  # well formed or not, never remembered
    refused = await asyncio.gather(*(service.authenticate(unknown) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(error, InvalidApiKey) for error in refused)
