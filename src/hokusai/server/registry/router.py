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

read = require_scope(Scope.READ)
write = require_scope(Scope.WRITE)


def registry(request: Request) -> RegistryService:
    return get_runtime(request).registry


async def list_models(
    request: Request,
    name: str | None = Query(None, description="Only the versions of this model"),
    max_results: int = Query(100, ge=1, le=1000),
    page_token: str | None = Query(None),
) -> ModelList:
    return await registry(request).list_versions(name, max_results, page_token)


async def register_model(
    body: RegisterRequest,
    request: Request,
    key: ApiKeyInfo = Depends(write),
    idempotency_key: str | None = Header(
        None, max_length=200, description="Retries with the same key get the first answer"
    ),
) -> RegisterResponse:
    return await registry(request).register(body, key.id, idempotency_key)


async def batch_operations(body: BatchRequest, request: Request, key: ApiKeyInfo = Depends(write)) -> BatchResponse:
    """Every action changes the registry, so the batch needs `write`, as each operation would alone."""
    return await registry(request).run_batch(body.operations, body.stop_on_error, key.id)


async def production_models(request: Request) -> ProductionList:
    return ProductionList(models=await registry(request).production_versions())


async def get_model_version(model_name: str, version: str, request: Request) -> ModelVersionDetail:
    return await registry(request).get_version(model_name, version)


async def update_model_version(
    model_name: str, version: str, update: ModelVersionUpdate, request: Request
) -> ModelVersionDetail:
    return await registry(request).update_version(model_name, version, update)


async def delete_model_version(model_name: str, version: str, request: Request) -> Message:
    return Message(message=await registry(request).delete_version(model_name, version))


async def download_model_version(model_name: str, version: str, request: Request) -> StreamingResponse:
    service = registry(request)
    plan = await service.download_plan(model_name, version)
    return StreamingResponse(
        service.download(plan),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{plan.filename}"'},
    )


async def transition_model_version(
    model_name: str, version: str, body: StageTransition, request: Request, key: ApiKeyInfo = Depends(write)
) -> ModelVersionDetail:
    return await registry(request).transition(model_name, version, body.stage, body.archive_existing, key.id)


def build_router(prefix: str) -> APIRouter:
    """The /models routes under `prefix` (`/models`, `/api/models`).

    One router per prefix, declared with it, rather than one router included twice: each route's own path is then
    the full template (`/api/models/register`), which rate-limit policies and metrics labels are keyed by.
    Fixed segments come first, so `production` or `register` is never taken for a model name.
    """
    router = APIRouter(tags=["models"])
    router.add_api_route(
        prefix + "/", list_models, methods=["GET"], response_model=ModelList, dependencies=[Depends(read)]
    )
    router.add_api_route(
        prefix + "/register", register_model, methods=["POST"], response_model=RegisterResponse, status_code=201
    )
    router.add_api_route(prefix + "/batch", batch_operations, methods=["POST"], response_model=BatchResponse)
    router.add_api_route(
        prefix + "/production",
        production_models,
        methods=["GET"],
        response_model=ProductionList,
        dependencies=[Depends(read)],
    )
    router.add_api_route(
        prefix + "/{model_name}/{version}",
        get_model_version,
        methods=["GET"],
        response_model=ModelVersionDetail,
        dependencies=[Depends(read)],
    )
    router.add_api_route(
        prefix + "/{model_name}/{version}",
        update_model_version,
        methods=["PATCH"],
        response_model=ModelVersionDetail,
        dependencies=[Depends(write)],
    )
    router.add_api_route(
        prefix + "/{model_name}/{version}",
        delete_model_version,
        methods=["DELETE"],
        response_model=Message,
        dependencies=[Depends(write)],
    )
    router.add_api_route(
        prefix + "/{model_name}/{version}/download",
        download_model_version,
        methods=["GET"],
        dependencies=[Depends(read)],
        response_class=StreamingResponse,
        responses={200: {"content": {"application/zip": {}}}},
    )
    router.add_api_route(
        prefix + "/{model_name}/{version}/transition",
        transition_model_version,
        methods=["POST"],
        response_model=ModelVersionDetail,
    )
    return router
