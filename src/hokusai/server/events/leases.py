"""Named leases: jobs that one service process at a time runs (the reconciler, the stream publisher).

A lease is a row (name, owner, expires_at). `acquire` takes it when it is free, expired, or already ours, with one
conditional UPDATE (or the INSERT that creates it), so two processes never both hold it; the holder renews it by
acquiring again before it runs out. On PostgreSQL the times come from the database's clock.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, or_, update
from sqlalchemy.exc import IntegrityError

from hokusai.server.db import Database, utcnow
from hokusai.server.events.models import NamedLeaseRow


class NamedLease:
    def __init__(self, database: Database, name: str, owner: str, seconds: float) -> None:
        self.name = name
        self.owner = owner
        self.seconds = seconds
        self._database = database
        self._postgres = database.engine.dialect.name == "postgresql"

    def _now(self) -> Any:
        return func.now() if self._postgres else utcnow()

    def _until(self) -> Any:
        return self._now() + timedelta(seconds=self.seconds)

    async def acquire(self) -> bool:
        """Whether this process holds the lease now (taken or renewed for another `seconds`)."""
        async with self._database.session() as session, session.begin():
            taken = await session.execute(
                update(NamedLeaseRow)
                .where(NamedLeaseRow.name == self.name)
                .where(or_(NamedLeaseRow.owner == self.owner, NamedLeaseRow.expires_at < self._now()))
                .values(owner=self.owner, expires_at=self._until())
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount:
                return True
        try:
            async with self._database.session() as session, session.begin():
                session.add(
                    NamedLeaseRow(
                        name=self.name, owner=self.owner, expires_at=utcnow() + timedelta(seconds=self.seconds)
                    )
                )
        except IntegrityError:
            return False  # another process holds it (or created it a moment ago)
        return True

    async def release(self) -> None:
        async with self._database.session() as session, session.begin():
            await session.execute(
                delete(NamedLeaseRow).where(NamedLeaseRow.name == self.name, NamedLeaseRow.owner == self.owner)
            )
