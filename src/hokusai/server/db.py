"""The service's own database: one async engine for the server, Alembic migrations for the schema.

SQLite by default, PostgreSQL in production; the same migrations serve both.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import DateTime, TypeDecorator, create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


class Base(DeclarativeBase):
    """Declarative base of every table the service owns."""


class Database:
    """Async engine and session factory for the life of the app."""

    def __init__(self, async_dsn: str) -> None:
        self.engine: AsyncEngine = create_async_engine(async_dsn, pool_pre_ping=True, **_engine_options(async_dsn))
        if async_dsn.startswith("sqlite"):
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> AsyncSession:
        return self.sessions()

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


def _engine_options(dsn: str) -> dict:
    if dsn.startswith("sqlite"):
        # Several processes (server, CLI) may write: wait for the lock instead of failing at once.
        return {"connect_args": {"timeout": 15}}
    return {"pool_size": 10, "max_overflow": 10, "connect_args": {"connect_timeout": 5}}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers proceed while the CLI or another process writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def ensure_sqlite_directory(sync_dsn: str) -> None:
    if sync_dsn.startswith("sqlite:///"):
        path = sync_dsn.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def run_migrations(sync_dsn: str, revision: str = "head") -> None:
    """Bring the schema to `revision` (blocking: call it from a worker thread in async code)."""
    ensure_sqlite_directory(sync_dsn)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", sync_dsn.replace("%", "%%"))
    command.upgrade(config, revision)


def is_migrated(sync_dsn: str) -> bool:
    """Blocking: whether a server already made this database (Alembic's version table is there). A SQLite file that
    does not exist is not created by asking."""
    if sync_dsn.startswith("sqlite:///"):
        path = sync_dsn.removeprefix("sqlite:///")
        if path != ":memory:" and not Path(path).is_file():
            return False
    engine = create_engine(sync_dsn)
    try:
        with engine.connect() as connection:
            return inspect(connection).has_table("alembic_version")
    except SQLAlchemyError:
        return False
    finally:
        engine.dispose()


class UtcDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite forgets the zone; this puts it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)
