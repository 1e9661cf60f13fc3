"""Evaluations with owners, heartbeats and leases (issue 14): a starting process reclaims only abandoned work, a
surviving process resumes a dead one's, and two reclaiming processes never take the same evaluation.

Real databases (SQLite, and a fresh database on the machine's PostgreSQL), the real EvaluationService built as
`hokusai serve` builds it; the evaluation that is resumed runs a real model version on the shared MLflow server.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from hokusai.server.analytics.leases import INTERRUPTED, MAX_ATTEMPTS, EvaluationLeases
from hokusai.server.analytics.models import EvaluationRow
from hokusai.server.analytics.schemas import EvaluateRequest
from hokusai.server.analytics.service import ModelAnalytics
from hokusai.server.config import Settings
from hokusai.server.db import Database, run_migrations, utcnow
from hokusai.server.events.outbox import EventOutbox
from hokusai.server.instance import instance_id
from hokusai.server.mlflow.breaker import CircuitBreaker
from hokusai.server.mlflow.upstream import MlflowUpstream
from tests.support import benchmark_metadata, run_analytics_scenario

pytestmark = pytest.mark.anyio

MODEL = "lease-classifier"
ANOTHER_PROCESS = "other-host-4242-0badc0de"
DEAD_PROCESS = "gone-host-77-deadbeef"
REQUEST = {"model_name": MODEL, "model_version": "1", "dataset_path": "holdout.csv", "metrics": ["accuracy"]}
PATIENCE = 120.0  # seconds a poll waits before the test fails instead of hanging (not a timing assertion)


@asynccontextmanager
async def started_analytics(
    database: Database, home: Path, mlflow_url: str = "http://127.0.0.1:9", **settings: object
) -> AsyncIterator[ModelAnalytics]:
    """The analytics services as a `hokusai serve` process builds them, started and stopped around the block."""
    configured = Settings(home=home, mlflow_url=mlflow_url, model_workers=1, **settings)
    upstream = MlflowUpstream(mlflow_url, configured.mlflow_timeout, breaker=CircuitBreaker(), keepalive=False)
    analytics = ModelAnalytics.build(configured, upstream, database, EventOutbox(database))
    try:
        await analytics.start()
        yield analytics
    finally:
        await analytics.aclose()
        await upstream.aclose()


async def add_evaluation(database: Database, evaluation_id: str, **values: object) -> None:
    row = {
        "model_name": MODEL,
        "version": "1",
        "dataset_path": "holdout.csv",
        "status": "running",
        "created_at": utcnow() - timedelta(minutes=5),
        **values,
    }
    async with database.session() as session, session.begin():
        session.add(EvaluationRow(id=evaluation_id, **row))


async def abandoned(database: Database, evaluation_id: str, **values: object) -> None:
    """An evaluation whose process died a while ago: its lease ran out a minute ago."""
    expired = utcnow() - timedelta(minutes=1)
    defaults = {"owner": DEAD_PROCESS, "heartbeat_at": expired - timedelta(minutes=1), "lease_expires_at": expired}
    await add_evaluation(database, evaluation_id, **{**defaults, "attempts": 1, **values})


async def read_evaluation(database: Database, evaluation_id: str) -> EvaluationRow:
    async with database.session() as session:
        return await session.scalar(select(EvaluationRow).where(EvaluationRow.id == evaluation_id))


async def poll(database: Database, evaluation_id: str, until: Callable[[EvaluationRow], bool]) -> EvaluationRow:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    while not until(row := await read_evaluation(database, evaluation_id)):
        assert loop.time() < deadline, f"{evaluation_id} never got there: {row.__dict__}"
        await asyncio.sleep(0.05)
    return row


def second_connection(database: Database) -> Database:
    """Another process's view of the same database: its own engine and connection pool."""
    return Database(database.engine.url.render_as_string(hide_password=False))


@pytest.fixture
def silent_mlflow() -> Iterator[str]:
    """An "MLflow" that accepts connections and never answers, so an evaluation that asks it for its version stays
    in flight for as long as the test needs (a real MLflow cannot be made to stall on demand)."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.fixture(scope="module")
def lease_model(service, keys, writer) -> dict:
    """A real version (the scenario's better classifier) of MODEL on the shared MLflow, and its holdout file."""
    logged = run_analytics_scenario(service, keys["write"], MODEL)
    version = logged["versions"][1]
    body = {
        "model_data": version["model_uri"],
        "model_type": "classifier",
        "model_name": MODEL,
        "metadata": benchmark_metadata(version),
    }
    answer = writer.post("/models/register", json=body)
    assert answer.status_code == 201, answer.text
    assert answer.json()["version"] == REQUEST["model_version"]
    return {"datasets": service.home / "datasets", "holdout_accuracy": version["holdout_accuracy"]}


async def test_a_start_leaves_an_evaluation_another_live_process_holds_alone(database, tmp_path):
    lease_until = utcnow() + timedelta(hours=1)
    await add_evaluation(
        database,
        "ev_live",
        owner=ANOTHER_PROCESS,
        heartbeat_at=utcnow(),
        lease_expires_at=lease_until,
        attempts=1,
        request=REQUEST,
    )
    async with started_analytics(database, tmp_path):
        pass
    row = await read_evaluation(database, "ev_live")
    assert (row.status, row.owner, row.error, row.finished_at, row.attempts) == (
        "running",
        ANOTHER_PROCESS,
        None,
        None,
        1,
    )
    assert row.lease_expires_at == lease_until


async def test_an_abandoned_evaluation_is_run_again_when_its_request_is_stored_else_failed(
    database, tmp_path, mlflow_server, lease_model
):
    await abandoned(database, "ev_stored", request=REQUEST)
    await abandoned(database, "ev_within_request")  # answered in its request: nothing stored to run again
    await abandoned(database, "ev_exhausted", request=REQUEST, attempts=MAX_ATTEMPTS)
    # Written before leases existed (migration 0006): no owner, no lease.
    await add_evaluation(database, "ev_before_leases", status="queued")
    settings = {"datasets_dir": lease_model["datasets"], "evaluation_sync_max_bytes": 0}  # each one in the background
    async with started_analytics(database, tmp_path, mlflow_server.url, **settings) as run:
        done = await poll(database, "ev_stored", lambda row: row.status not in ("queued", "running"))
        answer = await run.evaluations.get("ev_stored")
        # A new one is stored with its owner, lease and request, so that it could be resumed the same way.
        queued = await run.evaluations.evaluate(EvaluateRequest.model_validate(REQUEST))
        fresh = await read_evaluation(database, queued.evaluation_id)
        assert (fresh.owner, fresh.attempts, fresh.request) == (instance_id(), 1, {**REQUEST, "target_column": "label"})
        assert fresh.lease_expires_at > fresh.heartbeat_at
        finished = await poll(database, queued.evaluation_id, lambda row: row.status not in ("queued", "running"))
        assert finished.status == "succeeded", finished.error
    assert done.status == "succeeded", done.error
    assert (done.owner, done.attempts, done.error) == (instance_id(), 2, None)
    assert answer.status == "succeeded" and answer.sample_count == 300 and answer.run_id
    assert answer.metrics == {"accuracy": pytest.approx(lease_model["holdout_accuracy"])}
    for evaluation_id, error in (
        ("ev_within_request", INTERRUPTED),
        ("ev_before_leases", INTERRUPTED),
        ("ev_exhausted", f"Interrupted {MAX_ATTEMPTS} times"),
    ):
        row = await read_evaluation(database, evaluation_id)
        assert row.status == "failed" and row.error.startswith(error) and row.finished_at is not None, evaluation_id
        assert row.owner == instance_id() and row.lease_expires_at is None


async def test_the_heartbeat_renews_the_lease_and_a_clean_stop_releases_the_evaluation(
    database, tmp_path, silent_mlflow
):
    await abandoned(database, "ev_slow", request=REQUEST)
    settings = {"evaluation_lease_seconds": 0.6, "mlflow_timeout": 600}
    async with started_analytics(database, tmp_path, silent_mlflow, **settings):
        claimed = await read_evaluation(database, "ev_slow")  # claimed by the start; now waiting on "MLflow"
        assert (claimed.status, claimed.owner, claimed.attempts) == ("queued", instance_id(), 2)
        renewed = await poll(database, "ev_slow", lambda row: row.lease_expires_at > claimed.lease_expires_at)
        assert renewed.heartbeat_at > claimed.heartbeat_at and renewed.owner == instance_id()
        renewed_again = await poll(database, "ev_slow", lambda row: row.lease_expires_at > renewed.lease_expires_at)
        assert renewed_again.status == "queued"
    # A clean stop hands it back: queued, no owner, no lease, its attempt not counted; the next process takes it.
    released = await read_evaluation(database, "ev_slow")
    assert (released.status, released.owner, released.lease_expires_at, released.attempts, released.error) == (
        "queued",
        None,
        None,
        1,
        None,
    )


async def test_an_evaluation_taken_over_by_another_process_is_stopped_here_and_left_alone(
    database, tmp_path, silent_mlflow, caplog
):
    caplog.set_level(logging.WARNING, logger="hokusai.server.analytics.evaluation")
    await abandoned(database, "ev_stolen", request=REQUEST)
    settings = {"evaluation_lease_seconds": 0.6, "mlflow_timeout": 600}
    async with started_analytics(database, tmp_path, silent_mlflow, **settings):
        assert (await read_evaluation(database, "ev_stolen")).owner == instance_id()
        # As if this process had stalled for longer than its lease and another one had claimed the evaluation.
        lease_until = utcnow() + timedelta(hours=1)
        async with database.session() as session, session.begin():
            await session.execute(
                update(EvaluationRow)
                .where(EvaluationRow.id == "ev_stolen")
                .values(owner=ANOTHER_PROCESS, attempts=3, lease_expires_at=lease_until)
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE
        while "ev_stolen was taken over by another process" not in caplog.text:
            assert loop.time() < deadline, caplog.text
            await asyncio.sleep(0.05)
    row = await read_evaluation(database, "ev_stolen")  # neither failed by the cancel nor released by the stop
    assert (row.status, row.owner, row.attempts, row.error) == ("queued", ANOTHER_PROCESS, 3, None)
    assert row.lease_expires_at == lease_until


async def test_two_reclaiming_processes_claim_each_abandoned_evaluation_exactly_once(database):
    evaluation_ids = [f"ev_abandoned_{n:02}" for n in range(30)]
    for evaluation_id in evaluation_ids:
        await abandoned(database, evaluation_id, request=REQUEST)
    other = second_connection(database)
    try:
        first = EvaluationLeases(database, "reclaimer-a", 60.0)
        second = EvaluationLeases(other, "reclaimer-b", 60.0)

        async def drain(leases: EvaluationLeases) -> list[str]:
            taken: list[str] = []
            # A few at a time (as much room as a process has), so the two claimers interleave.
            while claimed := await leases.claim_abandoned(room=3):
                taken += [c.evaluation_id for c in claimed]
            return taken

        by_first, by_second = await asyncio.gather(drain(first), drain(second))
    finally:
        await other.dispose()
    assert not set(by_first) & set(by_second)
    assert sorted(by_first + by_second) == evaluation_ids
    for evaluation_id in evaluation_ids:
        row = await read_evaluation(database, evaluation_id)
        owner = "reclaimer-a" if evaluation_id in by_first else "reclaimer-b"
        assert (row.owner, row.attempts, row.status) == (owner, 2, "queued")


@pytest.mark.postgres
async def test_a_claim_skips_a_row_another_claimer_holds_instead_of_waiting(postgres_url, tmp_path):
    settings = Settings(home=tmp_path, database_url=postgres_url)
    run_migrations(settings.database_dsn)
    database = Database(settings.async_database_dsn)
    try:
        for evaluation_id in ("ev_held", "ev_free"):
            await abandoned(database, evaluation_id, request=REQUEST)
        async with database.engine.connect() as holder:  # another claimer, in the middle of its transaction
            await holder.execute(text("SELECT id FROM evaluations WHERE id = 'ev_held' FOR UPDATE"))
            # A claim that waited for the lock would never return while `holder` holds it: the guard turns that
            # hang into a failure, it measures nothing.
            claimed = await asyncio.wait_for(
                EvaluationLeases(database, "reclaimer-a", 60.0).claim_abandoned(room=5), PATIENCE
            )
            await holder.rollback()
        assert [c.evaluation_id for c in claimed] == ["ev_free"]
        assert (await read_evaluation(database, "ev_held")).owner == DEAD_PROCESS
    finally:
        await database.dispose()
