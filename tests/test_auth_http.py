"""Authentication over HTTP against a running `hokusai serve`: every key form, every 401/403, revocation, expiry,
and that no plaintext key is kept in the database or the logs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import datetime, timedelta

import httpx
import pytest

from hokusai.server.auth.keys import Scope, generate_api_key
from hokusai.server.auth.store import ApiKeyStore
from hokusai.server.config import Settings
from hokusai.server.db import Database

KEYS_URL = "/api/v1/keys"
MISSING = {"detail": "API key required"}
INVALID = {"detail": "Invalid or expired API key"}


def create_key(service, **body) -> dict:
    with service.client(service.admin_key) as client:
        response = client.post(KEYS_URL, json={"name": "test key", **body})
    assert response.status_code == 201, response.text
    return response.json()


def assert_unauthorized(response: httpx.Response, body: dict) -> None:
    assert response.status_code == 401, response.text
    assert response.json() == body
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.fixture(scope="module")
def admin_client(service):
    with service.client(service.admin_key) as client:
        yield client


def test_every_accepted_form_of_the_key(service):
    key = create_key(service, scopes=["admin"])["key"]
    forms = [
        {"headers": {"Authorization": f"Bearer {key}"}},
        {"headers": {"Authorization": f"bearer {key}"}},
        {"headers": {"Authorization": f"ApiKey {key}"}},
        {"headers": {"X-API-Key": key}},
        {"params": {"api_key": key}},
    ]
    with httpx.Client(base_url=service.base_url) as client:
        for form in forms:
            response = client.get(KEYS_URL, **form)
            assert response.status_code == 200, (form, response.text)
            deprecated = "params" in form
            assert ("deprecation" in response.headers) is deprecated
            assert ("warning" in response.headers) is deprecated


def test_missing_key(service):
    with httpx.Client(base_url=service.base_url) as client:
        assert_unauthorized(client.get(KEYS_URL), MISSING)
        assert_unauthorized(client.get(KEYS_URL, headers={"Authorization": "Bearer"}), MISSING)
        assert_unauthorized(client.get(KEYS_URL, headers={"Authorization": "Basic dXNlcjpwYXNz"}), MISSING)


def test_unknown_malformed_and_typo_keys_look_the_same(service):
    real = create_key(service)["key"]
    typo = real[:-1] + ("A" if real[-1] != "A" else "B")
    candidates = [generate_api_key(), "hk_live_short", "not-a-key", typo, real.replace("hk_live_", "hk_test_")]
    with httpx.Client(base_url=service.base_url) as client:
        for candidate in candidates:
            assert_unauthorized(client.get(KEYS_URL, headers={"X-API-Key": candidate}), INVALID)


def test_scope_is_enforced_with_403(service):
    read_key = create_key(service, scopes=["read"])["key"]
    write_key = create_key(service, scopes=["write"])["key"]
    for key in (read_key, write_key):
        with service.client(key) as client:
            response = client.get(KEYS_URL)
            assert response.status_code == 403
            assert response.json() == {"detail": "This API key lacks the 'admin' scope"}


def test_revocation_takes_effect_on_the_next_request(service, admin_client):
    created = create_key(service, scopes=["admin"])
    with service.client(created["key"]) as client:
        assert client.get(KEYS_URL).status_code == 200  # now cached in the server
        revoked = admin_client.delete(f"{KEYS_URL}/{created['id']}")
        assert revoked.status_code == 200
        assert revoked.json()["key"]["revoked_at"] is not None
        assert_unauthorized(client.get(KEYS_URL), INVALID)
    assert admin_client.delete(f"{KEYS_URL}/key_doesnotexist").status_code == 404


def test_revocation_from_another_process_takes_effect_within_the_cache_ttl(service):
    created = create_key(service, scopes=["admin"])
    with service.client(created["key"]) as client:
        assert client.get(KEYS_URL).status_code == 200
        result = service.cli("keys", "revoke", created["id"])
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 30  # the service under test caches keys for 1 s
        while client.get(KEYS_URL).status_code == 200:
            assert time.monotonic() < deadline, "revocation by the CLI never reached the server"
            time.sleep(0.2)
        assert_unauthorized(client.get(KEYS_URL), INVALID)


def test_expired_key_is_refused(service):
    settings = Settings(home=service.home)

    async def create_short_lived() -> str:
        database = Database(settings.async_database_dsn)
        try:
            created = await ApiKeyStore(database).create("short", {Scope.ADMIN}, expires_in=timedelta(seconds=2))
        finally:
            await database.dispose()
        return created.key

    key = asyncio.run(create_short_lived())
    with service.client(key) as client:
        assert client.get(KEYS_URL).status_code == 200
        time.sleep(2.2)
        assert_unauthorized(client.get(KEYS_URL), INVALID)


def test_key_management_over_http(service, admin_client):
    response = admin_client.post(
        KEYS_URL, json={"name": "ci", "scopes": ["read", "write"], "rate_limit_per_hour": 50, "expires_in_days": 7}
    )
    assert response.status_code == 201
    created = response.json()
    assert created["key"].startswith("hk_live_") and created["prefix"] == created["key"][:12]
    assert created["scopes"] == ["read", "write"] and created["rate_limit_per_hour"] == 50
    assert created["expires_at"] is not None and created["revoked_at"] is None

    listed = admin_client.get(KEYS_URL).json()
    mine = next(item for item in listed if item["id"] == created["id"])
    assert "key" not in mine and "key_hash" not in mine
    assert created["key"] not in json.dumps(listed)
    assert mine["last_used_at"] is None  # never presented yet

    with service.client(created["key"]) as client:
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/models/", params={"name": "no-such-model"}).status_code == 200
    listed = admin_client.get(KEYS_URL).json()
    # last_used_at is recorded when the server reads the key (at most once per cache period).
    used = next(item for item in listed if item["id"] == created["id"])
    assert used["last_used_at"] is not None
    assert datetime.fromisoformat(used["last_used_at"]) >= datetime.fromisoformat(created["created_at"])


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "x", "scopes": ["root"]},
        {"name": "x", "scopes": []},
        {"name": "x", "rate_limit_per_hour": 0},
        {"name": "x", "expires_in_days": 0},
        {},
    ],
)
def test_invalid_key_requests_are_422(admin_client, body):
    response = admin_client.post(KEYS_URL, json=body)
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], list)


def test_no_plaintext_key_in_database_or_logs(service, admin_client):
    created = create_key(service, scopes=["admin"])
    key = created["key"]
    with httpx.Client(base_url=service.base_url) as client:
        client.get(KEYS_URL, headers={"Authorization": f"Bearer {key}"})
        client.get(KEYS_URL, params={"api_key": key})
        client.get(f"/nowhere?api_key={key}")
        client.get(KEYS_URL, headers={"X-API-Key": key[:-1] + "x"})  # a near-miss must not be logged either
    time.sleep(0.3)
    logs = service.logs()
    assert "GET /api/v1/keys 200" in logs  # the requests were logged, without their keys
    for secret in (key, key[8:], service.admin_key, service.admin_key[8:], key[:-1] + "x"):
        assert secret not in logs
    stored = stored_bytes(service.home)
    assert created["prefix"].encode() in stored  # the display prefix is kept ...
    assert key.encode() not in stored and key[12:].encode() not in stored  # ... the rest of the key is not
    assert service.admin_key.encode() not in stored


def stored_bytes(home) -> bytes:
    """Every byte of the service database's files (with its WAL and shared memory), read by another process: an
    open and close of those files in this one would drop the POSIX locks that SQLite holds on them here (the
    in-process service's connections), after which SQLite in this process answers "disk I/O error", even on other
    databases, for the rest of the test session."""
    read = (
        "import pathlib, sys; "
        "sys.stdout.buffer.write(b''.join(p.read_bytes() for p in pathlib.Path(sys.argv[1]).glob('hokusai.db*')))"
    )
    return subprocess.run([sys.executable, "-c", read, str(home)], capture_output=True, check=True).stdout
