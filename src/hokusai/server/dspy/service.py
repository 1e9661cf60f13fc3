"""DspyService: program declarations, executions (single, batch, dry run, debug), their records and statistics.

Knows nothing of HTTP. An execution that ran is always recorded, failed or not, and its record is committed before
its answer is returned; a request refused before running (unknown program, inputs that do not fit the signature, no
language model) is not an execution.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

import anyio

from hokusai.server.auth.caller import Caller
from hokusai.server.auth.keys import Scope
from hokusai.server.cluster import Applied, ClusterBus, ClusterOperation
from hokusai.server.config import Settings
from hokusai.server.db import Database, utcnow
from hokusai.server.dspy.executor import (
    NO_LANGUAGE_MODEL,
    CapturedCalls,
    ExecutionFailed,
    LanguageModels,
    ProgramCache,
    RunnableProgram,
    check_declaration,
    check_inputs,
    configure_dspy,
    load_trusted,
    render_prompt,
    run_program,
)
from hokusai.server.dspy.models import DspyProgramRow
from hokusai.server.dspy.pickled import PickledProgramsRefused, load_pickled
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
    ProgramLM,
    ProgramView,
    SignatureView,
    StatsResponse,
)
from hokusai.server.dspy.signatures import parse_signature
from hokusai.server.dspy.store import ExecutionOutcome, ExecutionStore, ProgramStore, RecordWriter
from hokusai.server.errors import InvalidRequest, NotFound, Unprocessable
from hokusai.server.models.files import ModelFiles
from hokusai.server.timestamps import iso

logger = logging.getLogger(__name__)


class ExecutionNotFound(NotFound):
    def __init__(self, execution_id: str) -> None:
        super().__init__(f"Execution not found: {execution_id}")


class DspyService:
    def __init__(self, settings: Settings, database: Database, model_files: ModelFiles) -> None:
        """`model_files` fetches MLflow model versions (pickled programs, when they are allowed)."""
        self._settings = settings
        self._model_files = model_files
        self.programs = ProgramStore(database)
        self.executions = ExecutionStore(database)
        self.records = RecordWriter(self.executions)
        self._rows: dict[tuple[str, str | None], tuple[float, DspyProgramRow]] = {}
        self.models = LanguageModels(settings)
        self.cache = ProgramCache()
        self.trusted: dict[str, RunnableProgram] = {}

    async def start(self) -> None:
        """DSPy's cache set up; operator-trusted programs imported (in a worker thread: an import may do I/O)."""
        configure_dspy()
        for program_id, target in self._settings.dspy_trusted_programs.items():
            try:
                self.trusted[program_id] = await anyio.to_thread.run_sync(load_trusted, program_id, target)
            except Exception:  # one broken module must not keep the service down: logged, left out
                logger.exception("Trusted DSPy program %s (%s) could not be loaded", program_id, target)

    # --- programs ----------------------------------------------------------------------------------------

    # Every write takes its `actor`, the caller who asked for it (what an audit log or an event records).

    async def register(self, declaration: ProgramDeclaration, actor: Caller) -> ProgramView:
        signatures = await self._check(declaration)
        self._forget(declaration.program_id)
        return _view(await self.programs.create(declaration, actor.key_id, signatures))

    async def update(
        self, program_id: str, version: str, declaration: ProgramDeclaration, actor: Caller
    ) -> ProgramView:
        if declaration.program_id != program_id or declaration.version != version:
            raise InvalidRequest("program_id and version in the body must match the path")
        signatures = await self._check(declaration)
        self._forget(program_id)
        return _view(await self.programs.update(declaration, signatures))

    async def _check(self, declaration: ProgramDeclaration) -> list[str]:
        """The signatures to store, once the declaration is known to build (a pickle: once it loads)."""
        if declaration.program_id in self.trusted:
            raise InvalidRequest(f"{declaration.program_id} names a trusted program of the operator's configuration")
        if declaration.source is not None:
            program = await self._unpickle(declaration.source)
            return [predictor.signature.signature for predictor in program.predictors()]
        check_declaration(declaration.signature_list, declaration.module, declaration.demos, declaration.instructions)
        return declaration.signature_list

    async def _unpickle(self, source: str) -> Any:
        if not self._settings.dspy_allow_pickled:
            raise PickledProgramsRefused()
        name, _, version = source.removeprefix("models:/").rpartition("/")
        directory = await self._model_files.local_copy(name, version)
        return await anyio.to_thread.run_sync(load_pickled, directory)

    async def list_programs(self) -> list[ProgramView]:
        declared = [_view(row) for row in await self.programs.list()]
        return declared + [_trusted_view(program) for program in self.trusted.values()]

    async def get_program(self, program_id: str, version: str | None) -> ProgramView:
        if program_id in self.trusted and version in (None, "trusted"):
            return _trusted_view(self.trusted[program_id])
        return _view(await self.programs.get(program_id, version))

    async def delete_program(self, program_id: str, version: str | None, actor: Caller) -> Message:
        self._forget(program_id)
        deleted = await self.programs.delete(program_id, version)
        shown = f"version {version} of {program_id}" if version else f"{program_id} ({deleted} versions)"
        return Message(message=f"Deleted {shown}")

    async def _runnable(self, program_id: str, version: str | None) -> RunnableProgram:
        if program_id in self.trusted and version in (None, "trusted"):
            return self.trusted[program_id]
        row = await self._row(program_id, version)
        if row.source is None:
            return self.cache.get(row)
        if (program := self.cache.peek(row)) is not None:
            return program
        module = await self._unpickle(row.source)  # refused here too if the setting was turned off since
        return self.cache.put(row, RunnableProgram(row.program_id, row.version, module, None, row.lm))

    async def _row(self, program_id: str, version: str | None) -> DspyProgramRow:
        """The declaration to run, kept HOKUSAI_DSPY_PROGRAM_CACHE_TTL seconds (a lookup costs ~0.8 ms on SQLite).

        Changes made through this process show at once; those made through another process within the TTL.
        """
        now = time.monotonic()
        cached = self._rows.get((program_id, version))
        if cached is not None and now - cached[0] < self._settings.dspy_program_cache_ttl:
            return cached[1]
        row = await self.programs.get(program_id, version)
        self._rows[(program_id, version)] = (now, row)
        return row

    def _forget(self, program_id: str) -> None:
        for key in [key for key in self._rows if key[0] == program_id]:
            del self._rows[key]

    # --- executions --------------------------------------------------------------------------------------

    def _timeout(self, asked: float | None) -> float:
        return min(asked or self._settings.dspy_timeout, self._settings.dspy_max_timeout)

    async def execute(self, request: ExecuteRequest, key: Caller) -> ExecutionResult:
        """The result; an execution that failed raises its error (502/504) with its id in X-Execution-Id."""
        program = await self._runnable(request.program_id, request.version)
        inputs = check_inputs(program, request.inputs)
        lm = self.models.for_program(program.lm_settings) if request.mode != "dry_run" else None
        result, outcome, error = await self._run(program, lm, inputs, request.mode, self._timeout(request.timeout), key)
        await self.records.write([outcome])  # committed before the answer (or RecordNotSaved, 503, instead of it)
        if error is not None:
            error.headers = {**(error.headers or {}), "X-Execution-Id": outcome.execution_id}
            raise error
        return result

    async def execute_batch(self, request: BatchExecuteRequest, key: Caller) -> BatchResult:
        """Items run at once, at most HOKUSAI_DSPY_BATCH_CONCURRENCY at a time; results in the order given."""
        if len(request.inputs_list) > self._settings.dspy_max_batch_items:
            raise Unprocessable(f"A batch holds at most {self._settings.dspy_max_batch_items} items")
        program = await self._runnable(request.program_id, request.version)
        lm = self.models.for_program(program.lm_settings) if request.mode != "dry_run" else None
        batch_id = str(uuid.uuid4())
        timeout = self._timeout(request.timeout)
        slots = asyncio.Semaphore(self._settings.dspy_batch_concurrency)
        started = time.perf_counter()

        async def item(inputs: dict[str, Any]) -> tuple[ExecutionResult, ExecutionOutcome]:
            async with slots:
                try:
                    inputs, refusal = check_inputs(program, inputs), None
                except Unprocessable as exc:  # a failed item, recorded, not a failed batch
                    refusal = ExecutionFailed(exc.detail, "invalid_input")
                result, outcome, _ = await self._run(program, lm, inputs, request.mode, timeout, key, batch_id, refusal)
                return result, outcome

        done = await asyncio.gather(*(item(inputs) for inputs in request.inputs_list))
        await self.records.write([outcome for _, outcome in done])  # one transaction, before the answer
        results = [result for result, _ in done]
        successful = sum(1 for result in results if result.success)
        return BatchResult(
            batch_id=batch_id,
            total=len(results),
            successful=successful,
            failed=len(results) - successful,
            execution_time=time.perf_counter() - started,
            results=results,
        )

    async def _run(
        self,
        program: RunnableProgram,
        lm: Any,
        inputs: dict[str, Any],
        mode: str,
        timeout: float,
        key: Caller,
        batch_id: str | None = None,
        refusal: ExecutionFailed | None = None,
    ) -> tuple[ExecutionResult, ExecutionOutcome, ExecutionFailed | None]:
        """Run the program (unless `refusal` says why not) and describe the execution: its answer and its record."""
        execution_id = str(uuid.uuid4())
        started_at, started = utcnow(), time.perf_counter()
        metadata: dict[str, Any] = {"program_version": program.version, "mode": mode}
        outputs: dict[str, Any] | None = None
        usage: dict[str, Any] | None = None
        error = refusal
        if refusal is None and mode == "dry_run":
            metadata["prompt"] = render_prompt(program, inputs)
            outputs = {}
        elif refusal is None:
            capture = CapturedCalls() if mode == "debug" else None
            metadata["language_model"] = lm.model
            try:
                outputs, usage = await run_program(program, lm, inputs, timeout, capture)
            except ExecutionFailed as exc:
                error, usage = exc, exc.usage
            metadata["usage"] = usage
            if capture is not None:
                metadata["lm_calls"] = capture.calls
        duration = time.perf_counter() - started
        if batch_id is not None:
            metadata["batch_id"] = batch_id
        result = ExecutionResult(
            execution_id=execution_id,
            success=error is None,
            outputs=outputs,
            error=error.detail if error else None,
            execution_time=duration,
            program_name=program.program_id,
            metadata=metadata,
        )
        keep = self._settings.dspy_record_content
        outcome = ExecutionOutcome(
            execution_id=execution_id,
            program_id=program.program_id,
            program_version=program.version,
            batch_id=batch_id,
            key_id=key.key_id,
            mode=mode,
            success=error is None,
            error=result.error,
            error_type=error.error_type if error else None,
            duration_ms=duration * 1000,
            input_bytes=_size(inputs),
            output_bytes=_size(outputs),
            inputs=_plain(inputs) if keep else None,
            outputs=_plain(outputs) if keep else None,
            usage=usage,
            started_at=started_at,
        )
        return result, outcome, error

    async def execution(self, execution_id: str, key: Caller) -> ExecutionRecord:
        """Served to the key that ran it, or to an admin; to anyone else it does not exist."""
        row = await self.executions.get(execution_id)
        if row is None or (row.key_id != key.id and Scope.ADMIN not in key.scopes):
            raise ExecutionNotFound(execution_id)
        return ExecutionRecord(
            execution_id=row.id,
            program_id=row.program_id,
            program_version=row.program_version,
            batch_id=row.batch_id,
            mode=row.mode,
            success=row.success,
            error=row.error,
            error_type=row.error_type,
            execution_time=row.duration_ms / 1000,
            input_bytes=row.input_bytes,
            output_bytes=row.output_bytes,
            inputs=row.inputs,
            outputs=row.outputs,
            usage=row.usage,
            started_at=iso(row.started_at),
        )

    async def stats(self) -> StatsResponse:
        return StatsResponse(
            statistics=await self.executions.statistics(),
            cache_enabled=self._settings.dspy_cache,
            mlflow_tracking=False,
            language_model=self.models.default_model,
        )

    async def clear_cache(self, actor: Caller, cluster: ClusterBus | None = None) -> CacheCleared:
        """The built programs and DSPy's in-memory response cache, in every service process through `cluster` (each
        process registers its `clear_local_cache` as the handler of DSPY_CACHE_CLEAR); without one, here only."""
        if cluster is None:
            applied = Applied(self.clear_local_cache(), processes=1)
        else:
            applied = await cluster.run(ClusterOperation.DSPY_CACHE_CLEAR)
        return CacheCleared(
            message=f"Cache cleared successfully ({applied.result} built programs here, DSPy's response cache)",
            processes_reached=applied.processes,
            warning=applied.warning,
        )

    def clear_local_cache(self) -> int:
        """This process's built programs and DSPy's response cache; returns how many programs were dropped."""
        import dspy

        programs = self.cache.clear()
        dspy.cache.reset_memory_cache()
        return programs

    async def aclose(self) -> None:
        await self.records.aclose()
        await self.models.aclose()

    async def health(self) -> DspyHealth:
        overall = (await self.executions.statistics()).model_dump()
        configured = self.models.default_model is not None
        return DspyHealth(
            status="healthy" if configured else "unconfigured",
            total_executions=overall["total_executions"],
            success_rate=overall["success_rate"],
            language_model=self.models.default_model,
            detail=None if configured else NO_LANGUAGE_MODEL,
            programs=len(await self.programs.list()) + len(self.trusted),
        )


def _size(value: Any) -> int:
    return len(json.dumps(value, default=str)) if value is not None else 0


def _plain(value: Any) -> Any:
    """JSON any database takes: NaN and Infinity (which a client may send and PostgreSQL refuses) become strings."""
    return json.loads(json.dumps(value, default=str), parse_constant=str) if value is not None else None


def _signature_view(text: str) -> SignatureView:
    try:
        parsed = parse_signature(text)
    except InvalidRequest:  # a pickled program's own signature may use types a declaration may not
        inputs, _, outputs = text.partition("->")
        return SignatureView(
            signature=text,
            input_fields=[part.split(":")[0].strip() for part in inputs.split(",") if part.strip()],
            output_fields=[part.split(":")[0].strip() for part in outputs.split(",") if part.strip()],
            field_types={},
        )
    return SignatureView(
        signature=parsed.text,
        input_fields=parsed.input_names,
        output_fields=parsed.output_names,
        field_types={item.name: item.type_name for item in (*parsed.inputs, *parsed.outputs)},
    )


def _view(row: DspyProgramRow) -> ProgramView:
    return ProgramView(
        program_id=row.program_id,
        name=row.name,
        version=row.version,
        description=row.description,
        module=row.module,
        signatures=[_signature_view(text) for text in row.signatures],
        instructions=row.instructions,
        demos=row.demos,
        lm=ProgramLM(**row.lm) if row.lm else None,
        source="pickled" if row.source else "declared",
        model_uri=row.source,
        created_at=iso(row.created_at),
        updated_at=iso(row.updated_at),
    )


def _trusted_view(program: RunnableProgram) -> ProgramView:
    signatures = []
    for predictor in program.module.predictors():
        signature = predictor.signature
        signatures.append(
            SignatureView(
                signature=signature.signature,
                input_fields=list(signature.input_fields),
                output_fields=list(signature.output_fields),
                field_types={
                    name: getattr(info.annotation, "__name__", str(info.annotation))
                    for name, info in signature.fields.items()
                },
            )
        )
    return ProgramView(
        program_id=program.program_id,
        name=program.program_id,
        version="trusted",
        description=(type(program.module).__doc__ or "").strip(),
        module=type(program.module).__name__,
        signatures=signatures,
        instructions="",
        demos=[],
        source="trusted",
    )
