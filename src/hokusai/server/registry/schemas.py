"""Request and response bodies of /models/*."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

Stage = Literal["None", "Staging", "Production", "Archived"]
STAGES: dict[str, Stage] = {stage.lower(): stage for stage in ("None", "Staging", "Production", "Archived")}


class ModelVersionSummary(BaseModel):
    name: str
    version: str
    status: str
    created_at: int = Field(description="Milliseconds since the epoch, as MLflow keeps it")
    tags: dict[str, str]
    stage: Stage
    aliases: list[str]


class ModelList(BaseModel):
    models: list[ModelVersionSummary]
    next_page_token: str | None = None


class ModelVersionDetail(ModelVersionSummary):
    description: str
    source: str
    run_id: str | None
    updated_at: int


class ModelVersionUpdate(BaseModel):
    description: str | None = Field(None, max_length=5000)
    tags: dict[str, str | None] | None = Field(None, description="Merged into the version's tags; null removes a tag")

    @field_validator("tags")
    @classmethod
    def _tag_keys(cls, tags: dict[str, str | None] | None) -> dict[str, str | None] | None:
        for key in tags or {}:
            if not key.strip() or len(key) > 250:
                raise ValueError(f"tag keys must be 1-250 characters: {key!r}")
        return tags


class StageTransition(BaseModel):
    stage: Stage
    archive_existing: bool = False

    @field_validator("stage", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return STAGES.get(value.lower(), value) if isinstance(value, str) else value


class ProductionModel(BaseModel):
    name: str
    version: str
    stage: Stage
    deployed_at: str = Field(description="When the version entered Production (ISO 8601, UTC)")


class ProductionList(BaseModel):
    models: list[ProductionModel]


class Message(BaseModel):
    message: str
