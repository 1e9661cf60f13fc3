"""ApiKeyStore and the migrations, on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import inspect

from hokusai.server.auth.keys import Scope, generate_api_key, hash_api_key
from hokusai.server.auth.service import ApiKeyService, ensure_admin_key
from hokusai.server.auth.store import ApiKeyNotFound, ApiKeyStore, LastAdminKey
from hokusai.server.config import Settings
from hokusai.server.db import Database, run_migrations
from hokusai.server.errors import InvalidApiKey, InvalidRequest

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_settings(request, tmp_path) -> Settings:
    if request.param == "sqlite":
        return Settings(home=tmp_path)
    return Settings(home=tmp_path, database_url=request.getfixturevalue("postgres_url"))


@pytest.fixture
async def store(database_settings):
    run_migrations(database_settings.database_dsn)
    database = Database(database_settings.async_database_dsn)
    yield ApiKeyStore(database)
    await database.dispose()


async def test_migrations_create_the_schema_and_are_idempotent(database_settings, store):
    run_migrations(database_settings.database_dsn)  # a second run changes nothing
    async with store._database.engine.connect() as connection:
        tables, indexes = await connection.run_sync(
            lambda sync: (inspect(sync).get_table_names(), inspect(sync).get_indexes("api_keys"))
        )
    assert {"api_keys", "alembic_version"} <= set(tables)
    assert any(index["unique"] and index["column_names"] == ["key_hash"] for index in indexes)


async def test_create_find_list_revoke(store):
    created = await store.create(
        "ci", {Scope.READ, Scope.WRITE}, rate_limit_per_hour=10, expires_in=timedelta(days=1), kind="test"
    )
    assert created.key.startswith("hk_test_")
    info = await store.find_by_hash(hash_api_key(created.key))
    assert info == created.info
    assert info.scopes == {Scope.READ, Scope.WRITE} and info.rate_limit_per_hour == 10
    assert info.created_at.tzinfo is not None and info.expires_at > info.created_at
    assert [item.id for item in await store.list()] == [info.id]
    revoked = await store.revoke(info.id)
    assert revoked.revoked_at is not None
    again = await store.revoke(info.id)
    assert again.revoked_at == revoked.revoked_at
    with pytest.raises(ApiKeyNotFound):
        await store.revoke("key_missing")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": " ", "scopes": {Scope.READ}},
        {"name": "x", "scopes": set()},
        {"name": "x", "scopes": {Scope.READ}, "rate_limit_per_hour": 0},
        {"name": "x", "scopes": {Scope.READ}, "rate_limit_per_hour": 2**31},  # beyond the INTEGER column
        {"name": "x" * 201, "scopes": {Scope.READ}},
        {"name": "x", "scopes": {Scope.READ}, "expires_in": timedelta(seconds=-1)},
        {"name": "x", "scopes": {Scope.READ}, "key": "hk_live_nope"},
    ],
)
async def test_invalid_keys_are_refused_and_nothing_is_stored(store, kwargs):
    with pytest.raises(InvalidRequest):
        await store.create(**kwargs)
    assert await store.count() == 0


async def test_service_caches_by_hash_and_forgets_on_revoke(store):
    now = [0.0]
    service = ApiKeyService(store, cache_ttl=5, clock=lambda: now[0])
    created = await store.create("cached", {Scope.READ})
    first = await service.authenticate(created.key)
    assert first.last_used_at is None  # recorded in the database, the cached copy is the one read before
    assert (await store.get(created.info.id)).last_used_at is not None
    await service.revoke(created.info.id)
    with pytest.raises(InvalidApiKey):
        await service.authenticate(created.key)
    with pytest.raises(InvalidApiKey):
        await service.authenticate(generate_api_key())


async def test_bootstrap_creates_one_admin_key_only_on_an_empty_database(store, tmp_path):
    key_file = tmp_path / "admin-key"
    key = await ensure_admin_key(store, None, key_file)
    assert key is not None and key_file.read_text().strip() == key
    assert key_file.stat().st_mode & 0o777 == 0o600
    info = await store.find_by_hash(hash_api_key(key))
    assert info.scopes == {Scope.ADMIN}
    assert await ensure_admin_key(store, None, key_file) is None
    assert await store.count() == 1


async def test_bootstrap_with_a_supplied_key_writes_nothing(store, tmp_path):
    supplied = generate_api_key()
    assert await ensure_admin_key(store, supplied, tmp_path / "admin-key") is None
    assert not (tmp_path / "admin-key").exists()
    assert (await store.find_by_hash(hash_api_key(supplied))).scopes == {Scope.ADMIN}


async def test_the_last_active_admin_key_cannot_be_revoked(store):
    reader = await store.create("reader", {Scope.READ})
    expired_admin = await store.create("expired admin", {Scope.ADMIN}, expires_in=timedelta(seconds=1))
    first = await store.create("first admin", {Scope.ADMIN, Scope.READ})
    second = await store.create("second admin", {Scope.ADMIN})
    await asyncio.sleep(1.1)  # the expired admin key no longer counts as an admin
    assert (await store.revoke(first.info.id)).revoked_at is not None
    with pytest.raises(LastAdminKey) as refused:
        await store.revoke(second.info.id)
    assert refused.value.status_code == 409
    assert (await store.get(second.info.id)).revoked_at is None
    assert (await store.revoke(expired_admin.info.id)).revoked_at is not None  # not active: no admin lost
    assert (await store.revoke(reader.info.id)).revoked_at is not None
    assert (await store.revoke(first.info.id)).revoked_at is not None  # revoking again is still fine


async def test_concurrent_revocations_keep_one_admin_key(store):
    for _ in range(5):
        admins = [await store.create(f"admin {n}", {Scope.ADMIN}) for n in range(2)]
        outcomes = await asyncio.gather(*(store.revoke(a.info.id) for a in admins), return_exceptions=True)
        assert sorted(type(outcome).__name__ for outcome in outcomes) == ["ApiKeyInfo", "LastAdminKey"], outcomes
        active = [info for info in await store.list() if info.revoked_at is None]
        assert len(active) == 1
        # leave no admin behind for the next round: a fresh pair starts it
        await store.create("spare", {Scope.ADMIN})
        await store.revoke(active[0].id)
        spare = [info for info in await store.list() if info.revoked_at is None]
        assert len(spare) == 1
        await _revoke_directly(store, spare[0].id)


async def _revoke_directly(store, key_id: str) -> None:
    """Revoke without the last-admin rule, to reset the table between rounds."""
    from sqlalchemy import update

    from hokusai.server.auth.models import ApiKeyRow
    from hokusai.server.db import utcnow

    async with store._database.session() as session, session.begin():
        await session.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(revoked_at=utcnow()))
