"""RegistryService: model versions in MLflow's registry, read and changed through the one upstream client.

Knows nothing of HTTP: it raises ModelNotFound, InvalidRequest or the upstream's 502/503/504 errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import func, select, tuple_

from hokusai.server.analytics.contributors import contributor_shares, normalized_contributor_metadata
from hokusai.server.auth.caller import Caller
from hokusai.server.auth.policy import Policy
from hokusai.server.db import Database, utcnow
from hokusai.server.errors import HokusaiError, InvalidRequest, Unprocessable
from hokusai.server.events.changes import RegistryChanges
from hokusai.server.events.outbox import Actor
from hokusai.server.mlflow.registry_client import (
    ModelVersion,
    RegistryClient,
    name_filter,
    version_number,
)
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.registry.cache import RegistryReadCache
from hokusai.server.registry.download import (
    DownloadPlan,
    archive_filename,
    list_files,
    served_artifact_root,
    zip_stream,
)
from hokusai.server.registry.inputs import MAX_SOURCE_LENGTH, holdable_name, name_problem, page_token_problem
from hokusai.server.registry.locks import ModelLocks
from hokusai.server.registry.models import StageTransitionRow
from hokusai.server.registry.registration import (
    DEFAULT_PENDING_SECONDS,
    REQUEST_TAG,
    IdempotencyStore,
    Reservation,
    resolve_source,
    stable_model_id,
    version_tags,
)
from hokusai.server.registry.schemas import (
    RESERVED_MODEL_NAMES,
    BatchOperation,
    BatchOperationResult,
    BatchResponse,
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
# Stages whose lowercase name is kept as an alias in step with the stage, for `models:/name@production`.
STAGE_ALIASES = {"Production": "production", "Staging": "staging"}


def _summary(version: ModelVersion, aliases: Iterable[str] | None) -> ModelVersionSummary:
    """A list entry; `aliases` None when they were not asked for (the entry then has none, not an empty list)."""
    return ModelVersionSummary(
        name=version.name,
        version=version.version,
        status=version.status,
        created_at=version.created_ms,
        tags=dict(version.tags),
        stage=version.stage,
        aliases=sorted(aliases) if aliases is not None else None,
    )


def _detail(version: ModelVersion) -> ModelVersionDetail:
    # Built in one step (not a summary dumped into a detail): a cold get does nothing but this after MLflow answers.
    return ModelVersionDetail(
        name=version.name,
        version=version.version,
        status=version.status,
        created_at=version.created_ms,
        tags=dict(version.tags),
        stage=version.stage,
        aliases=sorted(version.aliases),
        description=version.description,
        source=version.source,
        run_id=version.run_id,
        updated_at=version.updated_ms,
    )


class RegistryService:
    def __init__(
        self,
        upstream: MlflowUpstream,
        database: Database,
        cache: RegistryReadCache,
        on_registered: Callable[[str, str, Actor], Awaitable[object]] | None = None,
        locks: ModelLocks | None = None,
        policy: Policy | None = None,
        idempotency_pending_seconds: float = DEFAULT_PENDING_SECONDS,
        changes: RegistryChanges | None = None,
        on_expected: Callable[[str, str], None] | None = None,
    ) -> None:
        """`on_registered(name, version, actor)` runs after each registration that names contributors (their records);
        `locks` serialize the changes to one model (in process unless given ones backed by Redis); `policy`
        authorizes each operation of a batch; an Idempotency-Key still pending after `idempotency_pending_seconds`
        may be taken over by a retry. Every write takes its `actor`, the caller who asked for it, and goes through
        `changes` (when given): the event log's record of who changed which model (events/changes.py).
        `on_expected(name, version)` is told of each version registered or moved to Production, whose calls may
        follow (it prepares them in the background and returns at once)."""
        self._on_expected = on_expected
        self._changes = changes
        self._policy = policy or Policy()
        self._upstream = upstream
        self._locks = locks or ModelLocks()
        self._on_registered = on_registered
        self._mlflow = RegistryClient.over(upstream)
        self._database = database
        self._idempotency = IdempotencyStore(database, idempotency_pending_seconds)
        self.cache = cache

    async def _cached(
        self,
        parts: list[Any],
        model: type[CachedAnswer],
        fetch: Callable[[], Awaitable[CachedAnswer]],
        fresh: bool = False,
    ) -> CachedAnswer:
        """An answer from the read cache, or fetched from MLflow and kept (unless a write happened meanwhile); a miss
        waits for a fetch of the same key already under way (`RegistryReadCache.fill`). `fresh`: always fetched."""
        if not self.cache.enabled:
            return await fetch()  # nothing will be kept: no key, no generation, no copy of the answer
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
        if fresh:
            generation = await self.cache.generation()
            answer = await fetch()
            await self.cache.put(key, generation, answer.model_dump())
            return answer

        async def fetch_value() -> Any:
            return (await fetch()).model_dump()

        # Validated by each caller: those sharing one fetch get answers of their own.
        return model.model_validate(await self.cache.fill(key, fetch_value))

    async def list_versions(
        self, name: str | None, max_results: int, page_token: str | None, include_aliases: bool = False
    ) -> ModelList:
        """One page of versions: one MLflow call; `include_aliases` adds each entry's aliases, which takes a second
        (model-versions/search does not return them)."""
        if page_token and (problem := page_token_problem(page_token)) is not None:
            raise InvalidRequest(f"Invalid page_token: {problem}")
        if name and not holdable_name(name):
            return ModelList(models=[])  # no model can have that name: MLflow is not asked
        return await self._cached(
            ["list", name, max_results, page_token, include_aliases],
            ModelList,
            lambda: self._list_versions(name, max_results, page_token, include_aliases),
        )

    async def _list_versions(
        self, name: str | None, max_results: int, page_token: str | None, include_aliases: bool
    ) -> ModelList:
        # A name no filter can hold is refused here, before MLflow is asked anything.
        search = self._mlflow.search_versions(
            name_filter(name) if name else None, max_results, page_token, order_by="name ASC"
        )
        if not include_aliases:
            page = await search
            return ModelList(models=[_summary(v, None) for v in page.versions], next_page_token=page.next_page_token)
        if name:
            # One model: its aliases can be asked for at the same time as its versions (one round trip of latency).
            page, aliases = await asyncio.gather(search, self._aliases({name}))
        else:
            page = await search
            aliases = await self._aliases({v.name for v in page.versions})
        return ModelList(
            models=[_summary(v, aliases.get((v.name, v.version), [])) for v in page.versions],
            next_page_token=page.next_page_token,
        )

    async def _aliases(self, names: set[str]) -> dict[tuple[str, str], list[str]]:
        """Aliases of every version of these models (model-versions/search does not return them), read from
        their registered models (a few calls side by side; see `RegistryClient.registered_models`)."""
        aliases: dict[tuple[str, str], list[str]] = {}
        for model in await self._mlflow.registered_models(names):
            for alias, version in model.aliases:
                aliases.setdefault((model.name, version), []).append(alias)
        return aliases

    async def get_version(self, name: str, version: str, fresh: bool = False) -> ModelVersionDetail:
        """One version; from the read cache unless `fresh` (what a write is based on is always read from MLflow)."""
        version = version_number(name, version)

        async def fetch() -> ModelVersionDetail:
            return _detail(await self._mlflow.get_version(name, version))

        return await self._cached(["get", name, version], ModelVersionDetail, fetch, fresh=fresh)

    async def update_version(
        self, name: str, version: str, update: ModelVersionUpdate, actor: Caller
    ) -> ModelVersionDetail:
        async with self._writing(name, actor):
            return await self._update_version(name, version, update)

    async def _update_version(self, name: str, version: str, update: ModelVersionUpdate) -> ModelVersionDetail:
        current = await self.get_version(name, version, fresh=True)
        if update.description is not None:
            await self._mlflow.update_description(name, current.version, update.description)
        for key, value in (update.tags or {}).items():
            if value is None:
                if key in current.tags:
                    await self._mlflow.delete_version_tag(name, current.version, key)
            else:
                await self._mlflow.set_version_tag(name, current.version, key, value)
        return await self.get_version(name, current.version, fresh=True)

    async def delete_version(self, name: str, version: str, actor: Caller) -> str:
        async with self._writing(name, actor):
            current = await self.get_version(name, version, fresh=True)
            await self._mlflow.delete_version(name, version)  # gone meanwhile: a 404 naming the version as given
        return f"Model {name}:{current.version} deleted successfully"

    async def transition(
        self, name: str, version: str, stage: Stage, archive_existing: bool, actor: Caller
    ) -> ModelVersionDetail:
        """Move a version to a stage and keep the matching lowercase alias in step with it.

        One change per model at a time (`ModelLocks`): with `archive_existing`, parallel transitions to Production
        would otherwise each leave their own version there."""
        async with self._writing(name, actor):
            return await self._transition(name, version, stage, archive_existing, actor.key_id)

    async def _transition(
        self, name: str, version: str, stage: Stage, archive_existing: bool, key_id: str | None
    ) -> ModelVersionDetail:
        current = await self.get_version(name, version, fresh=True)
        await self._mlflow.transition_stage(name, current.version, stage, archive_existing and stage in STAGE_ALIASES)
        if stage == "Production" and self._on_expected is not None:
            self._on_expected(name, current.version)
        if stage in STAGE_ALIASES:
            await self._mlflow.set_alias(name, STAGE_ALIASES[stage], current.version)
        for alias in STAGE_ALIASES.values():
            if alias in current.aliases and alias != STAGE_ALIASES.get(stage):
                await self._mlflow.delete_alias(name, alias)
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
        root = served_artifact_root(await self._mlflow.download_uri(name, version))
        files = await list_files(self._upstream, root)
        return DownloadPlan(archive_filename(name, current.version), root, files)

    def download(self, plan: DownloadPlan) -> AsyncIterator[bytes]:
        return zip_stream(self._upstream, plan)

    async def set_alias(self, name: str, version: str, alias: str, actor: Caller) -> ModelVersionDetail:
        async with self._writing(name, actor):
            current = await self.get_version(name, version, fresh=True)
            await self._mlflow.set_alias(name, alias, current.version)
        return await self.get_version(name, current.version, fresh=True)

    async def delete_alias(self, name: str, version: str, alias: str, actor: Caller) -> ModelVersionDetail:
        async with self._writing(name, actor):
            current = await self.get_version(name, version, fresh=True)
            if alias not in current.aliases:
                raise InvalidRequest(f"Alias {alias!r} does not point to {name}:{current.version}")
            await self._mlflow.delete_alias(name, alias)
        return await self.get_version(name, current.version, fresh=True)

    @asynccontextmanager
    async def _writing(self, name: str | None, actor: Caller) -> AsyncIterator[None]:
        """Around every change: the model's lock held and the change observed for the event log (when the name is
        known; a registration learns it later, see `_observed`), and the read cache dropped afterwards, whether
        the change completed or not."""
        try:
            if name is None:
                yield
            else:
                async with self._locks.hold(name), self._observed(name, actor):
                    yield
        finally:
            await self.cache.invalidate()

    def _observed(self, name: str, actor: Caller) -> AbstractAsyncContextManager[None]:
        """The intent recorded before the MLflow calls, the model observed after (events/changes.py)."""
        return self._changes.change(name, Actor.of(actor)) if self._changes is not None else nullcontext()

    async def run_batch(self, operations: list[BatchOperation], stop_on_error: bool, actor: Caller) -> BatchResponse:
        """Each operation in order; a failure is reported in its result (and, with stop_on_error, ends the run)."""
        results: list[BatchOperationResult] = []
        stopped = False
        for index, operation in enumerate(operations):
            outcome = BatchOperationResult(index=index, action=operation.action, model=operation.model, success=False)
            if stopped:
                outcome.error = "Skipped: an earlier operation failed and stop_on_error is set"
            else:
                try:
                    outcome.result = await self._apply(operation, actor)
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

    async def _apply(self, operation: BatchOperation, actor: Caller) -> dict:
        name, version = operation.name, operation.version
        self._policy.authorize(actor, "models:write", name)  # each operation, as if it came alone
        match operation:
            case TransitionOperation():
                done = await self.transition(name, version, operation.stage, operation.archive_existing, actor)
            case SetTagsOperation():
                done = await self.update_version(name, version, ModelVersionUpdate(tags=dict(operation.tags)), actor)
            case DeleteTagsOperation():
                tags = ModelVersionUpdate(tags=dict.fromkeys(operation.keys))
                done = await self.update_version(name, version, tags, actor)
            case SetAliasOperation():
                done = await self.set_alias(name, version, operation.alias, actor)
            case DeleteAliasOperation():
                done = await self.delete_alias(name, version, operation.alias, actor)
            case UpdateDescriptionOperation():
                update = ModelVersionUpdate(description=operation.description)
                done = await self.update_version(name, version, update, actor)
            case DeleteVersionOperation():
                return {"message": await self.delete_version(name, version, actor)}
        return done.model_dump()

    async def register(self, request: RegisterRequest, actor: Caller, idempotency_key: str | None) -> RegisterResponse:
        """A new version from a model URI. With an Idempotency-Key, a retry gets the first answer and no new version
        (keys are per caller: the same Idempotency-Key from another caller is another request)."""
        key_id = actor.id
        if idempotency_key is None:
            async with self._writing(None, actor):
                return await self._register(request, actor)
        fingerprint = self._idempotency.fingerprint(request.model_dump())
        reservation = await self._idempotency.reserve(key_id, idempotency_key, fingerprint)
        if not isinstance(reservation, Reservation):
            return RegisterResponse(**reservation)  # the first answer
        try:
            async with self._writing(None, actor):
                answer = await self._register(request, actor, reservation)
        except BaseException:
            await self._idempotency.release(reservation)
            raise
        await self._idempotency.complete(reservation, answer.model_dump())
        return answer

    async def _register(
        self, request: RegisterRequest, actor: Caller, reservation: Reservation | None = None
    ) -> RegisterResponse:
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
        async with self._observed(name, actor):
            await self._mlflow.create_registered_model(name)
            model_id = await stable_model_id(self._database, self._mlflow, name)
            created = None
            if reservation is not None and reservation.taken_over:
                # The abandoned attempt may have made the version before it died: answer with that one, not a second.
                created = await self._mlflow.version_tagged(name, REQUEST_TAG, reservation.tag)
            if created is None:
                created = await self._mlflow.create_version(
                    name,
                    resolved.source,
                    version_tags(request.model_type, metadata, model_id, reservation.tag if reservation else None),
                    run_id=resolved.run_id,
                    model_id=resolved.model_id,
                )
        if self._on_expected is not None:
            self._on_expected(name, created.version)
        if self._on_registered is not None and contributor_shares(metadata):
            try:
                await self._on_registered(name, created.version, Actor.of(actor))
            except HokusaiError as exc:  # the version exists: report it; `hokusai contributions rebuild` catches up
                logger.warning("Contributions of %s:%s not recorded: %s", name, created.version, exc.detail)
        return RegisterResponse(
            model_id=model_id,
            model_name=name,
            version=created.version,
            registration_timestamp=iso(from_millis(created.created_ms)),
        )

    async def production_versions(self) -> list[ProductionModel]:
        """Every version in Production. MLflow cannot filter by stage, so versions are read a page of 1,000 at a
        time: the number of calls follows the number of versions / 1,000, never the number of models."""
        in_production = [v async for v in self._mlflow.every_version() if v.stage == "Production"]
        entered = await self._entered_production({(v.name, v.version) for v in in_production})
        return [
            ProductionModel(
                name=v.name,
                version=v.version,
                stage="Production",
                deployed_at=iso(entered.get((v.name, v.version)) or from_millis(v.updated_ms)),
            )
            for v in sorted(in_production, key=lambda v: (v.name, int(v.version)))
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
