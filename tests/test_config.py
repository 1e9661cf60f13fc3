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
