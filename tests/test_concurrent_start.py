"""Several processes starting at once on one fresh database: migrations and the first admin key (issue 14).

Processes, not threads: the races are between processes (each with its own connections and, on SQLite, its own
file handles), and a thread pool would serialise much of the work on the GIL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, text

from hokusai.server.auth.keys import Scope, generate_api_key, hash_api_key
from hokusai.server.auth.store import ApiKeyStore
from hokusai.server.config import ConfigurationError, Settings
from hokusai.server.db import Database, migration_status, require_migrated, run_migrations

pytestmark = pytest.mark.anyio

# Each child imports first, then waits for a common moment, so the racing part starts together.
MIGRATE = """
import sys, time
from hokusai.server.db import run_migrations
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
run_migrations(sys.argv[1])
"""

BOOTSTRAP = """
import asyncio, json, sys, time
from pathlib import Path
from hokusai.server.auth.service import ensure_admin_key
from hokusai.server.auth.store import ApiKeyStore
from hokusai.server.db import Database

async def main():
    database = Database(sys.argv[1])
    store = ApiKeyStore(database)
    await store.count()  # connect before the common moment
    supplied = sys.argv[4] or None
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    try:
        key = await ensure_admin_key(store, supplied, Path(sys.argv[3]))
    finally:
        await database.dispose()
    print(json.dumps({"key": key}))

asyncio.run(main())
"""


def _race(script: str, argument_lists: list[list[str]]) -> list[subprocess.CompletedProcess]:
    start_at = str(time.time() + 3.0)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, arguments[0], start_at, *arguments[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arguments in argument_lists
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def _versions(sync_dsn: str) -> list[str]:
    engine = create_engine(sync_dsn)
    try:
        with engine.connect() as connection:
            return list(connection.scalars(text("SELECT version_num FROM alembic_version")))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def fresh_settings(request, tmp_path) -> Settings:
    if request.param == "sqlite":
        return Settings(home=tmp_path)
    return Settings(home=tmp_path, database_url=request.getfixturevalue("postgres_url"))


def test_three_processes_migrate_one_fresh_database_at_once(fresh_settings):
    dsn = fresh_settings.database_dsn
    results = _race(MIGRATE, [[dsn]] * 3)
    for result in results:
        assert result.returncode == 0, result.stderr
    current, head = migration_status(dsn)
    assert current == head
    assert _versions(dsn) == [head]


def test_a_service_that_does_not_migrate_refuses_an_unmigrated_database(fresh_settings):
    with pytest.raises(ConfigurationError, match="hokusai db upgrade"):
        require_migrated(fresh_settings.database_dsn)
    run_migrations(fresh_settings.database_dsn)
    require_migrated(fresh_settings.database_dsn)


def _async_dsn(database: Database) -> str:
    return database.engine.url.render_as_string(hide_password=False)


@pytest.mark.parametrize("supplied", [False, True], ids=["generated", "supplied"])
async def test_five_processes_bootstrap_exactly_one_admin_key(database, tmp_path, supplied):
    key = generate_api_key() if supplied else ""
    key_files = [tmp_path / f"admin-key-{i}" for i in range(5)]
    results = _race(BOOTSTRAP, [[_async_dsn(database), str(path), key] for path in key_files])
    for result in results:
        assert result.returncode == 0, result.stderr
    returned = [json.loads(result.stdout.strip().splitlines()[-1])["key"] for result in results]
    store = ApiKeyStore(database)
    keys = await store.list()
    assert len(keys) == 1 and keys[0].scopes == {Scope.ADMIN}
    if supplied:
        assert returned == [None] * 5  # accepted by all, shown by none
        assert not any(path.exists() for path in key_files)
        assert (await store.find_by_hash(hash_api_key(key))).id == keys[0].id
    else:
        shown = [k for k in returned if k is not None]
        assert len(shown) == 1  # one process made the key and shows it; the others found it
        assert (await store.find_by_hash(hash_api_key(shown[0]))).id == keys[0].id
        written = [path for path in key_files if path.exists()]
        assert len(written) == 1 and written[0].read_text().strip() == shown[0]


async def test_runtime_without_migrate_on_start_refuses_a_fresh_database_and_names_the_command(tmp_path):
    from hokusai.server.runtime import Runtime

    settings = Settings(home=tmp_path, migrate_on_start=False, mlflow_url="http://127.0.0.1:9")
    with pytest.raises(ConfigurationError, match=r"hokusai db upgrade"):
        await Runtime.start(settings, lambda key, path: None)
    assert not (tmp_path / "hokusai.db").exists()  # asking created nothing


def test_serve_without_migrate_on_start_on_a_fresh_database_says_so_in_one_line(tmp_path):
    from tests.support import run_cli, service_environment

    env = service_environment(
        HOKUSAI_HOME=str(tmp_path), HOKUSAI_MIGRATE_ON_START="false", HOKUSAI_MLFLOW_URL="http://127.0.0.1:9"
    )
    refused = run_cli("serve", env=env)
    assert refused.returncode == 2, refused.stderr
    assert (
        refused.stderr.startswith("error: HOKUSAI_MIGRATE_ON_START is false") and "hokusai db upgrade" in refused.stderr
    )
    assert "Traceback" not in refused.stderr
