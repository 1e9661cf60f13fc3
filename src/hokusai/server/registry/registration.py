"""Registering a model version from a model URI: where its files are, what it is called, and doing it once.

MLflow answers a source that does not exist with a 500 (and would trip the circuit breaker), so every source is
looked up first and a missing one is a 400 that says what was not found.

Several service processes may register at once: a model's id is claimed in the service database before MLflow is
told it, and a request sent with an Idempotency-Key holds a reservation that expires, so that a process killed in
the middle does not hold the key forever (see `IdempotencyStore`).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from hokusai.server.db import Database, utcnow
from hokusai.server.errors import Conflict, InvalidRequest, NotFound
from hokusai.server.mlflow.registry_client import LOGGED_MODEL, ModelNotFound, RegistryClient
from hokusai.server.registry.inputs import canonical_version, holdable_name
from hokusai.server.registry.models import IdempotencyRow, ModelIdRow

MODEL_ID_TAG = "hokusai_model_id"
# On every version made with an Idempotency-Key: a hash of (API key id, Idempotency-Key), never the key itself, so
# that a retry taking over an abandoned reservation finds the version the abandoned attempt may have made.
REQUEST_TAG = "hokusai_request"
OWN_MODEL_ID = re.compile(r"^mdl_[0-9a-f]{24}$")  # what `new_model_id` makes (and model_ids.model_id can hold)
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


def new_model_id() -> str:
    return "mdl_" + secrets.token_hex(12)


async def stable_model_id(database: Database, mlflow: RegistryClient, name: str) -> str:
    """The model's id, and its registered model tagged with it.

    The service database decides: the id is claimed there first (one row per name), and only then written to the
    MLflow tag, so that every process registering the model at the same moment writes the same value. (Setting the
    tag first let the loser of the insert race leave its own id in MLflow.) The tag is rewritten when it differs,
    which also heals a process killed between the claim and the tag.
    """
    model = await mlflow.registered_model(name)
    tagged = model.tags.get(MODEL_ID_TAG)
    model_id = await _known_model_id(database, name)
    if model_id is None:
        # A tag of our own format from before this database (restored MLflow, new database) is adopted.
        model_id = await claim_model_id(database, name, tagged if tagged and OWN_MODEL_ID.match(tagged) else None)
    if tagged != model_id:
        await mlflow.set_model_tag(name, MODEL_ID_TAG, model_id)
    return model_id


async def _known_model_id(database: Database, name: str) -> str | None:
    async with database.session() as session:
        return await session.scalar(select(ModelIdRow.model_id).where(ModelIdRow.name == name))


async def claim_model_id(database: Database, name: str, candidate: str | None = None) -> str:
    """The id of `name` in the database: `candidate` (else a new one) inserted, or the row another process inserted
    first. A candidate taken by another name (a tag copied between models) gives way to a new id."""
    for proposed in (candidate or new_model_id(), new_model_id()):
        try:
            async with database.session() as session, session.begin():
                session.add(ModelIdRow(model_id=proposed, name=name, created_at=utcnow()))
            return proposed
        except IntegrityError:  # the name claimed meanwhile (read it back), or the id taken by another name
            if (winner := await _known_model_id(database, name)) is not None:
                return winner
    raise Conflict(f"Could not assign an id to model {name!r}; retry the request")


def request_tag(key_id: str, idempotency_key: str) -> str:
    """The `hokusai_request` tag of a version made with this Idempotency-Key by this API key."""
    return hashlib.sha256(f"{key_id}\n{idempotency_key}".encode()).hexdigest()


def version_tags(
    model_type: str, metadata: dict[str, Any], model_id: str, request: str | None = None
) -> dict[str, str]:
    """The version's tags: metadata as text or JSON; the service's own tags last, so metadata cannot replace them."""
    tags = {"model_type": model_type}
    for key, value in metadata.items():
        tags[str(key)] = value if isinstance(value, str) else json.dumps(value)
    tags[MODEL_ID_TAG] = model_id
    if request is not None:
        tags[REQUEST_TAG] = request
    return tags


DEFAULT_PENDING_SECONDS = 300.0


@dataclass(frozen=True)
class Reservation:
    """The right to make the answer to one Idempotency-Key of one API key, held until `complete` or `release`."""

    key_id: str
    idempotency_key: str
    reserved_at: datetime  # also the row's created_at: what `complete` and `release` match, so a holder whose
    # reservation was taken over cannot drop or overwrite its successor's
    taken_over: bool = False  # an earlier attempt's reservation had expired: it may have made the version already

    @property
    def tag(self) -> str:
        return request_tag(self.key_id, self.idempotency_key)


class IdempotencyStore:
    """First answers to requests sent with an Idempotency-Key, per API key.

    A reservation pending longer than `pending_seconds` is taken as abandoned (its process died mid-request): the
    next retry takes it over with a compare-and-swap on the row's created_at, so of two retries at once exactly one
    proceeds. Before that the key answers 409: the first attempt may still be running. The window must be longer
    than any registration takes, or a slow (not dead) first attempt and the retry could both make a version.
    """

    def __init__(self, database: Database, pending_seconds: float = DEFAULT_PENDING_SECONDS) -> None:
        self._database = database
        self._pending = timedelta(seconds=pending_seconds)

    @staticmethod
    def fingerprint(body: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()

    async def reserve(self, key_id: str, idempotency_key: str, fingerprint: str) -> Reservation | dict[str, Any]:
        """A Reservation: go ahead (the key is now held). A dict: the first answer, to be sent again."""
        now = utcnow()
        try:
            async with self._database.session() as session, session.begin():
                session.add(
                    IdempotencyRow(
                        key_id=key_id, idempotency_key=idempotency_key, request_hash=fingerprint, created_at=now
                    )
                )
            return Reservation(key_id, idempotency_key, now)
        except IntegrityError:
            pass
        first = await self._row(key_id, idempotency_key)
        if first is None:
            raise NotFound("Idempotency record vanished; retry the request")
        if first.request_hash != fingerprint:
            raise Conflict("This Idempotency-Key was already used with a different request body")
        if first.response is not None:
            return first.response
        if first.created_at > now - self._pending or not await self._take_over(key_id, idempotency_key, now):
            raise Conflict("A request with this Idempotency-Key is still being processed")
        return Reservation(key_id, idempotency_key, now, taken_over=True)

    async def _take_over(self, key_id: str, idempotency_key: str, now: datetime) -> bool:
        """Move an expired pending reservation to `now`; False when another retry (or the answer) came first.

        The condition is read again by the UPDATE itself: on PostgreSQL a concurrent UPDATE of the same row waits for
        the first to commit and then sees its fresh created_at, on SQLite writes take turns; either way one wins."""
        async with self._database.session() as session, session.begin():
            moved = await session.execute(
                update(IdempotencyRow)
                .where(
                    IdempotencyRow.key_id == key_id,
                    IdempotencyRow.idempotency_key == idempotency_key,
                    IdempotencyRow.response.is_(None),
                    IdempotencyRow.created_at <= now - self._pending,
                )
                .values(created_at=now)
                .execution_options(synchronize_session=False)
            )
        return moved.rowcount == 1

    async def _row(self, key_id: str, idempotency_key: str) -> IdempotencyRow | None:
        async with self._database.session() as session:
            return await session.scalar(
                select(IdempotencyRow).where(
                    IdempotencyRow.key_id == key_id, IdempotencyRow.idempotency_key == idempotency_key
                )
            )

    async def complete(self, reservation: Reservation, response: dict[str, Any]) -> None:
        """Keep the answer (unless the reservation was taken over meanwhile: the successor's answer is kept)."""
        async with self._database.session() as session, session.begin():
            await session.execute(
                update(IdempotencyRow)
                .where(*self._held(reservation))
                .values(response=response)
                .execution_options(synchronize_session=False)
            )

    async def release(self, reservation: Reservation) -> None:
        """The request failed: forget the key, so that a retry is a new attempt."""
        async with self._database.session() as session, session.begin():
            await session.execute(delete(IdempotencyRow).where(*self._held(reservation)))

    @staticmethod
    def _held(reservation: Reservation) -> Iterable[Any]:
        return (
            IdempotencyRow.key_id == reservation.key_id,
            IdempotencyRow.idempotency_key == reservation.idempotency_key,
            IdempotencyRow.response.is_(None),
            IdempotencyRow.created_at == reservation.reserved_at,
        )


@dataclass(frozen=True)
class ModelIdFinding:
    """One disagreement between the service database's model ids and MLflow's `hokusai_model_id` tags.

    kind: "mismatch" (the tag differs from the row, or is missing), "no_model" (a row whose registered model is
    gone from MLflow), "no_row" (a tagged registered model the database has no row for)."""

    kind: str
    name: str
    database_id: str | None
    mlflow_tag: str | None
    repaired: bool = False


@dataclass(frozen=True)
class ModelIdReport:
    rows: int
    registered_models: int
    findings: tuple[ModelIdFinding, ...]

    @property
    def unrepaired_mismatches(self) -> int:
        return sum(1 for f in self.findings if f.kind == "mismatch" and not f.repaired)


async def check_model_ids(database: Database, mlflow: RegistryClient, repair: bool = False) -> ModelIdReport:
    """Compare every model_ids row with its registered model's tag; with `repair`, set each differing tag to the
    row's id (the row is the truth: contributions and answers already given reference it)."""
    async with database.session() as session:
        rows = dict((await session.execute(select(ModelIdRow.name, ModelIdRow.model_id))).tuples().all())
    tags = {model.name: model.tags.get(MODEL_ID_TAG) async for model in mlflow.every_registered_model()}
    findings = []
    for name, model_id in sorted(rows.items()):
        if name not in tags:
            findings.append(ModelIdFinding("no_model", name, model_id, None))
        elif tags[name] != model_id:
            if repair:
                await mlflow.set_model_tag(name, MODEL_ID_TAG, model_id)
            findings.append(ModelIdFinding("mismatch", name, model_id, tags[name], repaired=repair))
    findings += [
        ModelIdFinding("no_row", name, None, tag) for name, tag in sorted(tags.items()) if tag and name not in rows
    ]
    return ModelIdReport(len(rows), len(tags), tuple(findings))
