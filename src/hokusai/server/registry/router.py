"""/models/* (and /api/models/*): thin routes over RegistryService."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from hokusai.server.auth.dependencies import require_scope
from hokusai.server.auth.keys import Scope
from hokusai.server.auth.store import ApiKeyInfo
from hokusai.server.registry.schemas import (
    BatchRequest,
    BatchResponse,
    Message,
    ModelList,
    ModelVersionDetail,
    ModelVersionUpdate,
    ProductionList,
    RegisterRequest,
    RegisterResponse,
    StageTransition,
)
from hokusai.server.registry.service import RegistryService
from hokusai.server.runtime import get_runtime

router = APIRouter(tags=["models"])
read = require_scope(Scope.READ)
write = require_scope(Scope.WRITE)


def registry(request: Request) -> RegistryService:
    return get_runtime(request).registry


# Fixed segments first: `production` is never taken for a model name.
@router.get("/", response_model=ModelList, dependencies=[Depends(read)])
async def list_models(
    request: Request,
    name: str | None = Query(None, description="Only the versions of this model"),
    max_results: int = Query(100, ge=1, le=1000),
    page_token: str | None = Query(None),
) -> ModelList:
    return await registry(request).list_versions(name, max_results, page_token)


@router.post("/register", response_model=RegisterResponse, status_code=201)
async def register_model(
    body: RegisterRequest,
    request: Request,
    key: ApiKeyInfo = Depends(write),
    idempotency_key: str | None = Header(
        None, max_length=200, description="Retries with the same key get the first answer"
    ),
) -> RegisterResponse:
    return await registry(request).register(body, key.id, idempotency_key)


@router.post("/batch", response_model=BatchResponse)
async def batch_operations(body: BatchRequest, request: Request, key: ApiKeyInfo = Depends(write)) -> BatchResponse:
    """Every action changes the registry, so the batch needs `write`, as each operation would alone."""
    return await registry(request).run_batch(body.operations, body.stop_on_error, key.id)


@router.get("/production", response_model=ProductionList, dependencies=[Depends(read)])
async def production_models(request: Request) -> ProductionList:
    return ProductionList(models=await registry(request).production_versions())


@router.get("/{model_name}/{version}", response_model=ModelVersionDetail, dependencies=[Depends(read)])
async def get_model_version(model_name: str, version: str, request: Request) -> ModelVersionDetail:
    return await registry(request).get_version(model_name, version)


@router.patch("/{model_name}/{version}", response_model=ModelVersionDetail, dependencies=[Depends(write)])
async def update_model_version(
    model_name: str, version: str, update: ModelVersionUpdate, request: Request
) -> ModelVersionDetail:
    return await registry(request).update_version(model_name, version, update)


@router.delete("/{model_name}/{version}", response_model=Message, dependencies=[Depends(write)])
async def delete_model_version(model_name: str, version: str, request: Request) -> Message:
    return Message(message=await registry(request).delete_version(model_name, version))


@router.get(
    "/{model_name}/{version}/download",
    dependencies=[Depends(read)],
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}}},
)
async def download_model_version(model_name: str, version: str, request: Request) -> StreamingResponse:
    service = registry(request)
    plan = await service.download_plan(model_name, version)
    return StreamingResponse(
        service.download(plan),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{plan.filename}"'},
    )


@router.post("/{model_name}/{version}/transition", response_model=ModelVersionDetail)
async def transition_model_version(
    model_name: str, version: str, body: StageTransition, request: Request, key: ApiKeyInfo = Depends(write)
) -> ModelVersionDetail:
    return await registry(request).transition(model_name, version, body.stage, body.archive_existing, key.id)
