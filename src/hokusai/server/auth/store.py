"""ApiKeyStore: create, find, list and revoke API keys in the service database."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import String, cast, exists, func, insert, literal, or_, select, text, update
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from hokusai.server.auth.keys import (
    KeyKind,
    Scope,
    display_prefix,
    generate_api_key,
    hash_api_key,
    is_well_formed,
)
from hokusai.server.auth.models import ApiKeyRow
from hokusai.server.db import BOOTSTRAP_LOCK_ID, Database, utcnow
from hokusai.server.errors import Conflict, InvalidRequest, NotFound

# rate_limit_per_hour is an INTEGER column: 32 bits on PostgreSQL. Anything above cannot be stored (and an hour
# has far fewer requests in it anyway).
MAX_RATE_LIMIT_PER_HOUR = 2**31 - 1


@dataclass(frozen=True)
class ApiKeyInfo:
    """What the service knows about a key, without the key."""

    id: str
    name: str
    prefix: str
    scopes: frozenset[Scope]
    rate_limit_per_hour: int | None
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    def is_active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    @classmethod
    def from_row(cls, row: ApiKeyRow) -> ApiKeyInfo:
        return cls(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            scopes=frozenset(Scope(s) for s in row.scopes),
            rate_limit_per_hour=row.rate_limit_per_hour,
            created_at=row.created_at,
            expires_at=row.expires_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
        )


@dataclass(frozen=True)
class CreatedApiKey:
    """A new key: the only moment its plaintext exists on the server."""

    info: ApiKeyInfo
    key: str


class ApiKeyNotFound(NotFound):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"API key not found: {key_id}")


class LastAdminKey(Conflict):
    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"API key {key_id} is the last active admin key: create another admin key before revoking this one"
        )


def _active_admin(now: datetime, table: type[ApiKeyRow] = ApiKeyRow) -> ColumnElement[bool]:
    """SQL for "an unrevoked, unexpired key with the admin scope", the same on SQLite and PostgreSQL.

    Scopes are stored as a JSON array of scope names (`["admin", "read"]`); matching the quoted name in its
    text is exact because the names come from a closed set.
    """
    return (
        table.revoked_at.is_(None)
        & or_(table.expires_at.is_(None), table.expires_at > now)
        & cast(table.scopes, String).like(f'%"{Scope.ADMIN.value}"%')
    )


class ApiKeyStore:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def create(
        self,
        name: str,
        scopes: set[Scope],
        rate_limit_per_hour: int | None = None,
        expires_in: timedelta | None = None,
        kind: KeyKind = "live",
        key: str | None = None,
    ) -> CreatedApiKey:
        """Store a new key; `key` imports a given plaintext (the operator's bootstrap key) instead of generating one."""
        if not name.strip():
            raise InvalidRequest("API key name must not be empty")
        if not scopes:
            raise InvalidRequest("An API key needs at least one scope")
        if rate_limit_per_hour is not None and not 1 <= rate_limit_per_hour <= MAX_RATE_LIMIT_PER_HOUR:
            raise InvalidRequest(f"rate_limit_per_hour must be an integer from 1 to {MAX_RATE_LIMIT_PER_HOUR}")
        if len(name.strip()) > ApiKeyRow.name.type.length:
            raise InvalidRequest(f"API key name must be at most {ApiKeyRow.name.type.length} characters")
        if expires_in is not None and expires_in <= timedelta(0):
            raise InvalidRequest("expiry must be in the future")
        if key is not None and not is_well_formed(key):
            raise InvalidRequest("The given key is not a well-formed hk_live_/hk_test_ key (prefix, length, checksum)")
        plaintext = key or generate_api_key(kind)
        row = self._new_row(name, scopes, plaintext, rate_limit_per_hour, expires_in)
        async with self._database.session() as session, session.begin():
            session.add(row)
        return CreatedApiKey(info=ApiKeyInfo.from_row(row), key=plaintext)

    async def create_first(self, name: str, scopes: set[Scope], key: str | None = None) -> CreatedApiKey | None:
        """Store a key only if the table has none (the first-start admin key); None when a key exists already.

        Race-free across processes: the emptiness check and the insert are one `INSERT ... SELECT ... WHERE NOT
        EXISTS` statement. On SQLite a statement runs under the database's write lock; on PostgreSQL the
        transaction first takes an advisory lock, so a second process waits, then sees the first one's row.
        """
        if key is not None and not is_well_formed(key):
            raise InvalidRequest("The given key is not a well-formed hk_live_/hk_test_ key (prefix, length, checksum)")
        plaintext = key or generate_api_key("live")
        row = self._new_row(name, scopes, plaintext, None, None)
        columns = ["id", "name", "prefix", "key_hash", "scopes", "created_at"]
        values = [literal(getattr(row, column), type_=getattr(ApiKeyRow, column).type) for column in columns]
        statement = (
            insert(ApiKeyRow)
            .from_select(columns, select(*values).where(~exists(select(ApiKeyRow.id))))
            .execution_options(preserve_rowcount=True)  # an INSERT's rowcount is only kept when asked for
        )
        async with self._database.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                await connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": BOOTSTRAP_LOCK_ID})
            inserted = (await connection.execute(statement)).rowcount
        if inserted != 1:
            return None
        return CreatedApiKey(info=ApiKeyInfo.from_row(row), key=plaintext)

    @staticmethod
    def _new_row(
        name: str,
        scopes: set[Scope],
        plaintext: str,
        rate_limit_per_hour: int | None,
        expires_in: timedelta | None,
    ) -> ApiKeyRow:
        now = utcnow()
        return ApiKeyRow(
            id="key_" + secrets.token_hex(8),
            name=name.strip(),
            prefix=display_prefix(plaintext),
            key_hash=hash_api_key(plaintext),
            scopes=sorted(s.value for s in scopes),
            rate_limit_per_hour=rate_limit_per_hour,
            created_at=now,
            expires_at=now + expires_in if expires_in else None,
        )

    async def find_by_hash(self, key_hash: str) -> ApiKeyInfo | None:
        async with self._database.session() as session:
            row = await session.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == key_hash))
            return ApiKeyInfo.from_row(row) if row else None

    async def get(self, key_id: str) -> ApiKeyInfo:
        async with self._database.session() as session:
            row = await session.get(ApiKeyRow, key_id)
            if row is None:
                raise ApiKeyNotFound(key_id)
            return ApiKeyInfo.from_row(row)

    async def list(self) -> list[ApiKeyInfo]:
        async with self._database.session() as session:
            rows = await session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id))
            return [ApiKeyInfo.from_row(row) for row in rows]

    async def count(self) -> int:
        async with self._database.session() as session:
            return int(await session.scalar(select(func.count()).select_from(ApiKeyRow)) or 0)

    async def revoke(self, key_id: str) -> ApiKeyInfo:
        """Revoke a key; revoking it again keeps the first revocation time. The last active admin key stays
        (LastAdminKey, 409): without it nobody could manage keys over HTTP any more.

        Race-safe: two revocations of the last two admin keys cannot both succeed. On PostgreSQL the active admin
        rows are locked (in id order, so concurrent revocations queue instead of deadlocking) before counting;
        on SQLite, which has no row locks, the count is a subquery of the one UPDATE statement, and a statement
        runs under the database's write lock.
        """
        now = utcnow()
        async with self._database.session() as session, session.begin():
            await session.execute(
                select(ApiKeyRow.id).where(_active_admin(now)).order_by(ApiKeyRow.id).with_for_update()
            )
            row = await session.get(ApiKeyRow, key_id, with_for_update=True, populate_existing=True)
            if row is None:
                raise ApiKeyNotFound(key_id)
            if row.revoked_at is not None:
                return ApiKeyInfo.from_row(row)
            condition = (ApiKeyRow.id == key_id) & ApiKeyRow.revoked_at.is_(None)
            if ApiKeyInfo.from_row(row).is_active(now) and Scope.ADMIN.value in row.scopes:
                other = aliased(ApiKeyRow)  # an alias: the subquery must count the table, not correlate to the row
                active_admins = select(func.count()).select_from(other).where(_active_admin(now, other))
                condition = condition & (active_admins.scalar_subquery() > 1)
            result = await session.execute(
                update(ApiKeyRow).where(condition).values(revoked_at=now).execution_options(synchronize_session=False)
            )
            await session.refresh(row)
            if result.rowcount == 0 and row.revoked_at is None:
                raise LastAdminKey(key_id)
            return ApiKeyInfo.from_row(row)

    async def mark_used(self, key_id: str, when: datetime) -> None:
        async with self._database.session() as session, session.begin():
            await session.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=when))
