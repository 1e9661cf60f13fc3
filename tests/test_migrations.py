"""The migrations build the schema the ORM models describe, on SQLite and PostgreSQL: a table, column, index or
foreign key added to a model without its migration (or the reverse) fails here, not in production."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from hokusai.server.db import Base, run_migrations
from hokusai.server.tables import import_all_models


def differences(sync_dsn: str) -> list:
    run_migrations(sync_dsn)
    import_all_models()
    engine = create_engine(sync_dsn, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": False})
            return [
                change
                for change in compare_metadata(context, Base.metadata)
                # Alembic's own table is not a model.
                if not (change[0] == "remove_table" and change[1].name == "alembic_version")
            ]
    finally:
        engine.dispose()


def test_sqlite_schema_matches_the_models(tmp_path):
    assert differences(f"sqlite:///{tmp_path / 'schema.db'}") == []


@pytest.mark.postgres
def test_postgresql_schema_matches_the_models(postgres_url):
    assert differences(postgres_url) == []
