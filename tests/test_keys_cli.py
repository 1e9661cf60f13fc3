"""`hokusai keys` and `hokusai db` operate on the database directly; their keys work against the server."""

from __future__ import annotations

import json

import httpx

from tests.support import run_cli, service_environment


def test_create_list_revoke_round_trip(service):
    created = service.cli(
        "keys",
        "create",
        "--name",
        "cli key",
        "--scopes",
        "read,write",
        "--rate-limit-per-hour",
        "100",
        "--expires-in-days",
        "30",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    assert {"id", "key", "prefix", "scopes", "rate_limit_per_hour", "expires_at"} <= body.keys()
    assert body["scopes"] == ["read", "write"] and body["rate_limit_per_hour"] == 100
    assert body["key"].startswith("hk_live_")

    with httpx.Client(base_url=service.base_url, headers={"X-API-Key": body["key"]}) as client:
        assert client.get("/api/v1/keys").status_code == 403  # valid key, but not admin

    listed = service.cli("keys", "list", "--json")
    assert listed.returncode == 0
    assert body["key"] not in listed.stdout and body["key"][12:] not in listed.stdout
    assert any(item["id"] == body["id"] for item in json.loads(listed.stdout))
    human = service.cli("keys", "list")
    assert body["id"] in human.stdout and body["key"] not in human.stdout

    revoked = service.cli("keys", "revoke", body["id"])
    assert revoked.returncode == 0 and body["id"] in revoked.stdout
    assert service.cli("keys", "revoke", "key_unknown").returncode == 1


def test_test_keys_and_bad_scopes(tmp_path):
    env = service_environment(HOKUSAI_HOME=str(tmp_path))
    assert run_cli("db", "upgrade", env=env).returncode == 0
    created = run_cli("keys", "create", "--name", "t", "--test", "--json", env=env)
    assert json.loads(created.stdout)["key"].startswith("hk_test_")
    bad = run_cli("keys", "create", "--name", "t", "--scopes", "read,root", env=env)
    assert bad.returncode == 1 and "unknown scope" in bad.stderr


def test_db_upgrade_on_a_fresh_home(tmp_path):
    result = run_cli("db", "upgrade", env=service_environment(HOKUSAI_HOME=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hokusai.db").exists()


def test_key_commands_refuse_a_home_without_a_database(tmp_path):
    """Issue 12: `hokusai keys create` outside the server's HOME made a new database and a key no server knew."""
    env = service_environment(HOKUSAI_HOME=str(tmp_path / "elsewhere"))
    refused = run_cli("keys", "create", "--name", "stray", env=env)
    assert refused.returncode == 2
    assert "no Hokusai database at" in refused.stderr and "HOKUSAI_HOME" in refused.stderr
    assert not (tmp_path / "elsewhere" / "hokusai.db").exists()
    assert run_cli("contributions", "rebuild", env=env).returncode == 2


def test_key_commands_find_the_server_home_from_a_subdirectory(tmp_path):
    """Without HOKUSAI_HOME, the nearest .hokusai holding a database (here or above) is the server's HOME."""
    env = {k: v for k, v in service_environment().items() if k != "HOKUSAI_HOME"}
    made = run_cli("db", "upgrade", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    subdirectory = tmp_path / "a" / "b"
    subdirectory.mkdir(parents=True)
    created = run_cli("keys", "create", "--name", "from below", "--json", env=env, cwd=subdirectory)
    assert created.returncode == 0, created.stderr
    listed = run_cli("keys", "list", "--json", env=env, cwd=tmp_path)
    assert json.loads(created.stdout)["id"] in {item["id"] for item in json.loads(listed.stdout)}
    assert not (subdirectory / ".hokusai").exists()
