"""A registered model's state as MLflow holds it, and the events that turn one observed state into the next.

Pure: no I/O. `RegistryChanges` (changes.py) reads MLflow, loads the last snapshot, and writes what `diff` answers.
The service's own bookkeeping tags (the model id, the idempotency request hash) are not changes anyone asked for,
so they are left out of the state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hokusai.server.events import types
from hokusai.server.events.outbox import Actor, NewEvent
from hokusai.server.mlflow.registry_client import ModelVersion, RegisteredModel
from hokusai.server.registry.registration import MODEL_ID_TAG, REQUEST_TAG

INTERNAL_MODEL_TAGS = frozenset({MODEL_ID_TAG})
INTERNAL_VERSION_TAGS = frozenset({REQUEST_TAG})
VERSION_FIELDS = ("stage", "status", "description", "tags", "source", "run_id")


@dataclass(frozen=True)
class ModelState:
    name: str
    created_ms: int
    updated_ms: int
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias -> version
    model_id: str | None = None
    versions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # version -> VERSION_FIELDS

    @classmethod
    def read(cls, model: RegisteredModel, versions: Iterable[ModelVersion]) -> ModelState:
        return cls(
            name=model.name,
            created_ms=model.created_ms,
            updated_ms=model.updated_ms,
            description=model.description,
            tags={k: v for k, v in model.tags.items() if k not in INTERNAL_MODEL_TAGS},
            aliases=dict(model.aliases),
            model_id=model.tags.get(MODEL_ID_TAG),
            versions={v.version: version_state(v) for v in versions if v.name == model.name},
        )

    def model_part(self) -> dict[str, Any]:
        """What the snapshot's model row keeps as JSON (the versions have rows of their own)."""
        return {
            "description": self.description,
            "tags": dict(self.tags),
            "aliases": dict(self.aliases),
            "model_id": self.model_id,
        }

    @classmethod
    def stored(
        cls, name: str, created_ms: int, updated_ms: int, part: Mapping[str, Any], versions: Mapping[str, Any]
    ) -> ModelState:
        return cls(
            name=name,
            created_ms=created_ms,
            updated_ms=updated_ms,
            description=part.get("description", ""),
            tags=part.get("tags", {}),
            aliases=part.get("aliases", {}),
            model_id=part.get("model_id"),
            versions=versions,
        )


def version_state(version: ModelVersion) -> dict[str, Any]:
    return {
        "stage": version.stage,
        "status": version.status,
        "description": version.description or "",
        "tags": {k: v for k, v in version.tags.items() if k not in INTERNAL_VERSION_TAGS},
        "source": version.source,
        "run_id": version.run_id,
    }


def tag_changes(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, Any]:
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    removed = sorted(k for k in before if k not in after)
    result: dict[str, Any] = {}
    if changed:
        result["set"] = changed
    if removed:
        result["deleted"] = removed
    return result


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (1 << 62, version)


@dataclass
class _Builder:
    actor: Actor
    state: ModelState
    events: list[NewEvent] = field(default_factory=list)

    def add(self, type_: str, version: str | None = None, **payload: Any) -> None:
        self.events.append(
            NewEvent(type_, self.actor, self.state.name, version, model_id=self.state.model_id, payload=payload)
        )


def diff(before: ModelState | None, after: ModelState | None, actor: Actor, origin_ms: int) -> list[NewEvent]:
    """The events from `before` (the snapshot; None: never seen) to `after` (MLflow now; None: no such model).

    A model never seen that MLflow created before the event log began (`origin_ms`) is taken in silently. A model
    deleted and created again under the same name between two looks is both events."""
    if after is None:
        if before is None:
            return []
        gone = _Builder(actor, before)
        gone.add(types.REGISTERED_MODEL_DELETED, versions=sorted(before.versions, key=_version_key))
        return gone.events
    if before is not None and before.created_ms != after.created_ms:
        return diff(before, None, actor, origin_ms) + diff(None, after, actor, origin_ms)
    out = _Builder(actor, after)
    if before is None:
        if after.created_ms < origin_ms:
            return []
        out.add(types.REGISTERED_MODEL_CREATED, description=after.description, tags=dict(after.tags))
        before = ModelState(after.name, after.created_ms, after.updated_ms, model_id=after.model_id)
    else:
        changes: dict[str, Any] = {}
        if before.description != after.description:
            changes["description"] = {"from": before.description, "to": after.description}
        if tags := tag_changes(before.tags, after.tags):
            changes["tags"] = tags
        if changes:
            out.add(types.REGISTERED_MODEL_UPDATED, **changes)
    for version in sorted(set(before.versions) | set(after.versions), key=_version_key):
        old, new = before.versions.get(version), after.versions.get(version)
        if old is None and new is not None:
            out.add(types.VERSION_CREATED, version, **new)
        elif new is None and old is not None:
            # Its aliases went with it: part of this one change, not events of their own.
            aliases = sorted(alias for alias, target in before.aliases.items() if target == version)
            out.add(types.VERSION_DELETED, version, stage=old["stage"], aliases=aliases)
        elif old is not None and new is not None:
            if old["stage"] != new["stage"]:
                out.add(types.VERSION_STAGE_CHANGED, version, **{"from": old["stage"], "to": new["stage"]})
            changes = {
                name: {"from": old.get(name), "to": new.get(name)}
                for name in ("status", "description", "source", "run_id")
                if old.get(name) != new.get(name)
            }
            if tags := tag_changes(old["tags"], new["tags"]):
                changes["tags"] = tags
            if changes:
                out.add(types.VERSION_UPDATED, version, **changes)
    for alias in sorted(set(before.aliases) | set(after.aliases)):
        old_version, new_version = before.aliases.get(alias), after.aliases.get(alias)
        if new_version is not None and new_version != old_version:
            out.add(types.VERSION_ALIAS_SET, new_version, alias=alias, previous_version=old_version)
        elif new_version is None and old_version is not None and old_version in after.versions:
            out.add(types.VERSION_ALIAS_DELETED, old_version, alias=alias)
    return out.events
