"""/api/v1/dspy/*: thin routes over DspyService."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from hokusai.server.auth.dependencies import require_scope
from hokusai.server.auth.keys import Scope
from hokusai.server.auth.store import ApiKeyInfo
from hokusai.server.dspy.schemas import (
    BatchExecuteRequest,
    BatchResult,
    DspyHealth,
    ExecuteRequest,
    ExecutionRecord,
    ExecutionResult,
    Message,
    ProgramDeclaration,
    ProgramView,
    StatsResponse,
)
from hokusai.server.dspy.service import DspyService
from hokusai.server.runtime import get_runtime

read = require_scope(Scope.READ)
write = require_scope(Scope.WRITE)
admin = require_scope(Scope.ADMIN)
router = APIRouter(prefix="/api/v1/dspy", tags=["dspy"])


def dspy_service(request: Request) -> DspyService:
    return get_runtime(request).dspy


@router.post("/programs", response_model=ProgramView, status_code=201)
async def register_program(body: ProgramDeclaration, request: Request, key: ApiKeyInfo = Depends(write)) -> ProgramView:
    return await dspy_service(request).register(body, key.id)


@router.get("/programs", response_model=list[ProgramView], dependencies=[Depends(read)])
async def list_programs(request: Request) -> list[ProgramView]:
    return await dspy_service(request).list_programs()


@router.get("/programs/{program_id}", response_model=ProgramView, dependencies=[Depends(read)])
async def get_program(
    program_id: str, request: Request, version: str | None = Query(None, description="Default: the latest")
) -> ProgramView:
    return await dspy_service(request).get_program(program_id, version)


@router.put("/programs/{program_id}/versions/{version}", response_model=ProgramView, dependencies=[Depends(write)])
async def update_program(program_id: str, version: str, body: ProgramDeclaration, request: Request) -> ProgramView:
    return await dspy_service(request).update(program_id, version, body)


@router.delete("/programs/{program_id}", response_model=Message, dependencies=[Depends(write)])
async def delete_program(
    program_id: str, request: Request, version: str | None = Query(None, description="Default: every version")
) -> Message:
    return await dspy_service(request).delete_program(program_id, version)


@router.post("/execute", response_model=ExecutionResult)
async def execute(body: ExecuteRequest, request: Request, key: ApiKeyInfo = Depends(read)) -> ExecutionResult:
    return await dspy_service(request).execute(body, key)


@router.post("/execute/batch", response_model=BatchResult)
async def execute_batch(body: BatchExecuteRequest, request: Request, key: ApiKeyInfo = Depends(read)) -> BatchResult:
    return await dspy_service(request).execute_batch(body, key)


@router.get("/execution/{execution_id}", response_model=ExecutionRecord)
async def get_execution(execution_id: str, request: Request, key: ApiKeyInfo = Depends(read)) -> ExecutionRecord:
    return await dspy_service(request).execution(execution_id, key)


@router.get("/stats", response_model=StatsResponse, dependencies=[Depends(read)])
async def stats(request: Request) -> StatsResponse:
    return await dspy_service(request).stats()


@router.post("/cache/clear", response_model=Message, dependencies=[Depends(admin)])
async def clear_cache(request: Request) -> Message:
    return await dspy_service(request).clear_cache()


@router.get("/health", response_model=DspyHealth)
async def health(request: Request) -> DspyHealth:
    """Public, like /health: whether a language model is configured, and the execution totals."""
    return await dspy_service(request).health()
