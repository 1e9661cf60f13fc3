"""The event types, and the patterns subscriptions and filters use to name them ("model_version.*", "*")."""

from __future__ import annotations

from collections.abc import Iterable

REGISTERED_MODEL_CREATED = "registered_model.created"
REGISTERED_MODEL_UPDATED = "registered_model.updated"
REGISTERED_MODEL_DELETED = "registered_model.deleted"
VERSION_CREATED = "model_version.created"
VERSION_UPDATED = "model_version.updated"
VERSION_DELETED = "model_version.deleted"
VERSION_STAGE_CHANGED = "model_version.stage_changed"
VERSION_ALIAS_SET = "model_version.alias_set"
VERSION_ALIAS_DELETED = "model_version.alias_deleted"
VERSION_IMPROVED = "model_version.improved"
EVALUATION_COMPLETED = "evaluation.completed"
EVALUATION_FAILED = "evaluation.failed"
CONTRIBUTION_RECORDED = "contribution.recorded"
WEBHOOK_TEST = "webhook.test"  # sent by POST /api/v1/webhooks/{id}/test only; never in the log

EVENT_TYPES = (
    REGISTERED_MODEL_CREATED,
    REGISTERED_MODEL_UPDATED,
    REGISTERED_MODEL_DELETED,
    VERSION_CREATED,
    VERSION_UPDATED,
    VERSION_DELETED,
    VERSION_STAGE_CHANGED,
    VERSION_ALIAS_SET,
    VERSION_ALIAS_DELETED,
    VERSION_IMPROVED,
    EVALUATION_COMPLETED,
    EVALUATION_FAILED,
    CONTRIBUTION_RECORDED,
)


def pattern_problem(pattern: str) -> str | None:
    """Why a type pattern can match nothing (None when it is fine): an exact type, "<family>.*" or "*"."""
    if pattern == "*" or pattern in EVENT_TYPES:
        return None
    if pattern.endswith(".*") and any(t.startswith(pattern[:-1]) for t in EVENT_TYPES):
        return None
    return f"Unknown event type or pattern {pattern!r} (known: {', '.join(EVENT_TYPES)}; wildcards: 'family.*', '*')"


def matches(patterns: Iterable[str], event_type: str) -> bool:
    for pattern in patterns:
        if pattern == "*" or pattern == event_type:
            return True
        if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
            return True
    return False
