"""/models/* (and /api/models/*): thin routes over RegistryService (the analytics routes are analytics/router.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse

from hokusai.server.auth.dependencies import allow
from hokusai.server.deps import AccessPolicy, Caller, Registry
from hokusai.server.errors import InvalidRequest
from hokusai.server.registry.inputs import LIST_EXTRAS, MAX_NAME_LENGTH, MAX_PAGE_TOKEN_LENGTH, list_extras
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

read = allow("models:read")
write = allow("models:write")


async def list_models(
    caller: Caller,
    registry: Registry,
    policy: AccessPolicy,
    name: str | None = Query(None, max_length=MAX_NAME_LENGTH, description="Only the versions of this model"),
    max_results: int = Query(100, ge=1, le=1000),
    page_token: str | None = Query(None, max_length=MAX_PAGE_TOKEN_LENGTH, description="From the previous page"),
    include: list[str] = Query(
        [],
        max_length=10,
        description="`aliases`: each entry's aliases as well (costs a second MLflow call on a cold read)",
    ),
) -> ModelList:
    extras = list_extras(include)
    if unknown := extras - LIST_EXTRAS:
        raise InvalidRequest(f"Unknown include: {', '.join(sorted(unknown))} (known: {', '.join(sorted(LIST_EXTRAS))})")
    listed = await registry.list_versions(name, max_results, page_token, include_aliases="aliases" in extras)
    # The policy's listing hook (per-model rights would hide versions here); today every version is visible.
    listed.models = policy.visible(caller, "models:read", listed.models, lambda version: version.name)
    return listed


async def register_model(
    body: RegisterRequest,
    caller: Caller,
    registry: Registry,
    idempotency_key: str | None = Header(
        None, max_length=200, description="Retries with the same key get the first answer"
    ),
) -> RegisterResponse:
    return await registry.register(body, caller, idempotency_key)


async def batch_operations(body: BatchRequest, caller: Caller, registry: Registry) -> BatchResponse:
    """Every action changes the registry, so the batch needs `write`, as each operation would alone."""
    # The service asks the policy again for each operation, with its model.
    return await registry.run_batch(body.operations, body.stop_on_error, caller)


async def production_models(registry: Registry) -> ProductionList:
    return ProductionList(models=await registry.production_versions())


async def get_model_version(model_name: str, version: str, registry: Registry) -> ModelVersionDetail:
    return await registry.get_version(model_name, version)


async def update_model_version(
    model_name: str, version: str, update: ModelVersionUpdate, caller: Caller, registry: Registry
) -> ModelVersionDetail:
    return await registry.update_version(model_name, version, update, caller)


async def delete_model_version(model_name: str, version: str, caller: Caller, registry: Registry) -> Message:
    return Message(message=await registry.delete_version(model_name, version, caller))


async def download_model_version(model_name: str, version: str, registry: Registry) -> StreamingResponse:
    plan = await registry.download_plan(model_name, version)
    return StreamingResponse(
        registry.download(plan),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{plan.filename}"'},
    )


async def transition_model_version(
    model_name: str, version: str, body: StageTransition, caller: Caller, registry: Registry
) -> ModelVersionDetail:
    return await registry.transition(model_name, version, body.stage, body.archive_existing, caller)


def build_router(prefix: str) -> APIRouter:
    """The /models routes under `prefix` (`/models`, `/api/models`).

    One router per prefix, declared with it, rather than one router included twice: each route's own path is then
    the full template (`/api/models/register`), which rate-limit policies and metrics labels are keyed by.
    Fixed segments come first, so `production` or `register` is never taken for a model name.
    """
    router = APIRouter(tags=["models"])
    for path in (prefix + "/", prefix):  # `/models` is served too, not redirected (a 307 with an empty body)
        router.add_api_route(
            path,
            list_models,
            methods=["GET"],
            response_model=ModelList,
            dependencies=[Depends(read)],
            include_in_schema=path.endswith("/"),
        )
    router.add_api_route(
        prefix + "/register",
        register_model,
        methods=["POST"],
        response_model=RegisterResponse,
        status_code=201,
        dependencies=[Depends(write)],
    )
    router.add_api_route(
        prefix + "/batch",
        batch_operations,
        methods=["POST"],
        response_model=BatchResponse,
        dependencies=[Depends(write)],
    )
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
        dependencies=[Depends(write)],
    )
    return router
