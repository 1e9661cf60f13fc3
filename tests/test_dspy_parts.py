"""The DSPy domain's parts alone: the signature allow-list, input checks, and the stores on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from typing import Literal, Optional

import pytest
from dspy.clients import base_lm

from hokusai.server.config import Settings
from hokusai.server.dspy.executor import (
    LanguageModels,
    RunnableProgram,
    _in_flight,
    build_declared,
    check_inputs,
    run_program,
)
from hokusai.server.dspy.models import DspyProgramRow
from hokusai.server.dspy.schemas import ProgramDeclaration
from hokusai.server.dspy.signatures import parse_signature
from hokusai.server.dspy.store import ExecutionOutcome, ExecutionStore, ProgramStore
from hokusai.server.errors import Conflict, InvalidRequest, NotFound, Unprocessable
from tests.fake_lm import FakeLanguageModel


def test_signatures_become_allow_listed_types():
    parsed = parse_signature(
        "q, k: int, w: float, ok: bool, tags: list[str], meta: dict, table: dict[str, list[int]], "
        "maybe: Optional[str], pick: Literal['a', \"b\", 3, True] -> answer: str"
    )
    types = {field.name: field.annotation for field in (*parsed.inputs, *parsed.outputs)}
    assert types["q"] is str and types["k"] is int and types["w"] is float and types["ok"] is bool
    assert types["tags"] == list[str] and types["meta"] is dict and types["table"] == dict[str, list[int]]
    assert types["maybe"] == Optional[str] and types["pick"] == Literal["a", "b", 3, True]  # noqa: UP045
    assert parsed.output_names == ["answer"]


@pytest.mark.parametrize(
    ("signature", "words"),
    [
        ("x: this -> y", "'this' is not allowed"),
        ("x: antigravity -> y", "'antigravity' is not allowed"),
        ("x: os.path -> y", "'os.path' is not allowed"),
        ("x: dict[str, this] -> y", "'this' is not allowed"),
        ("x: Optional[os] -> y", "'os' is not allowed"),
        ("x: Literal[os.sep] -> y", "Literal takes only"),
        ("x: Literal[1.5] -> y", "Literal takes only"),
        ("x: list -> y: __builtins__", "not allowed"),
        ("x: list[list[list[list[list[list[list[str]]]]]]] -> y", "nested too deeply"),
        ("x: str[ -> y", "unbalanced"),
        ("x: (lambda: 1)() -> y", "not allowed"),
        ("x -> y, x", "unique"),
        ("_private -> y", "not a valid field name"),
        ("x, , y -> z", "empty field"),
        ("x y -> z", "not a valid field name"),
        ("demos -> y", "reserved by DSPy"),
        ("question, config -> answer", "reserved by DSPy"),
        ("x -> instructions", "reserved by DSPy"),
        # Python's own parser recurses on these: RecursionError/MemoryError (a 500) before the length bound
        ("x: " + "1+" * 2400 + "1 -> y", "longer than 300"),
        ("x: " + "-" * 4900 + "1 -> y", "longer than 300"),
        ("x: " + "a." * 2400 + "a -> y", "longer than 300"),
        ("x: " + "list[" * 1000 + "str" + "]" * 1000 + " -> y", "longer than 5000"),
        ("x: " + "a." * 140 + "a -> y", "not allowed"),  # within the bound: refused, and not unparsed
        ("x: str\x00 -> y", "cannot be read"),
    ],
)
def test_signatures_outside_the_allow_list_are_refused_without_importing(signature, words):
    imported_before = set(sys.modules)
    with pytest.raises(InvalidRequest, match=words):
        parse_signature(signature)
    assert not {"this", "antigravity"} & (set(sys.modules) - imported_before)


def test_inputs_are_checked_against_the_signature():
    program = RunnableProgram("p", "1", module=None, signature=parse_signature("a: int, b: list[str] -> c"))
    assert check_inputs(program, {"a": "3", "b": ["x"]}) == {"a": 3, "b": ["x"]}  # lax like pydantic: "3" is 3
    for inputs, words in (
        ({"a": 1}, "missing input fields: b"),
        ({"a": 1, "b": [], "z": 0}, "unknown input fields: z"),
        ({"a": "three", "b": []}, "'a' must be int"),
        ({"a": 1, "b": "x"}, r"'b' must be list\[str\]"),
    ):
        with pytest.raises(Unprocessable, match=words):
            check_inputs(program, inputs)


@pytest.mark.anyio
async def test_program_versions(database):
    store = ProgramStore(database)
    for version in ("1.2.0", "1.10.0", "1.9.3"):
        declaration = ProgramDeclaration(program_id="p", name="P", version=version, signature="a -> b")
        await store.create(declaration, "key_x", declaration.signature_list)
    assert (await store.get("p")).version == "1.10.0"
    assert (await store.get("p", "1.2.0")).signatures == ["a -> b"]
    with pytest.raises(Conflict):
        await store.create(ProgramDeclaration(program_id="p", name="P", version="1.2.0", signature="a -> b"), None, [])
    assert await store.delete("p", "1.10.0") == 1 and (await store.get("p")).version == "1.9.3"
    assert await store.delete("p", None) == 2
    with pytest.raises(NotFound):
        await store.get("p")


@pytest.mark.anyio
async def test_statistics_from_records(database):
    store = ExecutionStore(database)

    def outcome(index: int, program: str, ms: float, success: bool) -> ExecutionOutcome:
        return ExecutionOutcome(
            execution_id=f"e{index}",
            program_id=program,
            program_version="1",
            batch_id=None,
            key_id="key_a",
            mode="normal",
            success=success,
            error=None if success else "boom",
            error_type=None if success else "LMServerError",
            duration_ms=ms,
            input_bytes=10,
            output_bytes=5,
            inputs=None,
            outputs=None,
            usage={"m": {"total_tokens": 3}},
            started_at=datetime(2026, 1, 1, tzinfo=UTC),
        )

    await store.record([outcome(i, "a", float(i + 1) * 100, i != 0) for i in range(20)])
    await store.record([outcome(100, "b", 50.0, False)])
    stats = await store.statistics()
    assert stats.total_executions == 21 and stats.successful_executions == 19
    assert stats.success_rate == pytest.approx(19 / 21)
    assert stats.average_execution_time == pytest.approx((sum((i + 1) * 100 for i in range(20)) + 50) / 21 / 1000)
    assert stats.per_program["a"].p95_execution_time == pytest.approx(1.9)  # nearest rank: 19th of 20
    assert stats.per_program["b"].success_rate == 0 and stats.per_program["b"].p95_execution_time == 0.05
    assert (await store.get("e3")).usage == {"m": {"total_tokens": 3}}


@pytest.mark.anyio
async def test_executions_leave_no_history_behind():
    """DSPy keeps every call in a global and a per-LM history unless told not to: a server would grow forever."""
    fake = FakeLanguageModel()
    try:
        settings = Settings(dspy_lm="openai/instant", dspy_api_base=fake.base_url, dspy_cache=False)
        lm = LanguageModels(settings).for_program(None)
        now = datetime.now(UTC)
        row = DspyProgramRow(
            program_id="p",
            version="1",
            module="Predict",
            signatures=["question -> answer"],
            instructions="",
            demos=[],
            lm=None,
            updated_at=now,
        )
        program = build_declared(row)
        before = len(base_lm.GLOBAL_HISTORY)
        for _ in range(5):
            outputs, usage = await run_program(program, lm, {"question": "why?"}, timeout=10, capture=None)
        assert outputs == {"answer": "answer for why?"} and usage["openai/instant"]["total_tokens"] > 0
        assert len(base_lm.GLOBAL_HISTORY) == before and lm.history == [] and fake.requests == 5
    finally:
        fake.stop()


@pytest.mark.anyio
async def test_language_models_are_kept_up_to_the_cache_size_and_evicted_ones_closed(monkeypatch):
    """Every distinct LM setting a program declares built a dspy.LM that stayed forever (+91 MB per 3,000)."""
    closed = []

    async def record_close(lm):
        closed.append(lm)

    monkeypatch.setattr("dspy.LM.aclose", record_close)
    settings = Settings(dspy_lm="openai/m", dspy_api_base="http://127.0.0.1:9", dspy_lm_cache_size=4)
    models = LanguageModels(settings)
    first = models.for_program({"temperature": 0.0})
    assert models.for_program({"temperature": 0.0}) is first
    made = [models.for_program({"temperature": n / 100, "max_tokens": 10}) for n in range(1, 200)]
    assert len(models) == 4
    assert models.for_program({"temperature": 199 / 100, "max_tokens": 10}) is made[-1]  # recent ones stay
    await asyncio.sleep(0)  # the closes run as tasks
    assert len(closed) == 196 and first in closed and made[-1] not in closed
    await models.aclose()
    assert len(closed) == 200


@pytest.mark.anyio
async def test_an_evicted_language_model_is_closed_only_after_its_calls(monkeypatch):
    closed = []

    async def record_close(lm):
        closed.append(lm)

    monkeypatch.setattr("dspy.LM.aclose", record_close)
    settings = Settings(dspy_lm="openai/m", dspy_api_base="http://127.0.0.1:9", dspy_lm_cache_size=1)
    models = LanguageModels(settings)
    busy = models.for_program(None)
    with _in_flight(busy):  # what run_program does around a call
        models.for_program({"temperature": 0.5})  # evicts `busy` while its call runs
        await asyncio.sleep(0)
        assert busy not in closed
    models.for_program({"temperature": 0.7})
    await asyncio.sleep(0)
    assert busy in closed
