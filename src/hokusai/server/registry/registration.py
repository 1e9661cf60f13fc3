"""Registering a model version from a model URI: where its files are, what it is called, and doing it once.

MLflow answers a source that does not exist with a 500 (and would trip the circuit breaker), so every source is
looked up first and a missing one is a 400 that says what was not found.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from hokusai.server.db import Database, utcnow
from hokusai.server.errors import Conflict, InvalidRequest, NotFound
from hokusai.server.mlflow.registry_client import LOGGED_MODEL, ModelNotFound, RegistryClient
from hokusai.server.registry.inputs import canonical_version, holdable_name
from hokusai.server.registry.models import IdempotencyRow, ModelIdRow

MODEL_ID_TAG = "hokusai_model_id"
MODEL_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[0-9]+)$")
RUN_ARTIFACT = re.compile(r"^runs:/(?P<run_id>[0-9a-f]{32})(?:/(?P<path>.*))?$")
SERVED_RUN_ARTIFACT = re.compile(r"^mlflow-artifacts:/+[^/]+/(?P<run_id>[0-9a-f]{32})/artifacts(?:/(?P<path>.*))?$")
SERVED_LOGGED_MODEL = re.compile(r"^mlflow-artifacts:/+[^/]+/models/(?P<model_id>m-[0-9a-f]{32})/artifacts/?$")


class SourceNotFound(InvalidRequest):
    def __init__(self, what: str) -> None:
        super().__init__(f"Model source not found: {what}")


@dataclass(frozen=True)
class ResolvedSource:
    """What MLflow's model-versions/create needs, and the name the source carries (if any)."""

    source: str
    run_id: str | None = None
    model_id: str | None = None
    name: str | None = None


async def resolve_source(mlflow: RegistryClient, model_data: str) -> ResolvedSource:
    model_data = model_data.strip()
    if match := LOGGED_MODEL.match(model_data):
        return await _logged_model(mlflow, match.group(1))
    if match := MODEL_VERSION.match(model_data):
        name, version = match["name"], canonical_version(match["version"])
        if version is None or not holdable_name(name):  # MLflow would answer 500 (a number it cannot bind)
            raise SourceNotFound(f"model version {name}:{match['version']}")
        try:
            existing = await mlflow.get_version(name, version)
        except ModelNotFound:
            raise SourceNotFound(f"model version {name}:{version}") from None
        if existing.logged_model_id is not None:
            return await _logged_model(mlflow, existing.logged_model_id, name=name)
        return ResolvedSource(existing.source, run_id=existing.run_id, name=name)
    if match := RUN_ARTIFACT.match(model_data):
        return await _run_artifact(mlflow, match["run_id"], (match["path"] or "").strip("/"))
    if match := SERVED_LOGGED_MODEL.match(model_data):
        return await _logged_model(mlflow, match["model_id"])
    if match := SERVED_RUN_ARTIFACT.match(model_data):
        return await _run_artifact(mlflow, match["run_id"], (match["path"] or "").strip("/"))
    raise InvalidRequest(
        "model_data must be a model URI: runs:/<run_id>/<path>, models:/m-<id>, models:/<name>/<version> or "
        "mlflow-artifacts:/<experiment>/<run_id>/artifacts/<path>"
    )


async def _logged_model(mlflow: RegistryClient, model_id: str, name: str | None = None) -> ResolvedSource:
    logged = await mlflow.logged_model(model_id, missing=SourceNotFound(f"logged model {model_id}"))
    assert logged is not None  # a missing one raised
    return ResolvedSource(f"models:/{model_id}", model_id=model_id, name=name or logged.name)


async def _run_artifact(mlflow: RegistryClient, run_id: str, path: str) -> ResolvedSource:
    """A run's model: the logged model (MLflow 3) of that name, else plain artifacts holding an MLmodel file."""
    run = await mlflow.run(run_id, missing=SourceNotFound(f"run {run_id}"))
    assert run is not None  # a missing one raised
    for output in run.model_outputs:
        logged = await _logged_model(mlflow, output)
        if logged.name == path:
            return logged
    listed = await mlflow.run_artifact_paths(run_id, path)
    if not any(entry.rsplit("/", 1)[-1] == "MLmodel" for entry in listed):
        raise SourceNotFound(f"no model at runs:/{run_id}/{path} (no logged model of that name, no MLmodel file)")
    return ResolvedSource(f"{run.artifact_uri.rstrip('/')}/{path}", run_id=run_id)


async def stable_model_id(database: Database, mlflow: RegistryClient, name: str) -> str:
    """The model's id: from the service database, else from the registered model's tag, else a new one."""
    async with database.session() as session:
        known = await session.scalar(select(ModelIdRow.model_id).where(ModelIdRow.name == name))
    if known:
        return known
    model = await mlflow.registered_model(name)
    model_id = model.tags.get(MODEL_ID_TAG) or "mdl_" + secrets.token_hex(12)
    await mlflow.set_model_tag(name, MODEL_ID_TAG, model_id)
    try:
        async with database.session() as session, session.begin():
            session.add(ModelIdRow(model_id=model_id, name=name, created_at=utcnow()))
    except IntegrityError:  # another request registered the same model at the same moment
        async with database.session() as session:
            return await session.scalar(select(ModelIdRow.model_id).where(ModelIdRow.name == name)) or model_id
    return model_id


def version_tags(model_type: str, metadata: dict[str, Any], model_id: str) -> dict[str, str]:
    tags = {"model_type": model_type, MODEL_ID_TAG: model_id}
    for key, value in metadata.items():
        tags[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return tags


class IdempotencyStore:
    """First answers to requests sent with an Idempotency-Key, per API key."""

    def __init__(self, database: Database) -> None:
        self._database = database

    @staticmethod
    def fingerprint(body: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()

    async def reserve(self, key_id: str, idempotency_key: str, fingerprint: str) -> dict[str, Any] | None:
        """None: go ahead (the key is now taken). A dict: the first answer, to be sent again."""
        try:
            async with self._database.session() as session, session.begin():
                session.add(
                    IdempotencyRow(
                        key_id=key_id, idempotency_key=idempotency_key, request_hash=fingerprint, created_at=utcnow()
                    )
                )
            return None
        except IntegrityError:
            pass
        async with self._database.session() as session:
            first = await session.scalar(
                select(IdempotencyRow).where(
                    IdempotencyRow.key_id == key_id, IdempotencyRow.idempotency_key == idempotency_key
                )
            )
        if first is None:
            raise NotFound("Idempotency record vanished; retry the request")
        if first.request_hash != fingerprint:
            raise Conflict("This Idempotency-Key was already used with a different request body")
        if first.response is None:
            raise Conflict("A request with this Idempotency-Key is still being processed")
        return first.response

    async def complete(self, key_id: str, idempotency_key: str, response: dict[str, Any]) -> None:
        async with self._database.session() as session, session.begin():
            row = await session.scalar(
                select(IdempotencyRow).where(
                    IdempotencyRow.key_id == key_id, IdempotencyRow.idempotency_key == idempotency_key
                )
            )
            if row is not None:
                row.response = response

    async def release(self, key_id: str, idempotency_key: str) -> None:
        """The request failed: forget the key, so that a retry is a new attempt."""
        async with self._database.session() as session, session.begin():
            await session.execute(
                delete(IdempotencyRow).where(
                    IdempotencyRow.key_id == key_id,
                    IdempotencyRow.idempotency_key == idempotency_key,
                    IdempotencyRow.response.is_(None),
                )
            )
