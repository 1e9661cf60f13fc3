"""Settings: defaults, database URLs, and one-line errors that name the variable."""

from pathlib import Path

import pytest

from hokusai.server.config import ConfigurationError, Settings, load_settings
from tests.support import run_cli, service_environment


def test_defaults_keep_everything_under_home(monkeypatch):
    for name in ("HOKUSAI_HOME", "HOKUSAI_DATABASE_URL", "HOKUSAI_MLFLOW_URL", "HOKUSAI_REDIS_URL", "HOKUSAI_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.port == 8001 and settings.host == "127.0.0.1"
    assert settings.embedded_mlflow and settings.redis_url is None
    assert settings.database_dsn == f"sqlite:///{(Path('.hokusai') / 'hokusai.db').resolve()}"
    assert settings.async_database_dsn.startswith("sqlite+aiosqlite:///")
    assert settings.admin_key_path == Path(".hokusai") / "admin-key"


@pytest.mark.parametrize("url", ["postgresql://u@h/db", "postgres://u@h/db", "postgresql+psycopg://u@h/db"])
def test_postgres_urls_use_psycopg_for_both_engines(url):
    settings = Settings(database_url=url)
    assert settings.database_dsn == "postgresql+psycopg://u@h/db" == settings.async_database_dsn
    assert settings.database_kind == "postgresql"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HOKUSAI_PORT", "eighty"),
        ("HOKUSAI_PORT", "70000"),
        ("HOKUSAI_DATABASE_URL", "mysql://root@localhost/db"),
        ("HOKUSAI_MLFLOW_URL", "not a url"),
        ("HOKUSAI_REDIS_URL", "http://localhost:6379"),
        ("HOKUSAI_ENVIRONMENT", "moon"),
        ("HOKUSAI_MLFLOW_TIMEOUT", "-1"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    message = str(raised.value)
    assert message.startswith(f"{variable}: ") and "\n" not in message


def test_secret_values_are_not_echoed_in_errors(monkeypatch):
    monkeypatch.setenv("HOKUSAI_BOOTSTRAP_ADMIN_KEY", "x" * 10)
    monkeypatch.setenv("HOKUSAI_PORT", "0")
    with pytest.raises(ConfigurationError):
        load_settings()
    monkeypatch.setenv("HOKUSAI_PORT", "8001")
    assert load_settings().bootstrap_admin_key.get_secret_value() == "x" * 10


def test_serve_refuses_to_start_with_one_line(tmp_path):
    result = run_cli("serve", env=service_environment(HOKUSAI_HOME=str(tmp_path), HOKUSAI_PORT="eighty"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: HOKUSAI_PORT: "), result.stderr


PRODUCTION_READY = {
    "HOKUSAI_DATABASE_URL": "postgresql+psycopg://u:secret@db/hokusai",
    "HOKUSAI_REDIS_URL": "redis://redis:6379/0",
    "HOKUSAI_MLFLOW_URL": "http://mlflow:5000",
}


@pytest.mark.parametrize(
    ("unset", "database_url"),
    [
        ({"HOKUSAI_DATABASE_URL"}, None),
        (set(), "sqlite:////var/lib/hokusai.db"),
        ({"HOKUSAI_REDIS_URL"}, None),
        ({"HOKUSAI_MLFLOW_URL"}, None),
        (set(PRODUCTION_READY), None),
    ],
)
def test_production_refuses_sqlite_no_redis_and_embedded_mlflow(monkeypatch, unset, database_url):
    monkeypatch.setenv("HOKUSAI_ENVIRONMENT", "production")
    for name, value in PRODUCTION_READY.items():
        monkeypatch.setenv(name, value)
    for name in unset:
        monkeypatch.delenv(name)
    if database_url is not None:
        monkeypatch.setenv("HOKUSAI_DATABASE_URL", database_url)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    message = str(raised.value)
    assert message.startswith("HOKUSAI_ENVIRONMENT: production needs ") and "\n" not in message
    named = {name for name in PRODUCTION_READY if name in message}
    assert named == (unset | ({"HOKUSAI_DATABASE_URL"} if database_url else set())), message
    assert "secret" not in message


def test_production_starts_with_postgres_redis_and_external_mlflow(monkeypatch):
    monkeypatch.setenv("HOKUSAI_ENVIRONMENT", "production")
    for name, value in PRODUCTION_READY.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.environment == "production" and settings.database_kind == "postgresql"
    for environment in ("development", "staging"):  # the other profiles keep SQLite and the embedded MLflow
        assert load_settings(environment=environment, database_url=None, redis_url=None, mlflow_url=None)


def test_redis_prefix_defaults_to_the_database_without_its_password(monkeypatch, tmp_path):
    monkeypatch.delenv("HOKUSAI_REDIS_PREFIX", raising=False)
    one = Settings(database_url="postgresql://u:one@db/hokusai").redis_key_prefix
    assert one == Settings(database_url="postgresql+psycopg://u:two@db/hokusai").redis_key_prefix
    assert one.startswith("hokusai:") and one.endswith(":") and len(one) == len("hokusai:") + 12 + 1
    assert one != Settings(database_url="postgresql://u:one@db/other").redis_key_prefix
    assert Settings(home=tmp_path / "a").redis_key_prefix != Settings(home=tmp_path / "b").redis_key_prefix
    monkeypatch.setenv("HOKUSAI_REDIS_PREFIX", "tenant-a:")
    assert load_settings().redis_key_prefix == "tenant-a:"


def test_serve_in_production_with_nothing_else_exits_2_naming_the_variables(tmp_path):
    env = service_environment(HOKUSAI_HOME=str(tmp_path), HOKUSAI_ENVIRONMENT="production")
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: HOKUSAI_ENVIRONMENT: production needs "), result.stderr
    for name in PRODUCTION_READY:
        assert name in lines[0]
    assert not (tmp_path / "hokusai.db").exists()
