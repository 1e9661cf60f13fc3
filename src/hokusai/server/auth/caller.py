"""Caller: who is making a request, once identified (by an API key, sent in a header or through a browser session)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hokusai.server.auth.keys import Scope
from hokusai.server.auth.store import ApiKeyInfo

CallerKind = Literal["api_key"]
# How the key reached us: in the request ("key") or through the browser session it signed in ("session").
Credential = Literal["key", "session"]


@dataclass(frozen=True)
class Caller:
    """The identified caller: what authorization, rate limits and the record of a write need to know of it."""

    id: str  # the API key's id for kind "api_key"
    name: str
    scopes: frozenset[Scope]
    kind: CallerKind = "api_key"
    rate_limit_per_hour: int | None = None
    address: str | None = None  # the client address the request came from
    via: Credential = "key"

    @property
    def key_id(self) -> str | None:
        """The API key that made the request (what transition records and executions keep), if a key did."""
        return self.id if self.kind == "api_key" else None

    @classmethod
    def of_key(cls, info: ApiKeyInfo, address: str | None = None, via: Credential = "key") -> Caller:
        return cls(
            id=info.id,
            name=info.name,
            scopes=info.scopes,
            kind="api_key",
            rate_limit_per_hour=info.rate_limit_per_hour,
            address=address,
            via=via,
        )
