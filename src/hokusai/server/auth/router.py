"""/api/v1/keys: manage API keys over HTTP (admin scope)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, status

from hokusai.server.auth.dependencies import allow
from hokusai.server.auth.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyRevoked, ApiKeyView
from hokusai.server.deps import ApiKeys, Caller
from hokusai.server.errors import ErrorDetail

router = APIRouter(prefix="/api/v1/keys", tags=["api keys"], dependencies=[Depends(allow("keys:admin"))])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated)
async def create_key(body: ApiKeyCreate, caller: Caller, api_keys: ApiKeys) -> ApiKeyCreated:
    created = await api_keys.create(
        body.name, set(body.scopes), body.rate_limit_per_hour, body.expires_in_days, actor=caller
    )
    return ApiKeyCreated(**ApiKeyView.of(created.info).model_dump(), key=created.key)


@router.get("", response_model=list[ApiKeyView])
async def list_keys(api_keys: ApiKeys) -> list[ApiKeyView]:
    return [ApiKeyView.of(info) for info in await api_keys.list()]


@router.delete(
    "/{key_id}",
    response_model=ApiKeyRevoked,
    responses={
        404: {"model": ErrorDetail, "description": "No such key"},
        409: {"model": ErrorDetail, "description": "The last active admin key cannot be revoked"},
    },
)
async def revoke_key(key_id: str, caller: Caller, api_keys: ApiKeys) -> ApiKeyRevoked:
    info = await api_keys.revoke(key_id, actor=caller)
    return ApiKeyRevoked(message=f"API key {key_id} revoked", key=ApiKeyView.of(info))
