"""Running DSPy programs: declared programs built into DSPy modules (cached), language models from settings,
inputs checked against the signature, `acall` on the event loop under a timeout, usage and errors captured.

DSPy is imported here only, and only when the service starts the DSPy domain: `LITELLM_LOCAL_MODEL_COST_MAP` is
set first, because LiteLLM otherwise fetches a price list from the internet at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import os
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from hokusai.server.config import Settings
from hokusai.server.dspy.models import DspyProgramRow
from hokusai.server.dspy.signatures import ParsedSignature, parse_signature
from hokusai.server.errors import HokusaiError, InvalidRequest, ServiceUnavailable, Unprocessable

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import (see the module docstring)

import dspy  # noqa: E402
from dspy.utils.callback import BaseCallback  # noqa: E402
from dspy.utils.exceptions import AdapterParseError, DSPyError, LMTimeoutError  # noqa: E402

NO_LANGUAGE_MODEL = (
    "No language model configured for DSPy execution: set HOKUSAI_DSPY_LM (a LiteLLM model name such as "
    "openai/my-model) and, for an OpenAI-compatible server, HOKUSAI_DSPY_API_BASE (and HOKUSAI_DSPY_API_KEY)"
)
# One LM call per predictor call: no second attempt in JSON when the answer misses DSPy's chat format (a retry that
# doubles cost and latency on a model that cannot follow the format; the error says what came back instead).
ANSWER_FORMAT = dspy.ChatAdapter(use_json_adapter_fallback=False)
RESPONSE_CACHE_ENTRIES = 10_000
COMPILED_CACHE_SIZE = 256


class NoLanguageModel(ServiceUnavailable):
    def __init__(self) -> None:
        super().__init__(NO_LANGUAGE_MODEL)


class ExecutionFailed(HokusaiError):
    """An execution that ran and failed; `error_type` is kept in its record."""

    status_code = 502

    def __init__(self, detail: str, error_type: str, usage: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.error_type = error_type
        self.usage = usage or {}


class ExecutionTimedOut(ExecutionFailed):
    status_code = 504

    def __init__(self, seconds: float, usage: dict[str, Any] | None = None) -> None:
        super().__init__(f"DSPy execution timed out after {seconds:g}s", "timeout", usage)


@dataclass
class RunnableProgram:
    """A DSPy module ready to call, and what its callers may send it."""

    program_id: str
    version: str
    module: Any  # dspy.Module
    signature: ParsedSignature | None  # None for a trusted program: its forward() decides
    lm_settings: dict | None = None
    output_names: list[str] = field(default_factory=list)


def dspy_signature(parsed: ParsedSignature, instructions: str) -> Any:
    """Built from the checked field table: DSPy never parses the string (it would import unknown type names)."""
    fields: dict[str, tuple[Any, Any]] = {}
    for item in parsed.inputs:
        fields[item.name] = (item.annotation, dspy.InputField())
    for item in parsed.outputs:
        fields[item.name] = (item.annotation, dspy.OutputField())
    return dspy.Signature(fields, instructions or None)


def configure_dspy() -> None:
    """DSPy's response cache in memory only and bounded (its default also writes up to 30 GB under ~/.dspy_cache)."""
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True, memory_max_entries=RESPONSE_CACHE_ENTRIES)


def build_declared(row: DspyProgramRow) -> RunnableProgram:
    parsed = parse_signature(row.signatures[0])
    signature = dspy_signature(parsed, row.instructions)
    module = dspy.ChainOfThought(signature) if row.module == "ChainOfThought" else dspy.Predict(signature)
    demos = [dspy.Example(**demo).with_inputs(*[n for n in parsed.input_names if n in demo]) for demo in row.demos]
    for predictor in module.predictors():
        predictor.demos = demos
    outputs = (["reasoning"] if row.module == "ChainOfThought" else []) + parsed.output_names
    return RunnableProgram(row.program_id, row.version, module, parsed, row.lm, outputs)


def check_declaration(signatures: list[str], module: str, demos: list[dict], instructions: str) -> ParsedSignature:
    """Everything a declaration must satisfy before it is stored: a signature DSPy accepts, demos that fit it."""
    parsed = parse_signature(signatures[0])
    known = (
        set(parsed.input_names) | set(parsed.output_names) | ({"reasoning"} if module == "ChainOfThought" else set())
    )
    for index, demo in enumerate(demos):
        unknown = sorted(set(demo) - known)
        if unknown:
            raise InvalidRequest(f"demos[{index}] has fields the signature does not: {', '.join(unknown)}")
    dspy_signature(parsed, instructions)
    return parsed


def load_trusted(program_id: str, target: str) -> RunnableProgram:
    """An operator's Python program, `module:attribute` (a dspy.Module instance, or a class made without args)."""
    module_name, _, attribute = target.partition(":")
    program = getattr(importlib.import_module(module_name), attribute)
    if isinstance(program, type):
        program = program()
    if not isinstance(program, dspy.Module):
        raise TypeError(f"{target} is not a dspy.Module")
    return RunnableProgram(program_id, "trusted", program, None)


def check_inputs(program: RunnableProgram, inputs: dict[str, Any]) -> dict[str, Any]:
    """Missing or unknown fields, or values of the wrong type, are 422 (DSPy itself would only warn)."""
    if program.signature is None:
        return inputs
    expected = program.signature.inputs
    missing = [item.name for item in expected if item.name not in inputs]
    unknown = sorted(set(inputs) - {item.name for item in expected})
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing input fields: {', '.join(missing)}")
        if unknown:
            problems.append(f"unknown input fields: {', '.join(unknown)}")
        raise Unprocessable(f"Inputs do not match the signature ({'; '.join(problems)})")
    checked = {}
    for item in expected:
        try:
            checked[item.name] = _adapter(item.annotation).validate_python(inputs[item.name])
        except ValidationError as exc:
            first = exc.errors()[0]["msg"]
            raise Unprocessable(f"Input field {item.name!r} must be {item.type_name}: {first}") from None
    return checked


@functools.cache
def _adapter(annotation: Any) -> TypeAdapter:
    """Building a TypeAdapter costs far more than using one; the allow-listed types are few and hashable."""
    return TypeAdapter(annotation)


# LM calls running now, by id() of the dspy.LM: an LM the cache evicts is closed only once its calls are done.
_CALLS_IN_FLIGHT: Counter[int] = Counter()


class LanguageModels:
    """dspy.LM objects by their settings: the service's own, and those programs name (same API base and key).

    Least recently used first out past `HOKUSAI_DSPY_LM_CACHE_SIZE`: every distinct setting a program declares
    (model, temperature, max_tokens) is its own LM with its own connection pools, and programs are written by
    callers. An evicted LM is closed when no call uses it any more (a batch that still holds it reopens its pools
    on its next call, so closing early costs a connection, never a failed call).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._built: OrderedDict[str, Any] = OrderedDict()
        self._retiring: list[Any] = []
        self._closing: set[asyncio.Task] = set()

    @property
    def default_model(self) -> str | None:
        return self._settings.dspy_lm

    def __len__(self) -> int:
        return len(self._built)

    def for_program(self, program_lm: dict | None) -> Any:
        wanted = {
            "model": self._settings.dspy_lm,
            "temperature": self._settings.dspy_temperature,
            "max_tokens": self._settings.dspy_max_tokens,
        }
        wanted.update({key: value for key, value in (program_lm or {}).items() if value is not None})
        if not wanted["model"]:
            raise NoLanguageModel()
        key = json.dumps(wanted, sort_keys=True)
        lm = self._built.get(key)
        if lm is not None:
            self._built.move_to_end(key)
            return lm
        api_key = self._settings.dspy_api_key.get_secret_value() if self._settings.dspy_api_key else None
        options = {name: value for name, value in wanted.items() if value is not None and name != "model"}
        if self._settings.dspy_api_base is not None:
            options["api_base"] = str(self._settings.dspy_api_base)
        lm = self._built[key] = dspy.LM(
            wanted["model"],
            api_key=api_key or "unused",  # DSPy refuses to call without one; servers without auth ignore it
            num_retries=self._settings.dspy_num_retries,
            cache=self._settings.dspy_cache,
            timeout=self._settings.dspy_max_timeout,
            **options,
        )
        while len(self._built) > self._settings.dspy_lm_cache_size:
            self._retiring.append(self._built.popitem(last=False)[1])
        self._close_idle_retired()
        return lm

    def _close_idle_retired(self) -> None:
        idle = [lm for lm in self._retiring if not _CALLS_IN_FLIGHT[id(lm)]]
        self._retiring = [lm for lm in self._retiring if _CALLS_IN_FLIGHT[id(lm)]]
        for lm in idle:
            task = asyncio.get_running_loop().create_task(lm.aclose())
            self._closing.add(task)  # a reference, so the task is not collected before it ran
            task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Each LM holds its own connection pools."""
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        for lm in [*self._built.values(), *self._retiring]:
            await lm.aclose()
        self._built.clear()
        self._retiring.clear()


class CapturedCalls(BaseCallback):
    """Debug mode: the messages sent to the LM and its raw answers, call by call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._open: dict[str, dict[str, Any]] = {}

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        entry = {"messages": inputs.get("messages"), "prompt": inputs.get("prompt")}
        self._open[call_id] = entry
        self.calls.append(entry)

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        entry = self._open.pop(call_id, {})
        entry["raw_output"] = outputs
        if exception is not None:
            entry["error"] = str(exception)


class ProgramCache:
    """Built DSPy modules by program version and last update (bounded, least recently used dropped)."""

    def __init__(self, size: int = COMPILED_CACHE_SIZE) -> None:
        self._size = size
        self._programs: OrderedDict[tuple[str, str, str], RunnableProgram] = OrderedDict()

    @staticmethod
    def _key(row: DspyProgramRow) -> tuple[str, str, str]:
        return (row.program_id, row.version, row.updated_at.isoformat())

    def peek(self, row: DspyProgramRow) -> RunnableProgram | None:
        program = self._programs.get(self._key(row))
        if program is not None:
            self._programs.move_to_end(self._key(row))
        return program

    def put(self, row: DspyProgramRow, program: RunnableProgram) -> RunnableProgram:
        self._programs[self._key(row)] = program
        while len(self._programs) > self._size:
            self._programs.popitem(last=False)
        return program

    def get(self, row: DspyProgramRow) -> RunnableProgram:
        """A declared program, built on first use."""
        return self.peek(row) or self.put(row, build_declared(row))

    def clear(self) -> int:
        count = len(self._programs)
        self._programs.clear()
        return count


def render_prompt(program: RunnableProgram, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """What the first predictor would send the LM, without calling it (dry_run)."""
    predictor = program.module.predictors()[0]
    return ANSWER_FORMAT.format(predictor.signature, predictor.demos, inputs)


async def run_program(
    program: RunnableProgram, lm: Any, inputs: dict[str, Any], timeout: float, capture: CapturedCalls | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(outputs, usage). acall runs on the event loop (DSPy's async path), so no worker thread waits on an LM.

    Usage comes from an explicit tracker rather than the prediction, so a failed execution still reports the tokens
    its LM calls used (in ExecutionFailed.usage).
    """
    callbacks = [capture] if capture is not None else []
    with (
        _in_flight(lm),
        dspy.context(
            lm=lm,
            disable_history=True,  # DSPy's history keeps every call: unbounded memory in a server
            max_trace_size=0,  # and so does its trace of every predictor call
            callbacks=callbacks,
            adapter=ANSWER_FORMAT,
        ),
        dspy.track_usage() as tracker,
    ):
        try:
            async with asyncio.timeout(timeout):
                prediction = await program.module.acall(**inputs)
        except (TimeoutError, LMTimeoutError):
            raise ExecutionTimedOut(timeout, _usage(tracker)) from None
        except AdapterParseError as exc:
            detail = f"The language model's answer could not be read: {_first_line(exc)}"
            raise ExecutionFailed(detail, "parse", _usage(tracker)) from exc
        except DSPyError as exc:
            detail = f"The language model failed: {_first_line(exc)}"
            raise ExecutionFailed(detail, type(exc).__name__, _usage(tracker)) from exc
    names = program.output_names or list(prediction.keys())
    outputs = {name: _jsonable(prediction.get(name)) for name in names if name in prediction}
    return outputs, _usage(tracker)


@contextlib.contextmanager
def _in_flight(lm: Any) -> Iterator[None]:
    """Counts the calls using `lm` (None in dry runs), for LanguageModels to close an evicted LM only when idle."""
    if lm is None:
        yield
        return
    _CALLS_IN_FLIGHT[id(lm)] += 1
    try:
        yield
    finally:
        _CALLS_IN_FLIGHT[id(lm)] -= 1
        if not _CALLS_IN_FLIGHT[id(lm)]:
            del _CALLS_IN_FLIGHT[id(lm)]


def _usage(tracker: Any) -> dict[str, Any]:
    return {model: _jsonable(counts) for model, counts in tracker.get_total_tokens().items()}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump()
    try:
        json.dumps(value)
    except TypeError:
        return str(value)
    return value


def _first_line(exc: Exception) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0][:500]
