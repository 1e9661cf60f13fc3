"""Settings: one typed object, read from HOKUSAI_* environment variables.

Code receives a `Settings`; nothing else in the server reads `os.environ`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AnyHttpUrl, Field, RedisDsn, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "HOKUSAI_"
_SECRET_FIELDS = {"bootstrap_admin_key"}


class ConfigurationError(Exception):
    """A setting has a value the service cannot start with; the message is one line naming the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    home: Path = Field(Path(".hokusai"), description="Where the embedded database, MLflow store and admin key live")
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=1, le=65535)
    environment: Literal["development", "test", "staging", "production"] = "development"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    database_url: str | None = Field(
        None, description="sqlite:/// or postgresql+psycopg:// URL; default: SQLite in HOME"
    )
    redis_url: RedisDsn | None = None

    mlflow_url: AnyHttpUrl | None = Field(None, description="External MLflow server; unset starts an embedded one")
    mlflow_port: int = Field(0, ge=0, le=65535, description="Loopback port of the embedded MLflow; 0 picks a free one")
    mlflow_timeout: float = Field(30.0, gt=0, description="Seconds for one call to MLflow")
    mlflow_startup_timeout: float = Field(120.0, gt=0)

    bootstrap_admin_key: SecretStr | None = None
    auth_cache_ttl: float = Field(5.0, ge=0, description="Seconds a validated key is trusted without a database read")
    health_check_timeout: float = Field(2.0, gt=0)

    git_commit: str | None = None
    build_date: str | None = None

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme.split("+", 1)[0] not in {"sqlite", "postgresql", "postgres"}:
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return value

    @property
    def database_dsn(self) -> str:
        """Synchronous SQLAlchemy URL (Alembic, CLI)."""
        if self.database_url is None:
            return f"sqlite:///{(self.home / 'hokusai.db').resolve()}"
        scheme, rest = self.database_url.split("://", 1)
        if scheme.startswith("sqlite"):
            return f"sqlite://{rest}"
        # psycopg 3 serves both the sync and the async engine under one dialect name.
        return f"postgresql+psycopg://{rest}"

    @property
    def async_database_dsn(self) -> str:
        dsn = self.database_dsn
        if dsn.startswith("sqlite://"):
            return "sqlite+aiosqlite://" + dsn.removeprefix("sqlite://")
        return dsn

    @property
    def database_kind(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.database_dsn.startswith("sqlite") else "postgresql"

    @property
    def embedded_mlflow(self) -> bool:
        return self.mlflow_url is None

    @property
    def admin_key_path(self) -> Path:
        return self.home / "admin-key"


def load_settings(**overrides: object) -> Settings:
    """Read the environment; a bad value raises ConfigurationError naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        shown = "" if field in _SECRET_FIELDS else f" (got {first.get('input')!r})"
        raise ConfigurationError(f"{ENV_PREFIX}{field.upper()}: {first['msg']}{shown}") from None
