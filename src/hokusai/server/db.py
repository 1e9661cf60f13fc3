"""The service's own database: one async engine for the server, Alembic migrations for the schema.

SQLite by default, PostgreSQL in production; the same migrations serve both.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import DateTime, TypeDecorator, create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.pool import NullPool

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


class Base(DeclarativeBase):
    """Declarative base of every table the service owns."""


class Database:
    """Async engine and session factory for the life of the app."""

    def __init__(self, async_dsn: str) -> None:
        # A server may drop idle connections (pinged before use); a SQLite file cannot, and the ping is a round trip
        # through aiosqlite's thread on every checkout.
        pre_ping = not async_dsn.startswith("sqlite")
        self.engine: AsyncEngine = create_async_engine(async_dsn, pool_pre_ping=pre_ping, **engine_options(async_dsn))
        if async_dsn.startswith("sqlite"):
            event.listen(self.engine.sync_engine, "connect", sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> AsyncSession:
        return self.sessions()

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


def engine_options(dsn: str) -> dict:
    if dsn.startswith("sqlite"):
        # Several processes (server, CLI) may write: wait for the lock instead of failing at once.
        return {"connect_args": {"timeout": 15}}
    return {"pool_size": 10, "max_overflow": 10, "connect_args": {"connect_timeout": 5}}


def sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers proceed while the CLI or another process writes. With WAL, synchronous=NORMAL keeps every
    # commit through a killed process (kill -9: the WAL is in the OS's hands) and skips the fsync per commit that
    # FULL pays (~1 ms, on every DSPy execution record); only an OS crash or power loss can take the last commits.
    # SQLite is the single-machine default; production runs on PostgreSQL, whose commits are fully durable.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def ensure_sqlite_directory(sync_dsn: str) -> None:
    if sync_dsn.startswith("sqlite:///"):
        path = sync_dsn.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)


# PostgreSQL advisory lock ids (one bigint namespace per database cluster): "hokusai" in ASCII, then a suffix.
MIGRATION_LOCK_ID = 0x686F6B75736169_01
BOOTSTRAP_LOCK_ID = 0x686F6B75736169_02


def _alembic_config(sync_dsn: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", sync_dsn.replace("%", "%%"))
    return config


def _sqlite_path(sync_dsn: str) -> str | None:
    """The file of a SQLite DSN, None for an in-memory database (or another backend)."""
    if not sync_dsn.startswith("sqlite:///"):
        return None
    path = sync_dsn.removeprefix("sqlite:///").split("?", 1)[0]
    return path if path and path != ":memory:" else None


@contextmanager
def migration_lock(sync_dsn: str) -> Iterator[None]:
    """Hold the database's migration lock: one process at a time migrates, the others wait, then find it done.

    PostgreSQL: a session advisory lock on a connection of its own, held until the block ends (and freed by the
    server if the process dies). SQLite: an exclusive `flock` on `<database file>.migrate.lock` (freed by the
    kernel likewise). An in-memory SQLite database belongs to one process and needs none.
    """
    if sync_dsn.startswith("postgresql"):
        engine = create_engine(sync_dsn, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
                connection.commit()
                try:
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
                    connection.commit()
        finally:
            engine.dispose()
        return
    path = _sqlite_path(sync_dsn)
    if path is None:
        yield
        return
    with open(f"{path}.migrate.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_migrations(sync_dsn: str, revision: str = "head") -> None:
    """Bring the schema to `revision` (blocking: call it from a worker thread in async code).

    Safe when several processes start at once on one database: the upgrade runs under `migration_lock`.
    """
    ensure_sqlite_directory(sync_dsn)
    with migration_lock(sync_dsn):
        command.upgrade(_alembic_config(sync_dsn), revision)


def migration_status(sync_dsn: str) -> tuple[str | None, str]:
    """Blocking: (the database's Alembic revision or None, the code's head revision). Creates nothing."""
    head = ScriptDirectory.from_config(_alembic_config(sync_dsn)).get_current_head() or ""
    if not is_migrated(sync_dsn):
        return None, head
    engine = create_engine(sync_dsn, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision(), head
    finally:
        engine.dispose()


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


def require_migrated(sync_dsn: str) -> None:
    """Blocking: raise ConfigurationError unless the database is at the code's head revision (for a service started
    with HOKUSAI_MIGRATE_ON_START=false, whose deployment migrates in a step of its own)."""
    from hokusai.server.config import ConfigurationError

    try:
        current, head = migration_status(sync_dsn)
    except SQLAlchemyError as exc:
        raise ConfigurationError(f"HOKUSAI_MIGRATE_ON_START is false and the database cannot be read: {exc}") from None
    if current != head:
        found = f"at revision {current}" if current else "not migrated"
        raise ConfigurationError(
            f"HOKUSAI_MIGRATE_ON_START is false and the database is {found} (this version needs {head}): "
            "run `hokusai db upgrade` first, or set HOKUSAI_MIGRATE_ON_START=true"
        )


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
