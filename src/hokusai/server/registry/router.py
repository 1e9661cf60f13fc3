"""/models/* (and /api/models/*): thin routes over RegistryService."""

from __future__ import annotations

from datetime import date

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from hokusai.server.auth.dependencies import require_scope
from hokusai.server.auth.keys import Scope
from hokusai.server.auth.store import ApiKeyInfo
from hokusai.server.errors import InvalidRequest
from hokusai.server.registry.analytics import ModelAnalytics
from hokusai.server.registry.inputs import MAX_NAME_LENGTH, MAX_PAGE_TOKEN_LENGTH, MAX_SQL_INTEGER
from hokusai.server.registry.schemas import (
    BatchRequest,
    BatchResponse,
    Comparison,
    ContributorImpact,
    EvaluateRequest,
    Evaluation,
    ImprovementHistory,
    Message,
    ModelList,
    ModelVersionDetail,
    ModelVersionUpdate,
    PredictionHistory,
    PredictRequest,
    PredictResponse,
    ProductionList,
    RegisterRequest,
    RegisterResponse,
    StageTransition,
    VersionLineage,
    VersionMetrics,
)
from hokusai.server.registry.service import RegistryService
from hokusai.server.runtime import get_runtime

read = require_scope(Scope.READ)
write = require_scope(Scope.WRITE)
REFERENCE_LENGTH = MAX_NAME_LENGTH + 257  # "name:version" or "name@alias"


def registry(request: Request) -> RegistryService:
    return get_runtime(request).registry


async def list_models(
    request: Request,
    name: str | None = Query(None, max_length=MAX_NAME_LENGTH, description="Only the versions of this model"),
    max_results: int = Query(100, ge=1, le=1000),
    page_token: str | None = Query(None, max_length=MAX_PAGE_TOKEN_LENGTH, description="From the previous page"),
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


def analytics(request: Request) -> ModelAnalytics:
    return get_runtime(request).analytics


async def compare_models(
    request: Request,
    model1: str = Query(..., max_length=REFERENCE_LENGTH, description="Name:Version or Name@alias"),
    model2: str = Query(..., max_length=REFERENCE_LENGTH, description="Name:Version or Name@alias"),
    metric: str | None = Query(
        None, max_length=250, description="The metric to recommend by; default: the benchmark metric"
    ),
    tolerance: float | None = Query(
        None, ge=0, le=1e6, allow_inf_nan=False, description="Relative difference counted as equivalent"
    ),
) -> Comparison:
    return await analytics(request).comparisons.compare(model1, model2, metric, tolerance)


async def evaluate_model(body: EvaluateRequest, request: Request, response: Response) -> Evaluation:
    """200 with the result; 202 with a queued evaluation (poll its Location) when the dataset is large."""
    evaluation = await analytics(request).evaluations.evaluate(body)
    if evaluation.status in ("queued", "running"):
        response.status_code = 202
        response.headers["Location"] = f"{request.url.path.rsplit('/', 1)[0]}/evaluations/{evaluation.evaluation_id}"
    return evaluation


async def get_evaluation(evaluation_id: str, request: Request) -> Evaluation:
    return await analytics(request).evaluations.get(evaluation_id)


async def contributor_impact(
    address: str,
    request: Request,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_SQL_INTEGER, description="Contributions to skip (newest first)"),
) -> ContributorImpact:
    return await analytics(request).impact.impact(address, limit, offset)


async def improvement_history(model_id: str, request: Request) -> ImprovementHistory:
    return await analytics(request).lineage.improvement_history(model_id)


async def version_metrics(model_name: str, version: str, request: Request) -> VersionMetrics:
    return await analytics(request).performance.metrics(model_name, version)


async def version_lineage(model_name: str, version: str, request: Request) -> VersionLineage:
    return await analytics(request).lineage.version_lineage(model_name, version)


async def prediction_history(
    model_name: str,
    version: str,
    request: Request,
    start: date | None = Query(None, description="First day (UTC), inclusive"),
    end: date | None = Query(None, description="Last day (UTC), inclusive"),
) -> PredictionHistory:
    if start is not None and end is not None and start > end:
        raise InvalidRequest("start must not be after end")
    # The first and last days there are mean "no bound" (the day after the last one cannot even be written).
    start = None if start == date.min else start
    end = None if end == date.max else end
    service = analytics(request)
    current = await registry(request).get_version(model_name, version)
    return await service.predictions.store.history(current.name, current.version, start, end)


async def predict(model_name: str, version: str, body: PredictRequest, request: Request) -> PredictResponse:
    return await analytics(request).predictions.predict(model_name, version, body.inputs)


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
        prefix + "/compare", compare_models, methods=["GET"], response_model=Comparison, dependencies=[Depends(read)]
    )
    router.add_api_route(
        prefix + "/evaluate",
        evaluate_model,
        methods=["POST"],
        response_model=Evaluation,
        dependencies=[Depends(write)],  # it logs an evaluation run to MLflow
        responses={202: {"model": Evaluation, "description": "Large dataset: evaluation queued"}},
    )
    router.add_api_route(
        prefix + "/evaluations/{evaluation_id}",
        get_evaluation,
        methods=["GET"],
        response_model=Evaluation,
        dependencies=[Depends(read)],
    )
    router.add_api_route(
        prefix + "/contributors/{address}/impact",
        contributor_impact,
        methods=["GET"],
        response_model=ContributorImpact,
        dependencies=[Depends(read)],
    )
    router.add_api_route(
        prefix + "/{model_id}/lineage",
        improvement_history,
        methods=["GET"],
        response_model=ImprovementHistory,
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
        prefix + "/{model_name}/{version}/metrics",
        version_metrics,
        methods=["GET"],
        response_model=VersionMetrics,
        dependencies=[Depends(read)],
    )
    router.add_api_route(
        prefix + "/{model_name}/{version}/lineage",
        version_lineage,
        methods=["GET"],
        response_model=VersionLineage,
        dependencies=[Depends(read)],
    )
    router.add_api_route(
        prefix + "/{model_name}/{version}/predictions",
        prediction_history,
        methods=["GET"],
        response_model=PredictionHistory,
        dependencies=[Depends(read)],
    )
    router.add_api_route(
        prefix + "/{model_name}/{version}/predict",
        predict,
        methods=["POST"],
        response_model=PredictResponse,
        dependencies=[Depends(read)],  # a prediction changes nothing in the registry
    )
    router.add_api_route(
        prefix + "/{model_name}/{version}/transition",
        transition_model_version,
        methods=["POST"],
        response_model=ModelVersionDetail,
    )
    return router
