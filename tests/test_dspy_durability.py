"""Nothing acknowledged is lost: a DSPy execution answered 200 has its record committed before the answer left.

Real `hokusai serve` processes killed with SIGKILL in the middle of (or right after) a burst of executions; a new
process on the same database must serve every execution that was acknowledged. Then the record writer alone: group
commit (executions that finish while a commit is in flight share the next transaction), the wait of a request for
its own commit, the refusal of an execution whose record cannot be written, and the flush at shutdown.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import Engine, event, func, select

from hokusai.server.auth.keys import generate_api_key
from hokusai.server.dspy.models import DspyExecutionRow
from hokusai.server.dspy.service import _plain
from hokusai.server.dspy.store import (
    ExecutionOutcome,
    ExecutionStore,
    RecordNotSaved,
    RecordWriter,
    SqliteRecordConnection,
)

PROGRAM = {"program_id": "durable-qa", "name": "QA", "module": "Predict", "signature": "question -> answer"}
ROUNDS = 3
THREADS = 8
PER_THREAD = 7  # 56 single executions and one batch of BATCH_ITEMS per round
BATCH_ITEMS = 5


def serve(start_service, mlflow_server, fake_lm, database_url: str, key: str):
    return start_service(
        process=True,
        bootstrap=False,
        bootstrap_admin_key=key,
        mlflow_url=mlflow_server.url,
        database_url=database_url,
        dspy_lm="openai/instant",
        dspy_api_base=fake_lm.base_url,
        dspy_num_retries="0",
        dspy_cache="false",
        rate_limit_default_per_hour="1000000",
    )


def burst(base_url: str, key: str, kill_after: int | None, kill) -> list[str]:
    """Executions from THREADS clients at once (and one batch); the ids of those answered 200. With `kill_after`,
    `kill` is called as soon as that many were acknowledged, while the other clients are still sending."""
    acknowledged: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def note(ids: list[str]) -> None:
        with lock:
            acknowledged.extend(ids)
            if kill_after is not None and len(acknowledged) >= kill_after and not killed.is_set():
                killed.set()
                kill()

    def client(index: int) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
            if index == 0:
                batch = {
                    "program_id": "durable-qa",
                    "inputs_list": [{"question": f"b {i}"} for i in range(BATCH_ITEMS)],
                }
                try:
                    answer = http.post("/api/v1/dspy/execute/batch", json=batch)
                except httpx.TransportError:
                    return
                if answer.status_code == 200:
                    note([result["execution_id"] for result in answer.json()["results"]])
            for call in range(PER_THREAD):
                if killed.is_set():
                    return
                try:
                    answer = http.post(
                        "/api/v1/dspy/execute",
                        json={"program_id": "durable-qa", "inputs": {"question": f"q {index} {call}"}},
                    )
                except httpx.TransportError:  # the process was killed under this request: not acknowledged
                    return
                if answer.status_code == 200:
                    note([answer.json()["execution_id"]])

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(client, range(THREADS)))
    return acknowledged


def kill_hard(service) -> None:
    os.killpg(service.process.pid, signal.SIGKILL)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'hokusai.db'}"


@pytest.mark.slow
def test_acknowledged_executions_survive_a_killed_process(start_service, mlflow_server, fake_lm, database_url):
    key = generate_api_key()
    service = serve(start_service, mlflow_server, fake_lm, database_url, key)
    with service.client(key) as http:
        assert http.post("/api/v1/dspy/programs", json=PROGRAM).status_code == 201
    acknowledged: list[str] = []
    for round_ in range(ROUNDS):
        # Round 0 kills right after the last answer; the others while clients are still sending.
        kill_after = None if round_ == 0 else (THREADS * PER_THREAD) // 2 + round_
        ids = burst(service.base_url, key, kill_after, lambda victim=service: kill_hard(victim))
        assert ids, service.logs()[-3000:]
        kill_hard(service)
        service.process.wait()
        acknowledged += ids
        service = serve(start_service, mlflow_server, fake_lm, database_url, key)
        with service.client(key) as http:
            missing = [i for i in acknowledged if http.get(f"/api/v1/dspy/execution/{i}").status_code != 200]
        assert not missing, f"round {round_}: {len(missing)} of {len(acknowledged)} acknowledged executions lost"
    with service.client(key) as http:
        total = http.get("/api/v1/dspy/stats").json()["statistics"]["total_executions"]
    assert total >= len(acknowledged)


def test_an_execution_whose_record_cannot_be_saved_is_not_acknowledged(start_service, mlflow_server, fake_lm, tmp_path):
    """The database refuses the record (its table is gone, dropped by another connection): 503 with a detail, not a
    200 for an execution nobody can find again."""
    database = tmp_path / "hokusai.db"
    service = start_service(
        mlflow_url=mlflow_server.url,
        database_url=f"sqlite:///{database}",
        dspy_lm="openai/instant",
        dspy_api_base=fake_lm.base_url,
        dspy_num_retries="0",
        dspy_cache="false",
    )
    with service.client(service.admin_key) as http:
        assert http.post("/api/v1/dspy/programs", json=PROGRAM).status_code == 201
        ok = http.post("/api/v1/dspy/execute", json={"program_id": "durable-qa", "inputs": {"question": "a"}})
        assert ok.status_code == 200
        with sqlite3.connect(database) as other:
            other.execute("DROP TABLE dspy_executions")
        served = fake_lm.requests
        refused = http.post("/api/v1/dspy/execute", json={"program_id": "durable-qa", "inputs": {"question": "b"}})
        assert refused.status_code == 503 and "could not be saved" in refused.json()["detail"]
        assert fake_lm.requests == served + 1  # it ran; only its answer is withheld
        batch = http.post(
            "/api/v1/dspy/execute/batch", json={"program_id": "durable-qa", "inputs_list": [{"question": "c"}]}
        )
        assert batch.status_code == 503 and "could not be saved" in batch.json()["detail"]


# --- the record writer alone, on SQLite and PostgreSQL (the `database` fixture) ---------------------------------


def outcome(execution_id: str | None = None) -> ExecutionOutcome:
    return ExecutionOutcome(
        execution_id=execution_id or str(uuid.uuid4()),
        program_id="p",
        program_version="1",
        batch_id=None,
        key_id=None,
        mode="normal",
        success=True,
        error=None,
        error_type=None,
        duration_ms=1.0,
        input_bytes=2,
        output_bytes=2,
        inputs=None,
        outputs=None,
        usage=None,
        started_at=datetime.now(UTC),
    )


class GatedStore(ExecutionStore):
    """The real store, whose transactions wait for `gate`: a commit held "in flight" as long as a test needs."""

    def __init__(self, database) -> None:
        super().__init__(database)
        self.gate = asyncio.Event()
        self.transactions: list[list[str]] = []

    async def record(self, outcomes: list[ExecutionOutcome], connection=None) -> None:
        self.transactions.append([item.execution_id for item in outcomes])
        await self.gate.wait()
        await super().record(outcomes, connection)


@pytest.fixture
def commits() -> Iterator[list[Engine]]:
    """The engine of every commit made in this process while the test runs: `writer_commits` keeps the record
    writer's (other work of the same pytest worker, a background task of another module's service, may commit too)."""
    engines: list[Engine] = []

    def note(connection) -> None:
        engines.append(connection.engine)

    event.listen(Engine, "commit", note)
    yield engines
    event.remove(Engine, "commit", note)


def writer_commits(engines: list[Engine], writer: RecordWriter) -> int:
    """How many of those commits the writer's own connection made (SQLite: an engine of its own; PostgreSQL: a
    connection of the service's engine, which nothing else in these tests uses while they count)."""
    connection = writer._connection
    own = connection._engine if isinstance(connection, SqliteRecordConnection) else connection._connection.sync_engine
    return sum(1 for engine in engines if engine is own)


async def stored(database, ids: list[str]) -> int:
    async with database.session() as session:
        return await session.scalar(select(func.count()).where(DspyExecutionRow.id.in_(ids)))


async def until(condition) -> None:
    """Wait for `condition`; the bound only turns a broken writer into a failure instead of a hung run."""
    async with asyncio.timeout(120):
        while not condition():  # noqa: ASYNC110 - the writer's state has no event to wait on
            await asyncio.sleep(0.001)


@pytest.mark.anyio
async def test_executions_finishing_during_a_commit_share_the_next_one(database, commits):
    store = GatedStore(database)
    writer = RecordWriter(store)
    first, second, third = outcome(), outcome(), outcome()
    a = asyncio.create_task(writer.write([first]))
    await until(lambda: store.transactions)  # the first commit is in flight
    b = asyncio.create_task(writer.write([second]))
    c = asyncio.create_task(writer.write([third]))
    await until(lambda: writer.queued == 2)
    assert not (a.done() or b.done() or c.done())  # nobody is answered before the commit holding its record
    store.gate.set()
    await asyncio.gather(a, b, c)
    assert store.transactions == [[first.execution_id], [second.execution_id, third.execution_id]]
    assert writer_commits(commits, writer) == 2
    assert await stored(database, [first.execution_id, second.execution_id, third.execution_id]) == 3
    await writer.aclose()


@pytest.mark.anyio
async def test_two_executions_finishing_together_share_one_transaction(database, commits):
    writer = RecordWriter(ExecutionStore(database))
    together = [outcome(), outcome()]
    await asyncio.gather(*(writer.write([item]) for item in together))
    assert writer_commits(commits, writer) == 1
    assert await stored(database, [item.execution_id for item in together]) == 2
    await writer.aclose()


@pytest.mark.anyio
async def test_a_record_the_database_refuses_fails_only_its_own_request(database):
    writer = RecordWriter(ExecutionStore(database))
    taken = outcome()
    await writer.write([taken])
    duplicate, innocent = outcome(taken.execution_id), outcome()  # the same id again: the primary key refuses it
    results = await asyncio.gather(writer.write([duplicate]), writer.write([innocent]), return_exceptions=True)
    assert isinstance(results[0], RecordNotSaved) and results[0].status_code == 503
    assert results[1] is None  # retried in a transaction of its own, and saved
    assert await stored(database, [innocent.execution_id]) == 1
    await writer.aclose()


@pytest.mark.anyio
async def test_shutdown_writes_everything_queued(database):
    store = GatedStore(database)
    writer = RecordWriter(store, capacity=4)
    items = [outcome() for _ in range(10)]
    waiting = [asyncio.create_task(writer.write([item])) for item in items]
    await until(lambda: store.transactions)
    closing = asyncio.create_task(writer.aclose())
    await asyncio.sleep(0.01)
    assert not closing.done()  # held by the commit in flight and the queue behind it
    store.gate.set()
    await closing
    await asyncio.gather(*waiting)  # the queue was full for some: they waited, none was dropped
    assert await stored(database, [item.execution_id for item in items]) == 10
    late = outcome()
    await writer.write([late])  # after shutdown a record is still written before the answer (on its own)
    assert await stored(database, [late.execution_id]) == 1


@pytest.mark.anyio
async def test_records_postgresql_would_refuse_are_made_storable(database):
    """NaN (which a client may send in inputs, and DSPy may parse from an answer) and NUL in an error text: refused by
    PostgreSQL, they would fail the execution's request now that nothing unrecorded is acknowledged."""
    writer = RecordWriter(ExecutionStore(database))
    odd = outcome()
    odd.inputs = _plain({"x": float("nan"), "y": [float("inf"), 1.5]})
    odd.error = "the server said \x00"
    await writer.write([odd])
    await writer.aclose()
    row = await ExecutionStore(database).get(odd.execution_id)
    assert row.inputs == {"x": "NaN", "y": ["Infinity", 1.5]} and row.error == "the server said \\x00"
