"""/api/v1/dspy/*: thin routes over DspyService."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from hokusai.server.auth.dependencies import allow
from hokusai.server.deps import Caller, Cluster, Dspy
from hokusai.server.dspy.schemas import (
    BatchExecuteRequest,
    BatchResult,
    CacheCleared,
    DspyHealth,
    ExecuteRequest,
    ExecutionRecord,
    ExecutionResult,
    Message,
    ProgramDeclaration,
    ProgramView,
    StatsResponse,
)

read = Depends(allow("dspy:read"))
write = Depends(allow("dspy:write"))
admin = Depends(allow("dspy:admin"))
router = APIRouter(prefix="/api/v1/dspy", tags=["dspy"])


@router.post("/programs", response_model=ProgramView, status_code=201, dependencies=[write])
async def register_program(body: ProgramDeclaration, caller: Caller, dspy: Dspy) -> ProgramView:
    return await dspy.register(body, caller)


@router.get("/programs", response_model=list[ProgramView], dependencies=[read])
async def list_programs(dspy: Dspy) -> list[ProgramView]:
    return await dspy.list_programs()


@router.get("/programs/{program_id}", response_model=ProgramView, dependencies=[read])
async def get_program(
    program_id: str, dspy: Dspy, version: str | None = Query(None, description="Default: the latest")
) -> ProgramView:
    return await dspy.get_program(program_id, version)


@router.put("/programs/{program_id}/versions/{version}", response_model=ProgramView, dependencies=[write])
async def update_program(
    program_id: str, version: str, body: ProgramDeclaration, caller: Caller, dspy: Dspy
) -> ProgramView:
    return await dspy.update(program_id, version, body, caller)


@router.delete("/programs/{program_id}", response_model=Message, dependencies=[write])
async def delete_program(
    program_id: str,
    caller: Caller,
    dspy: Dspy,
    version: str | None = Query(None, description="Default: every version"),
) -> Message:
    return await dspy.delete_program(program_id, version, caller)


@router.post("/execute", response_model=ExecutionResult, dependencies=[read])
async def execute(body: ExecuteRequest, caller: Caller, dspy: Dspy) -> ExecutionResult:
    return await dspy.execute(body, caller)


@router.post("/execute/batch", response_model=BatchResult, dependencies=[read])
async def execute_batch(body: BatchExecuteRequest, caller: Caller, dspy: Dspy) -> BatchResult:
    return await dspy.execute_batch(body, caller)


@router.get("/execution/{execution_id}", response_model=ExecutionRecord, dependencies=[read])
async def get_execution(execution_id: str, caller: Caller, dspy: Dspy) -> ExecutionRecord:
    return await dspy.execution(execution_id, caller)


@router.get("/stats", response_model=StatsResponse, dependencies=[read])
async def stats(dspy: Dspy) -> StatsResponse:
    return await dspy.stats()


@router.post("/cache/clear", response_model=CacheCleared, response_model_exclude_none=True, dependencies=[admin])
async def clear_cache(caller: Caller, dspy: Dspy, cluster: Cluster) -> CacheCleared:
    """In every service process (through Redis); `processes_reached` says how many."""
    return await dspy.clear_cache(caller, cluster)


@router.get("/health", response_model=DspyHealth)
async def health(dspy: Dspy) -> DspyHealth:
    """Public, like /health: whether a language model is configured, and the execution totals."""
    return await dspy.health()
