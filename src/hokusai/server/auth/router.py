"""/api/v1/keys: manage API keys over HTTP (admin scope)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, status

from hokusai.server.auth.dependencies import require_scope
from hokusai.server.auth.keys import Scope
from hokusai.server.auth.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyRevoked, ApiKeyView
from hokusai.server.errors import ErrorDetail
from hokusai.server.runtime import get_runtime

router = APIRouter(prefix="/api/v1/keys", tags=["api keys"], dependencies=[Depends(require_scope(Scope.ADMIN))])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated)
async def create_key(body: ApiKeyCreate, request: Request) -> ApiKeyCreated:
    created = await get_runtime(request).api_keys.create(
        body.name, set(body.scopes), body.rate_limit_per_hour, body.expires_in_days
    )
    return ApiKeyCreated(**ApiKeyView.of(created.info).model_dump(), key=created.key)


@router.get("", response_model=list[ApiKeyView])
async def list_keys(request: Request) -> list[ApiKeyView]:
    return [ApiKeyView.of(info) for info in await get_runtime(request).api_keys.list()]


@router.delete(
    "/{key_id}",
    response_model=ApiKeyRevoked,
    responses={
        404: {"model": ErrorDetail, "description": "No such key"},
        409: {"model": ErrorDetail, "description": "The last active admin key cannot be revoked"},
    },
)
async def revoke_key(key_id: str, request: Request) -> ApiKeyRevoked:
    info = await get_runtime(request).api_keys.revoke(key_id)
    return ApiKeyRevoked(message=f"API key {key_id} revoked", key=ApiKeyView.of(info))
