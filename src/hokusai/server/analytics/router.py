"""The analytics routes under /models/* (and /api/models/*): thin routes over ModelAnalytics.

Included before the registry's routes: `/models/evaluations/{id}` and `/models/{model_id}/lineage` would otherwise
be taken for `/models/{model_name}/{version}`.
"""

from __future__ import annotations

from datetime import date

from fastapi import APIRouter, Depends, Query, Request, Response

from hokusai.server.analytics.schemas import (
    Comparison,
    ContributorImpact,
    ContributorLeaderboard,
    EvaluateRequest,
    Evaluation,
    ImprovementHistory,
    PredictionHistory,
    PredictRequest,
    PredictResponse,
    VersionLineage,
    VersionMetrics,
)
from hokusai.server.auth.dependencies import allow
from hokusai.server.deps import Analytics, Caller, Registry
from hokusai.server.errors import InvalidRequest
from hokusai.server.events.outbox import Actor
from hokusai.server.registry.inputs import MAX_NAME_LENGTH, MAX_SQL_INTEGER

read = allow("models:read")
write = allow("models:write")
REFERENCE_LENGTH = MAX_NAME_LENGTH + 257  # "name:version" or "name@alias"
MAX_PAGE_SIZE = 1000  # contributions of an impact page, addresses of a leaderboard page


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
    body: EvaluateRequest, request: Request, response: Response, analytics: Analytics, caller: Caller
) -> Evaluation:
    """200 with the result; 202 with a queued evaluation (poll its Location) when the dataset is large. The
    outcome's event names the caller."""
    evaluation = await analytics.evaluations.evaluate(body, Actor.of(caller))
    if evaluation.status in ("queued", "running"):
        response.status_code = 202
        response.headers["Location"] = f"{request.url.path.rsplit('/', 1)[0]}/evaluations/{evaluation.evaluation_id}"
    return evaluation


async def get_evaluation(evaluation_id: str, analytics: Analytics) -> Evaluation:
    return await analytics.evaluations.get(evaluation_id)


async def contributor_impact(
    address: str,
    analytics: Analytics,
    limit: int = Query(100, ge=1, le=MAX_PAGE_SIZE),
    offset: int = Query(0, ge=0, le=MAX_SQL_INTEGER, description="Contributions to skip (newest first)"),
) -> ContributorImpact:
    return await analytics.impact.impact(address, limit, offset)


async def contributor_leaderboard(
    analytics: Analytics,
    limit: int = Query(50, ge=1, le=MAX_PAGE_SIZE),
    offset: int = Query(0, ge=0, le=MAX_SQL_INTEGER, description="Ranked addresses to skip"),
) -> ContributorLeaderboard:
    """Contributor addresses ranked by total improvement (ties: address ascending), each with its impact's figures."""
    return await analytics.impact.leaderboard(limit, offset)


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
    """The analytics routes under `prefix` (`/models`, `/api/models`), declared with it like the registry's, so
    rate-limit policies and metrics labels see the full template."""
    router = APIRouter(tags=["models"])
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
        # One segment: no model route has that shape (theirs are /{model_name}/{version}...), so it hides no model.
        prefix + "/contributors",
        contributor_leaderboard,
        methods=["GET"],
        response_model=ContributorLeaderboard,
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
    return router
