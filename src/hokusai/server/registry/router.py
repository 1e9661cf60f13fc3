"""/models/* (and /api/models/*): thin routes over RegistryService."""

from __future__ import annotations

from datetime import date

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from hokusai.server.auth.dependencies import allow
from hokusai.server.deps import AccessPolicy, Analytics, Caller, Registry
from hokusai.server.errors import InvalidRequest
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

read = allow("models:read")
write = allow("models:write")
REFERENCE_LENGTH = MAX_NAME_LENGTH + 257  # "name:version" or "name@alias"


async def list_models(
    caller: Caller,
    registry: Registry,
    policy: AccessPolicy,
    name: str | None = Query(None, max_length=MAX_NAME_LENGTH, description="Only the versions of this model"),
    max_results: int = Query(100, ge=1, le=1000),
    page_token: str | None = Query(None, max_length=MAX_PAGE_TOKEN_LENGTH, description="From the previous page"),
) -> ModelList:
    listed = await registry.list_versions(name, max_results, page_token)
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


async def compare_models(
    analytics: Analytics,
    model1: str = Query(..., max_length=REFERENCE_LENGTH, description="Name:Version or Name@alias"),
    model2: str = Query(..., max_length=REFERENCE_LENGTH, description="Name:Version or Name@alias"),
    metric: str | None = Query(
        None, max_length=250, description="The metric to recommend by; default: the benchmark metric"
    ),
    tolerance: float | None = Query(
        None, ge=0, le=1e6, allow_inf_nan=False, description="Relative difference counted as equivalent"
    ),
) -> Comparison:
    return await analytics.comparisons.compare(model1, model2, metric, tolerance)


async def evaluate_model(
    body: EvaluateRequest, request: Request, response: Response, analytics: Analytics
) -> Evaluation:
    """200 with the result; 202 with a queued evaluation (poll its Location) when the dataset is large."""
    evaluation = await analytics.evaluations.evaluate(body)
    if evaluation.status in ("queued", "running"):
        response.status_code = 202
        response.headers["Location"] = f"{request.url.path.rsplit('/', 1)[0]}/evaluations/{evaluation.evaluation_id}"
    return evaluation


async def get_evaluation(evaluation_id: str, analytics: Analytics) -> Evaluation:
    return await analytics.evaluations.get(evaluation_id)


async def contributor_impact(
    address: str,
    analytics: Analytics,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_SQL_INTEGER, description="Contributions to skip (newest first)"),
) -> ContributorImpact:
    return await analytics.impact.impact(address, limit, offset)


async def improvement_history(model_id: str, analytics: Analytics) -> ImprovementHistory:
    return await analytics.lineage.improvement_history(model_id)


async def version_metrics(model_name: str, version: str, analytics: Analytics) -> VersionMetrics:
    return await analytics.performance.metrics(model_name, version)


async def version_lineage(model_name: str, version: str, analytics: Analytics) -> VersionLineage:
    return await analytics.lineage.version_lineage(model_name, version)


async def prediction_history(
    model_name: str,
    version: str,
    analytics: Analytics,
    registry: Registry,
    start: date | None = Query(None, description="First day (UTC), inclusive"),
    end: date | None = Query(None, description="Last day (UTC), inclusive"),
) -> PredictionHistory:
    if start is not None and end is not None and start > end:
        raise InvalidRequest("start must not be after end")
    # The first and last days there are mean "no bound" (the day after the last one cannot even be written).
    start = None if start == date.min else start
    end = None if end == date.max else end
    current = await registry.get_version(model_name, version)
    return await analytics.predictions.store.history(current.name, current.version, start, end)


async def predict(model_name: str, version: str, body: PredictRequest, analytics: Analytics) -> PredictResponse:
    return await analytics.predictions.predict(model_name, version, body.inputs)


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
        dependencies=[Depends(write)],
    )
    return router
