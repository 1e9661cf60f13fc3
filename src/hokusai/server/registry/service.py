"""RegistryService: model versions in MLflow's registry, read and changed through the one upstream client.

Knows nothing of HTTP: it raises ModelNotFound, InvalidRequest or the upstream's 502/503/504 errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import func, select, tuple_

from hokusai.server.db import Database, utcnow
from hokusai.server.errors import HokusaiError, InvalidRequest, NotFound, Unprocessable
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.registry.cache import RegistryReadCache
from hokusai.server.registry.contributors import contributor_shares, normalized_contributor_metadata
from hokusai.server.registry.download import (
    DownloadPlan,
    archive_filename,
    list_files,
    served_artifact_root,
    zip_stream,
)
from hokusai.server.registry.inputs import (
    MAX_SOURCE_LENGTH,
    canonical_version,
    filter_literal,
    holdable_name,
    list_literal,
    name_problem,
    page_token_problem,
)
from hokusai.server.registry.locks import ModelLocks
from hokusai.server.registry.mlflow_api import MlflowApi
from hokusai.server.registry.models import StageTransitionRow
from hokusai.server.registry.registration import IdempotencyStore, resolve_source, stable_model_id, version_tags
from hokusai.server.registry.schemas import (
    RESERVED_MODEL_NAMES,
    BatchOperation,
    BatchResponse,
    BatchResult,
    DeleteAliasOperation,
    DeleteTagsOperation,
    DeleteVersionOperation,
    ModelList,
    ModelVersionDetail,
    ModelVersionSummary,
    ModelVersionUpdate,
    ProductionModel,
    RegisterRequest,
    RegisterResponse,
    SetAliasOperation,
    SetTagsOperation,
    Stage,
    TransitionOperation,
    UpdateDescriptionOperation,
)
from hokusai.server.timestamps import as_utc, from_millis, iso

logger = logging.getLogger(__name__)
CachedAnswer = TypeVar("CachedAnswer", bound=BaseModel)
PAGE_SIZE_LIMIT = 1000  # MLflow's own cap for model-versions/search
# Stages whose lowercase name is kept as an alias in step with the stage, for `models:/name@production`.
STAGE_ALIASES = {"Production": "production", "Staging": "staging"}


class ModelNotFound(NotFound):
    def __init__(self, name: str, version: str) -> None:
        super().__init__(f"Model not found: {name}:{version}")


# Names per `name IN (...)` call when reading aliases: keeps MLflow's request line well under 8 KB.
ALIAS_FILTER_CHARS = 2000


def quoted(value: str) -> str:
    """A string literal for an MLflow filter that the value cannot break out of (see `inputs.filter_literal`)."""
    literal = filter_literal(value)
    if literal is None:
        raise InvalidRequest("A model name containing both ' and \" cannot be searched in MLflow")
    return literal


def version_number(name: str, version: str) -> str:
    """The one check of a (name, version) taken from a caller: a positive integer MLflow can hold, of a name it can
    hold; anything else names no model version (404), and MLflow is not asked."""
    canonical = canonical_version(version)
    if canonical is None or not holdable_name(name):
        raise ModelNotFound(name, version)
    return canonical


def _tags(raw: list[dict[str, str]] | None) -> dict[str, str]:
    return {tag["key"]: tag.get("value", "") for tag in raw or []}


def _summary(raw: dict[str, Any], aliases: list[str]) -> ModelVersionSummary:
    return ModelVersionSummary(
        name=raw["name"],
        version=raw["version"],
        status=raw.get("status", "READY"),
        created_at=int(raw.get("creation_timestamp", 0)),
        tags=_tags(raw.get("tags")),
        stage=raw.get("current_stage", "None"),
        aliases=sorted(aliases),
    )


def _detail(raw: dict[str, Any]) -> ModelVersionDetail:
    summary = _summary(raw, raw.get("aliases", []))
    return ModelVersionDetail(
        **summary.model_dump(),
        description=raw.get("description", ""),
        source=raw.get("source", ""),
        run_id=raw.get("run_id") or None,
        updated_at=int(raw.get("last_updated_timestamp", 0)),
    )


class RegistryService:
    def __init__(
        self,
        upstream: MlflowUpstream,
        database: Database,
        cache: RegistryReadCache,
        on_registered: Callable[[str, str], Awaitable[object]] | None = None,
        locks: ModelLocks | None = None,
    ) -> None:
        """`on_registered(name, version)` runs after each registration that names contributors (their records);
        `locks` serialize the changes to one model (in process unless given ones backed by Redis)."""
        self._upstream = upstream
        self._locks = locks or ModelLocks()
        self._on_registered = on_registered
        self._mlflow = MlflowApi(upstream)
        self._database = database
        self._idempotency = IdempotencyStore(database)
        self.cache = cache

    async def _cached(
        self,
        parts: list[Any],
        model: type[CachedAnswer],
        fetch: Callable[[], Awaitable[CachedAnswer]],
        fresh: bool = False,
    ) -> CachedAnswer:
        """An answer from the read cache, or fetched from MLflow and kept (unless a write happened meanwhile)."""
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
        generation = await self.cache.generation()
        if not fresh and (cached := await self.cache.get(key, generation)) is not None:
            return model.model_validate(cached)
        answer = await fetch()
        await self.cache.put(key, generation, answer.model_dump())
        return answer

    async def list_versions(self, name: str | None, max_results: int, page_token: str | None) -> ModelList:
        if page_token and (problem := page_token_problem(page_token)) is not None:
            raise InvalidRequest(f"Invalid page_token: {problem}")
        if name and not holdable_name(name):
            return ModelList(models=[])  # no model can have that name: MLflow is not asked
        return await self._cached(
            ["list", name, max_results, page_token],
            ModelList,
            lambda: self._list_versions(name, max_results, page_token),
        )

    async def _list_versions(self, name: str | None, max_results: int, page_token: str | None) -> ModelList:
        params = {"max_results": str(max_results), "order_by": "name ASC"}
        if name:
            params["filter"] = f"name = {quoted(name)}"
        if page_token:
            params["page_token"] = page_token
        search = self._mlflow("GET", "/model-versions/search", params=params)
        if name:
            # One model: its aliases can be asked for at the same time as its versions (one round trip of latency).
            page, aliases = await asyncio.gather(search, self._aliases({name}))
        else:
            page = await search
            aliases = await self._aliases({v["name"] for v in page.get("model_versions", [])})
        versions = page.get("model_versions", [])
        return ModelList(
            models=[_summary(v, aliases.get((v["name"], v["version"]), [])) for v in versions],
            next_page_token=page.get("next_page_token") or None,
        )

    async def _aliases(self, names: set[str]) -> dict[tuple[str, str], list[str]]:
        """Aliases of every version of these models (model-versions/search does not return them).

        Names are asked for in `name IN (...)` lists, a few calls side by side; a name no list literal can hold
        (made straight in MLflow, with both quotes, a backslash or a control character) is read on its own with
        registered-models/get, which takes it as a plain parameter. One odd name never fails the listing.
        """
        listable, odd = [], []
        for name in sorted(names):
            literal = list_literal(name)
            (listable if literal is not None else odd).append(literal or name)
        chunks: list[list[str]] = []
        for literal in listable:
            if not chunks or sum(len(item) + 2 for item in chunks[-1]) + len(literal) > ALIAS_FILTER_CHARS:
                chunks.append([])
            chunks[-1].append(literal)
        found = await asyncio.gather(
            *(self._models_in(chunk) for chunk in chunks), *(self._model_named(name) for name in odd)
        )
        aliases: dict[tuple[str, str], list[str]] = {}
        for model in (model for models in found for model in models):
            for alias in model.get("aliases", []):
                aliases.setdefault((model["name"], alias["version"]), []).append(alias["alias"])
        return aliases

    async def _models_in(self, literals: list[str]) -> list[dict[str, Any]]:
        """The registered models named in one `IN` list; should MLflow refuse the list, each is read by name."""
        try:
            found = await self._mlflow(
                "GET",
                "/registered-models/search",
                params={"filter": f"name IN ({', '.join(literals)})", "max_results": str(PAGE_SIZE_LIMIT)},
            )
        except InvalidRequest as exc:
            logger.warning("MLflow refused a list of %d model names (%s): reading them one by one", len(literals), exc)
            one_by_one = await asyncio.gather(*(self._model_named(literal[1:-1]) for literal in literals))
            return [model for models in one_by_one for model in models]
        return found.get("registered_models", [])

    async def _model_named(self, name: str) -> list[dict[str, Any]]:
        """The registered model of that name, or none when it is gone meanwhile (or MLflow cannot look it up)."""
        found = await self._mlflow(
            "GET",
            "/registered-models/get",
            params={"name": name},
            tolerated=frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}),
        )
        return [found["registered_model"]] if "registered_model" in found else []

    async def get_version(self, name: str, version: str, fresh: bool = False) -> ModelVersionDetail:
        """One version; from the read cache unless `fresh` (what a write is based on is always read from MLflow)."""
        version = version_number(name, version)

        async def fetch() -> ModelVersionDetail:
            found = await self._mlflow(
                "GET",
                "/model-versions/get",
                params={"name": name, "version": version},
                not_found=ModelNotFound(name, version),
            )
            return _detail(found["model_version"])

        return await self._cached(["get", name, version], ModelVersionDetail, fetch, fresh=fresh)

    async def update_version(self, name: str, version: str, update: ModelVersionUpdate) -> ModelVersionDetail:
        async with self._writing(name):
            return await self._update_version(name, version, update)

    async def _update_version(self, name: str, version: str, update: ModelVersionUpdate) -> ModelVersionDetail:
        current = await self.get_version(name, version, fresh=True)
        target = {"name": name, "version": current.version}
        if update.description is not None:
            await self._mlflow("PATCH", "/model-versions/update", json={**target, "description": update.description})
        for key, value in (update.tags or {}).items():
            if value is None:
                if key in current.tags:
                    await self._mlflow("DELETE", "/model-versions/delete-tag", json={**target, "key": key})
            else:
                await self._mlflow("POST", "/model-versions/set-tag", json={**target, "key": key, "value": value})
        return await self.get_version(name, current.version, fresh=True)

    async def delete_version(self, name: str, version: str) -> str:
        async with self._writing(name):
            current = await self.get_version(name, version, fresh=True)
            await self._mlflow(
                "DELETE",
                "/model-versions/delete",
                json={"name": name, "version": current.version},
                not_found=ModelNotFound(name, version),
            )
        return f"Model {name}:{current.version} deleted successfully"

    async def transition(
        self, name: str, version: str, stage: Stage, archive_existing: bool, key_id: str | None
    ) -> ModelVersionDetail:
        """Move a version to a stage and keep the matching lowercase alias in step with it.

        One change per model at a time (`ModelLocks`): with `archive_existing`, parallel transitions to Production
        would otherwise each leave their own version there."""
        async with self._writing(name):
            return await self._transition(name, version, stage, archive_existing, key_id)

    async def _transition(
        self, name: str, version: str, stage: Stage, archive_existing: bool, key_id: str | None
    ) -> ModelVersionDetail:
        current = await self.get_version(name, version, fresh=True)
        await self._mlflow(
            "POST",
            "/model-versions/transition-stage",
            json={
                "name": name,
                "version": current.version,
                "stage": stage,
                "archive_existing_versions": archive_existing and stage in STAGE_ALIASES,
            },
        )
        if stage in STAGE_ALIASES:
            await self._mlflow(
                "POST",
                "/registered-models/alias",
                json={"name": name, "alias": STAGE_ALIASES[stage], "version": current.version},
            )
        for alias in STAGE_ALIASES.values():
            if alias in current.aliases and alias != STAGE_ALIASES.get(stage):
                await self._mlflow("DELETE", "/registered-models/alias", json={"name": name, "alias": alias})
        async with self._database.session() as session, session.begin():
            session.add(
                StageTransitionRow(
                    model_name=name, version=current.version, stage=stage, key_id=key_id, transitioned_at=utcnow()
                )
            )
        return await self.get_version(name, current.version, fresh=True)

    async def download_plan(self, name: str, version: str) -> DownloadPlan:
        """What a version's zip will hold, found before any byte is sent (so a missing version is still a 404)."""
        current = await self.get_version(name, version)
        located = await self._mlflow(
            "GET",
            "/model-versions/get-download-uri",
            params={"name": name, "version": current.version},
            not_found=ModelNotFound(name, version),
        )
        root = served_artifact_root(located["artifact_uri"])
        files = await list_files(self._upstream, root)
        return DownloadPlan(archive_filename(name, current.version), root, files)

    def download(self, plan: DownloadPlan) -> AsyncIterator[bytes]:
        return zip_stream(self._upstream, plan)

    async def set_alias(self, name: str, version: str, alias: str) -> ModelVersionDetail:
        async with self._writing(name):
            current = await self.get_version(name, version, fresh=True)
            await self._mlflow(
                "POST", "/registered-models/alias", json={"name": name, "alias": alias, "version": current.version}
            )
        return await self.get_version(name, current.version, fresh=True)

    async def delete_alias(self, name: str, version: str, alias: str) -> ModelVersionDetail:
        async with self._writing(name):
            current = await self.get_version(name, version, fresh=True)
            if alias not in current.aliases:
                raise InvalidRequest(f"Alias {alias!r} does not point to {name}:{current.version}")
            await self._mlflow("DELETE", "/registered-models/alias", json={"name": name, "alias": alias})
        return await self.get_version(name, current.version, fresh=True)

    @asynccontextmanager
    async def _writing(self, name: str | None = None) -> AsyncIterator[None]:
        """Around every change: the model's lock held (when the name is known), and the read cache dropped
        afterwards, whether the change completed or not."""
        try:
            if name is None:
                yield
            else:
                async with self._locks.hold(name):
                    yield
        finally:
            await self.cache.invalidate()

    async def run_batch(
        self, operations: list[BatchOperation], stop_on_error: bool, key_id: str | None
    ) -> BatchResponse:
        """Each operation in order; a failure is reported in its result (and, with stop_on_error, ends the run)."""
        results: list[BatchResult] = []
        stopped = False
        for index, operation in enumerate(operations):
            outcome = BatchResult(index=index, action=operation.action, model=operation.model, success=False)
            if stopped:
                outcome.error = "Skipped: an earlier operation failed and stop_on_error is set"
            else:
                try:
                    outcome.result = await self._apply(operation, key_id)
                    outcome.success = True
                except HokusaiError as exc:
                    outcome.error = exc.detail
                    stopped = stop_on_error
            results.append(outcome)
        skipped = sum(1 for r in results if r.error and r.error.startswith("Skipped"))
        successful = sum(1 for r in results if r.success)
        return BatchResponse(
            total=len(results),
            successful=successful,
            failed=len(results) - successful - skipped,
            skipped=skipped,
            results=results,
        )

    async def _apply(self, operation: BatchOperation, key_id: str | None) -> dict:
        name, version = operation.name, operation.version
        match operation:
            case TransitionOperation():
                done = await self.transition(name, version, operation.stage, operation.archive_existing, key_id)
            case SetTagsOperation():
                done = await self.update_version(name, version, ModelVersionUpdate(tags=dict(operation.tags)))
            case DeleteTagsOperation():
                done = await self.update_version(name, version, ModelVersionUpdate(tags=dict.fromkeys(operation.keys)))
            case SetAliasOperation():
                done = await self.set_alias(name, version, operation.alias)
            case DeleteAliasOperation():
                done = await self.delete_alias(name, version, operation.alias)
            case UpdateDescriptionOperation():
                done = await self.update_version(name, version, ModelVersionUpdate(description=operation.description))
            case DeleteVersionOperation():
                return {"message": await self.delete_version(name, version)}
        return done.model_dump()

    async def register(self, request: RegisterRequest, key_id: str, idempotency_key: str | None) -> RegisterResponse:
        """A new version from a model URI. With an Idempotency-Key, a retry gets the first answer and no new version."""
        if idempotency_key is None:
            async with self._writing():
                return await self._register(request)
        fingerprint = self._idempotency.fingerprint(request.model_dump())
        first = await self._idempotency.reserve(key_id, idempotency_key, fingerprint)
        if first is not None:
            return RegisterResponse(**first)
        try:
            async with self._writing():
                answer = await self._register(request)
        except BaseException:
            await self._idempotency.release(key_id, idempotency_key)
            raise
        await self._idempotency.complete(key_id, idempotency_key, answer.model_dump())
        return answer

    async def _register(self, request: RegisterRequest) -> RegisterResponse:
        metadata = normalized_contributor_metadata(request.metadata)  # a bad address is a 400 before any change
        resolved = await resolve_source(self._mlflow, request.model_data)
        name = request.model_name or resolved.name
        if not name:
            raise Unprocessable(f"model_name is required: {request.model_data} carries no model name")
        if name.lower() in RESERVED_MODEL_NAMES:
            raise Unprocessable(f"{name!r} is reserved (a fixed segment of /models/*): give another model_name")
        if (problem := name_problem(name)) is not None:  # a source's own name is checked like a given one
            raise Unprocessable(f"{problem}: give another model_name")
        if len(resolved.source) > MAX_SOURCE_LENGTH:
            raise Unprocessable(f"The model's location is longer than MLflow keeps ({MAX_SOURCE_LENGTH} characters)")
        await self._mlflow(
            "POST",
            "/registered-models/create",
            json={"name": name},
            tolerated=frozenset({"RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"}),
        )
        model_id = await stable_model_id(self._database, self._mlflow, name)
        payload: dict[str, Any] = {
            "name": name,
            "source": resolved.source,
            "tags": version_tags(request.model_type, metadata, model_id),
        }
        if resolved.run_id:
            payload["run_id"] = resolved.run_id
        if resolved.model_id:
            payload["model_id"] = resolved.model_id
        created = (await self._mlflow("POST", "/model-versions/create", json=payload))["model_version"]
        if self._on_registered is not None and contributor_shares(metadata):
            try:
                await self._on_registered(name, created["version"])
            except HokusaiError as exc:  # the version exists: report it; `hokusai contributions rebuild` catches up
                logger.warning("Contributions of %s:%s not recorded: %s", name, created["version"], exc.detail)
        registered_at = from_millis(created.get("creation_timestamp"))
        return RegisterResponse(
            model_id=model_id, model_name=name, version=created["version"], registration_timestamp=iso(registered_at)
        )

    async def production_versions(self) -> list[ProductionModel]:
        """Every version in Production. MLflow cannot filter by stage, so versions are read a page of 1,000 at a
        time: the number of calls follows the number of versions / 1,000, never the number of models."""
        in_production: list[dict[str, Any]] = []
        page_token = None
        while True:
            params = {"max_results": str(PAGE_SIZE_LIMIT)}
            if page_token:
                params["page_token"] = page_token
            page = await self._mlflow("GET", "/model-versions/search", params=params)
            in_production += [v for v in page.get("model_versions", []) if v.get("current_stage") == "Production"]
            page_token = page.get("next_page_token")
            if not page_token:
                break
        entered = await self._entered_production({(v["name"], v["version"]) for v in in_production})
        return [
            ProductionModel(
                name=v["name"],
                version=v["version"],
                stage="Production",
                deployed_at=iso(entered.get((v["name"], v["version"])) or from_millis(v.get("last_updated_timestamp"))),
            )
            for v in sorted(in_production, key=lambda v: (v["name"], int(v["version"])))
        ]

    async def _entered_production(self, versions: set[tuple[str, str]]) -> dict[tuple[str, str], datetime]:
        """When each version last entered Production through this service (one query for all of them)."""
        # A name with NUL cannot be in the database (PostgreSQL text cannot hold it), and cannot be bound to a query.
        versions = {(name, version) for name, version in versions if "\x00" not in name}
        if not versions:
            return {}
        query = (
            select(
                StageTransitionRow.model_name, StageTransitionRow.version, func.max(StageTransitionRow.transitioned_at)
            )
            .where(StageTransitionRow.stage == "Production")
            .where(tuple_(StageTransitionRow.model_name, StageTransitionRow.version).in_(sorted(versions)))
            .group_by(StageTransitionRow.model_name, StageTransitionRow.version)
        )
        async with self._database.session() as session:
            rows = (await session.execute(query)).all()
        return {(name, version): as_utc(at) for name, version, at in rows}
