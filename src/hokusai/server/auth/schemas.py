"""Request and response bodies of /api/v1/keys."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from hokusai.server.auth.keys import Scope
from hokusai.server.auth.store import MAX_RATE_LIMIT_PER_HOUR, ApiKeyInfo


class ApiKeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    scopes: list[Scope] = Field(default_factory=lambda: [Scope.READ], min_length=1, max_length=len(Scope))
    rate_limit_per_hour: int | None = Field(
        None, ge=1, le=MAX_RATE_LIMIT_PER_HOUR, description="null = the service default"
    )
    expires_in_days: int | None = Field(None, ge=1, le=3650)


class ApiKeyView(BaseModel):
    id: str
    name: str
    prefix: str
    scopes: list[Scope]
    rate_limit_per_hour: int | None
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, info: ApiKeyInfo) -> ApiKeyView:
        return cls(
            id=info.id,
            name=info.name,
            prefix=info.prefix,
            scopes=sorted(info.scopes, key=lambda s: s.rank),
            rate_limit_per_hour=info.rate_limit_per_hour,
            created_at=info.created_at,
            expires_at=info.expires_at,
            last_used_at=info.last_used_at,
            revoked_at=info.revoked_at,
        )


class ApiKeyCreated(ApiKeyView):
    key: str = Field(description="The key itself. Shown once: only its hash is stored.")


class ApiKeyRevoked(BaseModel):
    message: str
    key: ApiKeyView
