"""Request and response bodies of /models/*."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, field_validator

from hokusai.server.registry.inputs import (
    MAX_ALIAS_LENGTH,
    MAX_DESCRIPTION_LENGTH,
    MAX_NAME_LENGTH,
    MAX_TAG_KEY_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    MAX_TAGS_PER_REQUEST,
    canonical_version,
    holdable_name,
    name_problem,
)

Stage = Literal["None", "Staging", "Production", "Archived"]
STAGES: dict[str, Stage] = {stage.lower(): stage for stage in ("None", "Staging", "Production", "Archived")}


class ModelVersionSummary(BaseModel):
    name: str
    version: str
    status: str
    created_at: int = Field(description="Milliseconds since the epoch, as MLflow keeps it")
    tags: dict[str, str]
    stage: Stage
    # Only when asked for (`include=aliases`): MLflow's version search does not return them, so each list with them
    # costs a second MLflow call. Absent rather than [] otherwise, so "not asked" never reads as "no aliases".
    aliases: list[str] | None = Field(
        None, exclude_if=lambda aliases: aliases is None, description="With include=aliases"
    )


class ModelList(BaseModel):
    models: list[ModelVersionSummary]
    next_page_token: str | None = None


class ModelVersionDetail(ModelVersionSummary):
    aliases: list[str]  # model-versions/get returns them: always there
    description: str
    source: str
    run_id: str | None
    updated_at: int


def _tag_key(key: str) -> str:
    if not key.strip() or len(key) > MAX_TAG_KEY_LENGTH:
        raise ValueError(f"tag keys must be 1-{MAX_TAG_KEY_LENGTH} characters")
    return key


# Bounded as MLflow's columns are (each tag is one MLflow call, so their number is bounded too).
TagKey = Annotated[str, AfterValidator(_tag_key)]
TagValue = Annotated[str, Field(max_length=MAX_TAG_VALUE_LENGTH)]
Description = Annotated[str, Field(max_length=MAX_DESCRIPTION_LENGTH)]


class ModelVersionUpdate(BaseModel):
    description: Description | None = None
    tags: dict[TagKey, TagValue | None] | None = Field(
        None, max_length=MAX_TAGS_PER_REQUEST, description="Merged into the version's tags; null removes a tag"
    )


def stage_in_any_case(value: object) -> object:
    """`production`, `PRODUCTION` ... -> `Production`; anything else is left for the Literal to refuse (422)."""
    return STAGES.get(value.lower(), value) if isinstance(value, str) else value


AnyCaseStage = Annotated[Stage, BeforeValidator(stage_in_any_case)]


class StageTransition(BaseModel):
    stage: AnyCaseStage
    archive_existing: bool = False


class ProductionModel(BaseModel):
    name: str
    version: str
    stage: Stage
    deployed_at: str = Field(description="When the version entered Production (ISO 8601, UTC)")


class ProductionList(BaseModel):
    models: list[ProductionModel]


class Message(BaseModel):
    message: str


# --- batch ---------------------------------------------------------------------------------------------------

MAX_BATCH_OPERATIONS = 100


class _Operation(BaseModel):
    model: str = Field(max_length=MAX_NAME_LENGTH + 11, description='"name:version"')

    @field_validator("model")
    @classmethod
    def _model_version(cls, model: str) -> str:
        """A name and a version MLflow can hold; the version written canonically (`m:007` -> `m:7`)."""
        name, colon, version = model.rpartition(":")
        number = canonical_version(version)
        if not colon or not name or number is None or not holdable_name(name):
            raise ValueError('expected "name:version" with a positive version number')
        return f"{name}:{number}"

    @property
    def name(self) -> str:
        return self.model.rsplit(":", 1)[0]

    @property
    def version(self) -> str:
        return self.model.rsplit(":", 1)[1]


class TransitionOperation(_Operation):
    action: Literal["transition_stage"]
    stage: AnyCaseStage
    archive_existing: bool = False


class SetTagsOperation(_Operation):
    action: Literal["set_tags"]
    tags: dict[TagKey, TagValue] = Field(min_length=1, max_length=MAX_TAGS_PER_REQUEST)


class DeleteTagsOperation(_Operation):
    action: Literal["delete_tags"]
    keys: list[TagKey] = Field(min_length=1, max_length=MAX_TAGS_PER_REQUEST)


class SetAliasOperation(_Operation):
    action: Literal["set_alias"]
    alias: str = Field(min_length=1, max_length=MAX_ALIAS_LENGTH, pattern=r"^[A-Za-z0-9_-]+$")


class DeleteAliasOperation(_Operation):
    action: Literal["delete_alias"]
    alias: str = Field(min_length=1, max_length=MAX_ALIAS_LENGTH)


class UpdateDescriptionOperation(_Operation):
    action: Literal["update_description"]
    description: Description


class DeleteVersionOperation(_Operation):
    action: Literal["delete_version"]


BatchOperation = Annotated[
    TransitionOperation
    | SetTagsOperation
    | DeleteTagsOperation
    | SetAliasOperation
    | DeleteAliasOperation
    | UpdateDescriptionOperation
    | DeleteVersionOperation,
    Field(discriminator="action"),
]


class BatchRequest(BaseModel):
    operations: list[BatchOperation] = Field(min_length=1, max_length=MAX_BATCH_OPERATIONS)
    stop_on_error: bool = False


class BatchOperationResult(BaseModel):
    """The outcome of one operation of POST /models/batch (dspy's BatchResult is a whole batch's answer)."""

    index: int
    action: str
    model: str
    success: bool
    error: str | None = None
    result: dict | None = None


class BatchResponse(BaseModel):
    total: int
    successful: int
    failed: int
    skipped: int
    results: list[BatchOperationResult]


# --- registration --------------------------------------------------------------------------------------------

# Fixed path segments of /models/*: a model with one of these names could never be addressed.
RESERVED_MODEL_NAMES = frozenset(
    {"compare", "evaluate", "evaluations", "production", "register", "batch", "contributors"}
)


MAX_METADATA_ENTRIES = MAX_TAGS_PER_REQUEST - 2  # model_type and hokusai_model_id are tags too


class RegisterRequest(BaseModel):
    model_data: str = Field(
        min_length=1,
        max_length=1000,
        description="runs:/..., models:/m-..., models:/name/version, mlflow-artifacts:/...",
    )
    model_type: str = Field(min_length=1, max_length=100)
    model_name: str | None = Field(None, min_length=1, max_length=MAX_NAME_LENGTH)
    metadata: dict[TagKey, Any] = Field(
        default_factory=dict,
        max_length=MAX_METADATA_ENTRIES,
        description=f"Becomes the version's tags (each value as text or JSON, at most {MAX_TAG_VALUE_LENGTH} chars)",
    )

    @field_validator("model_name")
    @classmethod
    def _addressable(cls, name: str | None) -> str | None:
        if name is not None:
            if (problem := name_problem(name)) is not None:
                raise ValueError(problem)
            if name.lower() in RESERVED_MODEL_NAMES:
                raise ValueError(f"{name!r} is reserved: it is a fixed segment of /models/*")
        return name

    @field_validator("metadata")
    @classmethod
    def _tag_values(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        for value in metadata.values():
            text = value if isinstance(value, str) else json.dumps(value)
            if len(text) > MAX_TAG_VALUE_LENGTH:
                raise ValueError(f"metadata values are at most {MAX_TAG_VALUE_LENGTH} characters (as text or JSON)")
        return metadata


class RegisterResponse(BaseModel):
    model_id: str
    model_name: str
    version: str
    registration_timestamp: str
