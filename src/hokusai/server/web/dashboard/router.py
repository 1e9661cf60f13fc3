"""/ui/*: the dashboard's pages (thin routes: views.py builds what they show, the templates lay it out).

Pages are GET routes guarded by read actions; the forms of a model's page POST to routes guarded by
`models:write`, check the form's CSRF token, change the registry through the same service as /models/*, and answer
303 back to the page (post/redirect/get) naming what was done in the query string. Errors are HTML pages with the
status the API would give (404 unknown model, 400/422 bad input, 403 refused, 502/503 upstream); a missing or bad
credential (401) is left to the app's handlers, which send a browser to the sign-in page.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from hokusai.server.auth.caller import Caller as CallerRecord
from hokusai.server.auth.dependencies import allow
from hokusai.server.auth.gate import CALLER_STATE_KEY
from hokusai.server.deps import AccessPolicy, Analytics, AppSettings, Caller, Dspy, Health, Registry
from hokusai.server.errors import AuthenticationError, HokusaiError, renderable_validation_errors
from hokusai.server.registry.inputs import (
    MAX_ALIAS_LENGTH,
    MAX_NAME_LENGTH,
    MAX_SQL_INTEGER,
    MAX_TAG_KEY_LENGTH,
    MAX_TAG_VALUE_LENGTH,
)
from hokusai.server.registry.schemas import STAGES, AnyCaseStage, ModelVersionUpdate
from hokusai.server.web import csrf
from hokusai.server.web.dashboard import views
from hokusai.server.web.templating import PAGE_HEADERS, templates

ReadModels = Annotated[CallerRecord, Depends(allow("models:read"))]
WriteModels = Annotated[CallerRecord, Depends(allow("models:write"))]
ReadDspy = Annotated[CallerRecord, Depends(allow("dspy:read"))]
ModelName = Annotated[str, Path(min_length=1, max_length=MAX_NAME_LENGTH)]
VersionField = Annotated[str, Form(min_length=1, max_length=10, pattern=r"^[0-9]+$")]
CsrfField = Annotated[str | None, Form(max_length=128)]
ALIAS_PATTERN = r"^[A-Za-z0-9_-]+$"
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


class HtmlErrorRoute(APIRoute):
    """A route whose errors are answered as HTML pages (the API's routes answer them as JSON)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def html_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except AuthenticationError:
                raise  # the app's handler: JSON for a client, the sign-in page for a browser
            except HokusaiError as exc:
                return error_page(request, exc.status_code, exc.detail, headers=exc.headers)
            except RequestValidationError as exc:
                problems = [
                    f"{'.'.join(str(part) for part in error.get('loc', ())[1:]) or 'request'}: {error.get('msg', '')}"
                    for error in renderable_validation_errors(exc.errors())
                ]
                return error_page(request, 422, "The request's parameters are not valid.", problems=problems)
            except HTTPException as exc:
                return error_page(request, exc.status_code, str(exc.detail), headers=exc.headers)

        return html_errors


router = APIRouter(prefix="/ui", route_class=HtmlErrorRoute, include_in_schema=False)

ERROR_TITLES = {
    400: "Bad request",
    403: "Not allowed",
    404: "Not found",
    409: "Conflict",
    422: "Invalid input",
    429: "Too many requests",
    502: "MLflow answered with an error",
    503: "Service unavailable",
    504: "MLflow did not answer in time",
}


def page_context(request: Request, caller: CallerRecord | None, active: str, **values: Any) -> dict[str, Any]:
    """What every page's template gets: the caller for the navigation, the CSRF token for forms (sign-out too)."""
    return {
        "request": request,
        "caller": caller,
        "csrf_token": csrf.csrf_token(request),
        "active": active,
        **values,
    }


def render(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, template, context, status_code=status_code, headers=PAGE_HEADERS)


def error_page(
    request: Request,
    status_code: int,
    detail: str,
    problems: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    caller = getattr(request.state, CALLER_STATE_KEY, None)
    context = page_context(
        request,
        caller,
        active="",
        status_code=status_code,
        title=ERROR_TITLES.get(status_code, "Error"),
        detail=detail,
        problems=problems or [],
    )
    response = render(request, "dashboard/error.html", context, status_code)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


# --- pages -----------------------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def models(
    request: Request,
    caller: ReadModels,
    registry: Registry,
    q: str = Query("", max_length=MAX_NAME_LENGTH, description="Part of a model name"),
    offset: int = Query(0, ge=0, le=MAX_SQL_INTEGER),
    limit: int = Query(PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE),
) -> HTMLResponse:
    page = await views.models_page(registry, q, offset, limit)
    return render(request, "dashboard/models.html", page_context(request, caller, "models", page=page))


def done_message(done: str | None, version: str | None, value: str | None) -> str | None:
    """The confirmation of a form's change, from the fixed words of each action (never text from the link)."""
    if done is None or version is None or not re.fullmatch(r"[0-9]{1,10}", version):
        return None
    value = value or ""
    if done == "stage" and value in STAGES.values():
        return f"Version {version} moved to stage {value}."
    if done == "alias" and re.fullmatch(ALIAS_PATTERN, value) and len(value) <= MAX_ALIAS_LENGTH:
        return f"Alias {value} now points to version {version}."
    if done == "tag" and 0 < len(value) <= MAX_TAG_KEY_LENGTH:
        return f"Tag {value} set on version {version}."
    return None


@router.get("/models/{name}", response_class=HTMLResponse)
async def model(
    request: Request,
    name: ModelName,
    caller: ReadModels,
    registry: Registry,
    analytics: Analytics,
    policy: AccessPolicy,
    done: str | None = Query(None, max_length=10),
    version: str | None = Query(None, max_length=10),
    value: str | None = Query(None, max_length=MAX_TAG_KEY_LENGTH),
) -> HTMLResponse:
    page = await views.model_page(registry, analytics, name)
    context = page_context(
        request,
        caller,
        "models",
        page=page,
        can_write=policy.allows(caller, "models:write", name),
        stages=list(STAGES.values()),
        message=done_message(done, version, value),
    )
    return render(request, "dashboard/model.html", context)


@router.get("/models/{name}/compare", response_class=HTMLResponse)
async def compare(
    request: Request,
    name: ModelName,
    caller: ReadModels,
    registry: Registry,
    analytics: Analytics,
    settings: AppSettings,
    a: str | None = Query(None, max_length=10, pattern=r"^[0-9]+$", description="The first version"),
    b: str | None = Query(None, max_length=10, pattern=r"^[0-9]+$", description="The second version"),
) -> HTMLResponse:
    page = await views.compare_page(registry, analytics, settings, name, a, b)
    return render(request, "dashboard/compare.html", page_context(request, caller, "models", page=page))


@router.get("/contributors", response_class=HTMLResponse)
async def contributors(
    request: Request,
    caller: ReadModels,
    analytics: Analytics,
    offset: int = Query(0, ge=0, le=MAX_SQL_INTEGER),
    limit: int = Query(PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE),
) -> HTMLResponse:
    page = await views.leaderboard_page(analytics, limit, offset)
    return render(request, "dashboard/contributors.html", page_context(request, caller, "contributors", page=page))


@router.get("/contributors/{address}", response_class=HTMLResponse)
async def contributor(
    request: Request,
    caller: ReadModels,
    analytics: Analytics,
    address: str = Path(max_length=42),
) -> HTMLResponse:
    page = await views.contributor_page(analytics, address)
    return render(request, "dashboard/contributor.html", page_context(request, caller, "contributors", page=page))


@router.get("/dspy", response_class=HTMLResponse)
async def dspy_programs(request: Request, caller: ReadDspy, dspy: Dspy) -> HTMLResponse:
    page = await views.dspy_page(dspy)
    return render(request, "dashboard/dspy.html", page_context(request, caller, "dspy", page=page))


@router.get("/health", response_class=HTMLResponse)
async def health(request: Request, caller: Caller, sources: Health) -> HTMLResponse:
    """Any signed-in key: the same facts /health/status gives without a key, laid out."""
    page = await views.health_page(sources)
    return render(request, "dashboard/health.html", page_context(request, caller, "health", page=page))


# --- forms (write scope) ---------------------------------------------------------------------------------------


def back_to_model(name: str, **done: str) -> RedirectResponse:
    return RedirectResponse(f"{views.model_url(name)}?{urlencode(done)}#actions", status_code=303)


@router.post("/models/{name}/stage")
async def transition_stage(
    request: Request,
    name: ModelName,
    caller: WriteModels,
    registry: Registry,
    version: VersionField,
    stage: Annotated[AnyCaseStage, Form()],
    archive_existing: Annotated[bool, Form()] = False,
    csrf_token: CsrfField = None,
) -> RedirectResponse:
    csrf.check_form_token(request, csrf_token)
    done = await registry.transition(name, version, stage, archive_existing, caller)
    return back_to_model(name, done="stage", version=done.version, value=stage)


@router.post("/models/{name}/alias")
async def set_alias(
    request: Request,
    name: ModelName,
    caller: WriteModels,
    registry: Registry,
    version: VersionField,
    alias: Annotated[str, Form(min_length=1, max_length=MAX_ALIAS_LENGTH, pattern=ALIAS_PATTERN)],
    csrf_token: CsrfField = None,
) -> RedirectResponse:
    csrf.check_form_token(request, csrf_token)
    done = await registry.set_alias(name, version, alias, caller)
    return back_to_model(name, done="alias", version=done.version, value=alias)


@router.post("/models/{name}/tags")
async def set_tag(
    request: Request,
    name: ModelName,
    caller: WriteModels,
    registry: Registry,
    version: VersionField,
    key: Annotated[str, Form(min_length=1, max_length=MAX_TAG_KEY_LENGTH)],
    value: Annotated[str, Form(max_length=MAX_TAG_VALUE_LENGTH)] = "",
    csrf_token: CsrfField = None,
) -> RedirectResponse:
    csrf.check_form_token(request, csrf_token)
    try:
        update = ModelVersionUpdate(tags={key: value})  # the API's own bounds on tag keys
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    done = await registry.update_version(name, version, update, caller)
    return back_to_model(name, done="tag", version=done.version, value=key)
