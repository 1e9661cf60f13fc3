"""The events the analytics announce (issue 15): contribution.recorded, model_version.improved, evaluation.completed
and evaluation.failed, each written in the transaction of the record it announces.

The rule of `model_version.improved` is tested on its own (pure); the records and their events on SQLite and the
machine's PostgreSQL; and the whole path over HTTP on the shared service and the session's real MLflow: versions
registered with benchmark values, `hokusai contributions rebuild` run as a user runs it, evaluations of a real
model, and the log read back through GET /api/v1/events.
"""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Sequence
from datetime import timedelta

import mlflow
import pytest
from sqlalchemy import insert, select

from hokusai.server.analytics.contributors import ContributionStore, RecordedContribution
from hokusai.server.analytics.impact import VersionSubject, contribution_events
from hokusai.server.analytics.improvement import check_improvement
from hokusai.server.analytics.leases import (
    MAX_ATTEMPTS,
    REQUESTED_BY,
    EvaluationLeases,
    actor_record,
    stored_actor,
)
from hokusai.server.analytics.models import ContributionRow, EvaluationRow
from hokusai.server.analytics.versions import MetricDirection
from hokusai.server.config import Settings
from hokusai.server.db import Database, utcnow
from hokusai.server.events.models import EventRow
from hokusai.server.events.outbox import Actor, EventOutbox
from tests.support import run_analytics_scenario, run_cli, service_environment

THRESHOLD = Settings().improvement_threshold  # the default, 0.01
DIRECTION = MetricDirection(Settings().lower_is_better)
# Addresses of this module alone: the shared service and MLflow also hold test_model_analytics' contributors, whose
# impact totals (and `contributions rebuild`) would count these too.
ADDRESS = "0xE7e475A1C0FFEe000000000000000000000000A5"
OTHER_ADDRESS = "0x0DD5e7e4700000000000000000000000000000B6"
ANALYTICS_TYPES = ("contribution.recorded", "model_version.improved", "evaluation.completed", "evaluation.failed")
SOMEONE = Actor("api_key", "someone", "k_123")


# ---- the rule, pure ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parent", "lower", "improved", "rule"),
    [
        (0.82, 0.80, False, True, "absolute"),  # two percentage points
        (0.81, 0.80, False, True, "absolute"),  # exactly one (0.010000000000000009 in binary)
        (0.82, 0.81, False, True, "absolute"),  # exactly one (0.009999999999999898 in binary): still one
        (0.805, 0.80, False, False, "absolute"),  # half a point
        (0.78, 0.80, False, False, "absolute"),  # a regression
        (0.80, 0.80, False, False, "absolute"),  # no change
        (0.45, 0.50, True, True, "absolute"),  # a loss going down
        (0.55, 0.50, True, False, "absolute"),  # a loss going up
        (9.80, 9.95, True, True, "relative"),  # RMSE down 1.5 %
        (9.90, 9.95, True, False, "relative"),  # RMSE down 0.5 %
        (203.0, 200.0, False, True, "relative"),  # a score up 1.5 %
        (201.0, 200.0, False, False, "relative"),  # up 0.5 %
        (1.2, 0.9, False, True, "relative"),  # one side outside [0, 1]: relative (33 %)
        (-1.98, -2.0, False, True, "relative"),  # a negative parent: relative to its magnitude (1 %)
        (3.0, 0.0, False, True, "zero_parent"),  # nothing to be relative to: any strict improvement
        (-3.0, 0.0, False, False, "zero_parent"),
    ],
)
def test_the_improvement_rule(value, parent, lower, improved, rule):
    check = check_improvement("m", value, parent, lower, THRESHOLD)
    assert check is not None and check.improved is improved and check.rule == rule
    assert check.delta == pytest.approx(value - parent)
    assert check.improvement == pytest.approx(parent - value if lower else value - parent)
    assert check.direction == ("lower_is_better" if lower else "higher_is_better")
    assert check.relative == (None if parent == 0 else pytest.approx(check.improvement / abs(parent)))


def test_the_threshold_is_a_setting_and_missing_values_are_no_improvement():
    assert check_improvement("m", 0.805, 0.80, False, 0.005).improved  # half a point counts when asked
    assert not check_improvement("m", 0.82, 0.80, False, 0.05).improved
    assert check_improvement("m", 0.8000001, 0.80, False, 0.0).improved  # 0: any strict improvement
    assert not check_improvement("m", 0.80, 0.80, False, 0.0).improved
    for value, parent in ((None, 0.8), (0.8, None), (float("nan"), 0.8), (0.9, float("inf"))):
        assert check_improvement("m", value, parent, False, THRESHOLD) is None


def recorded(value: float | None, parent_value: float | None, *addresses: str) -> list[RecordedContribution]:
    weight = 1 / len(addresses)
    parent = "m:1" if parent_value is not None else None
    return [RecordedContribution(a, weight, "accuracy", value, parent, parent_value) for a in addresses]


def kinds(events: Sequence) -> list[str]:
    return [event.type for event in events]


def test_what_a_record_announces():
    subject = VersionSubject("m", "2", "mdl_1")

    def announced(record, previous=()):
        return contribution_events(subject, SOMEONE, record, list(previous), DIRECTION, THRESHOLD)

    first = announced(recorded(0.82, 0.80, ADDRESS, OTHER_ADDRESS))
    assert kinds(first) == ["contribution.recorded", "model_version.improved"]
    contribution, improved = first
    assert (contribution.actor, contribution.model_name, contribution.version, contribution.model_id) == (
        SOMEONE,
        "m",
        "2",
        "mdl_1",
    )
    assert contribution.payload["first_record"] is True and contribution.payload["parent"] == "m:1"
    assert contribution.payload["improvement"] == pytest.approx(0.02)
    assert [c["improvement_score"] for c in contribution.payload["contributors"]] == pytest.approx([0.01, 0.01])
    assert improved.payload["parent"] == "m:1" and improved.payload["threshold"] == THRESHOLD
    assert improved.payload["contributors"] == [
        {"address": ADDRESS, "weight": 0.5},
        {"address": OTHER_ADDRESS, "weight": 0.5},
    ]
    # The same record again (a rebuild): nothing. A changed one: recorded again; improved only when newly so.
    assert announced(recorded(0.82, 0.80, ADDRESS), recorded(0.82, 0.80, ADDRESS)) == []
    assert kinds(announced(recorded(0.83, 0.80, ADDRESS), recorded(0.82, 0.80, ADDRESS))) == ["contribution.recorded"]
    assert kinds(announced(recorded(0.83, 0.80, ADDRESS), recorded(0.805, 0.80, ADDRESS))) == [
        "contribution.recorded",
        "model_version.improved",
    ]
    # No parent value, a regression, a change below the threshold, nobody named: no improvement.
    assert kinds(announced(recorded(0.9, None, ADDRESS))) == ["contribution.recorded"]
    assert kinds(announced(recorded(0.7, 0.8, ADDRESS))) == ["contribution.recorded"]
    assert kinds(announced(recorded(0.805, 0.8, ADDRESS))) == ["contribution.recorded"]
    assert announced([]) == []


def test_the_requester_of_a_background_evaluation_is_kept_beside_its_request():
    stored = {"model_name": "m", REQUESTED_BY: actor_record(SOMEONE)}
    assert stored_actor(stored) == SOMEONE
    assert stored_actor({"model_name": "m"}) is None and stored_actor(None) is None
    assert stored_actor({REQUESTED_BY: {"kind": "root", "name": "x"}}) is None  # not a kind of actor
    assert stored_actor({REQUESTED_BY: {"kind": "cli", "name": 7}}) is None


# ---- the records and their events, on SQLite and PostgreSQL ----------------------------------------------------


async def logged(database: Database, model_name: str | None = None) -> list[EventRow]:
    query = select(EventRow).order_by(EventRow.seq)
    if model_name is not None:
        query = query.where(EventRow.model_name == model_name)
    async with database.session() as session:
        return list((await session.execute(query)).scalars())


def contribution_rows(name: str, value: float, parent_value: float = 0.80) -> list[ContributionRow]:
    return [
        ContributionRow(
            address=ADDRESS,
            model_name=name,
            version="2",
            model_id=None,
            weight=1.0,
            benchmark_metric="accuracy",
            benchmark_value=value,
            parent=f"{name}:1",
            parent_value=parent_value,
            improvement_score=value - parent_value,
            contributed_at=utcnow(),
        )
    ]


async def record(store: ContributionStore, name: str, value: float) -> list[RecordedContribution]:
    rows = contribution_rows(name, value)
    now = [RecordedContribution.of(row) for row in rows]
    subject = VersionSubject(name, "2", None)
    return await store.replace(
        name, "2", rows, lambda previous: contribution_events(subject, SOMEONE, now, previous, DIRECTION, THRESHOLD)
    )


@pytest.mark.anyio
async def test_records_are_announced_in_their_transaction_once(database):
    store = ContributionStore(database, EventOutbox(database))
    assert await record(store, "m", 0.805) == []  # nothing recorded before
    assert [e.type for e in await logged(database, "m")] == ["contribution.recorded"]
    assert len(await record(store, "m", 0.805)) == 1  # a rebuild that changes nothing announces nothing
    assert [e.type for e in await logged(database, "m")] == ["contribution.recorded"]
    await record(store, "m", 0.83)  # now two points over its parent
    await record(store, "m", 0.84)  # changed again, improved already announced
    events = await logged(database, "m")
    assert [e.type for e in events] == [
        "contribution.recorded",
        "contribution.recorded",
        "model_version.improved",
        "contribution.recorded",
    ]
    assert [e.payload.get("first_record") for e in events] == [True, False, None, False]
    improved = events[2]
    assert improved.payload["value"] == 0.83 and improved.payload["delta"] == pytest.approx(0.03)
    assert (improved.actor_kind, improved.actor_name, improved.actor_key_id) == ("api_key", "someone", "k_123")
    async with database.session() as session:  # the record itself is the last one, once
        rows = (await session.execute(select(ContributionRow).where(ContributionRow.model_name == "m"))).scalars()
        assert [row.benchmark_value for row in rows] == [0.84]


@pytest.mark.anyio
async def test_two_first_recordings_at_once_announce_once(database):
    """A registration's recording and a rebuild's, of one new version, from two processes (two engines)."""
    second = Database(database.engine.url.render_as_string(hide_password=False))
    try:
        stores = [ContributionStore(db, EventOutbox(db)) for db in (database, second)]
        previous = await asyncio.gather(*(record(store, "both", 0.83) for store in stores))
    finally:
        await second.dispose()
    assert sorted(len(p) for p in previous) == [0, 1]  # one found nothing, the other found the first's record
    assert [e.type for e in await logged(database, "both")] == ["contribution.recorded", "model_version.improved"]


async def add_evaluation(database: Database, leases: EvaluationLeases, evaluation_id: str, **values: object) -> None:
    row = {
        "id": evaluation_id,
        "model_name": "evaluated",
        "version": "3",
        "dataset_path": "holdout.csv",
        "status": "running",
        "created_at": utcnow() - timedelta(seconds=5),
        "attempts": 1,
        **leases.lease(),
        **values,
    }
    async with database.session() as session, session.begin():
        await session.execute(insert(EvaluationRow).values(**row))


@pytest.mark.anyio
async def test_an_outcome_is_announced_only_by_the_write_that_took_effect(database):
    outbox = EventOutbox(database)
    mine, theirs = EvaluationLeases(database, "me", 60, outbox), EvaluationLeases(database, "them", 60, outbox)
    await add_evaluation(database, mine, "ev_done")
    result = {"metrics": {"accuracy": 0.9}, "sample_count": 300, "run_id": "r1", "duration_seconds": 1.5}
    assert not await theirs.finish("ev_done", SOMEONE, status="succeeded", result=result, finished_at=utcnow())
    assert await logged(database) == []  # not its evaluation: nothing written, nothing announced
    assert await mine.finish("ev_done", SOMEONE, status="succeeded", result=result, finished_at=utcnow())
    [completed] = await logged(database)
    assert completed.type == "evaluation.completed" and (completed.model_name, completed.version) == ("evaluated", "3")
    assert completed.actor_name == "someone" and completed.payload["metrics"] == {"accuracy": 0.9}
    assert completed.payload["evaluation_id"] == "ev_done" and completed.payload["dataset"] == "holdout.csv"
    assert completed.payload["sample_count"] == 300 and completed.payload["duration_seconds"] == 1.5
    assert completed.payload["elapsed_seconds"] >= 5

    await add_evaluation(database, mine, "ev_broken", request={"model_name": "evaluated", REQUESTED_BY: {}})
    assert await mine.finish("ev_broken", None, status="failed", error="no such column", finished_at=utcnow())
    failed = (await logged(database))[-1]
    assert failed.type == "evaluation.failed" and failed.payload["error"] == "no such column"
    assert (failed.actor_kind, failed.actor_name) == ("service", "hokusai")  # nobody known asked
    with pytest.raises(ValueError):
        await mine.finish("ev_broken", None, status="running")


@pytest.mark.anyio
async def test_an_evaluation_given_up_on_is_announced_once_as_its_requester(database):
    """Two processes reclaim an evaluation that died too often; the one whose claim takes effect announces it."""
    dead = EvaluationLeases(database, "dead", 60)
    stored = {"model_name": "evaluated", "model_version": "3", "dataset_path": "holdout.csv"}
    expired = utcnow() - timedelta(minutes=1)
    await add_evaluation(
        database,
        dead,
        "ev_abandoned",
        request={**stored, REQUESTED_BY: actor_record(SOMEONE)},
        attempts=MAX_ATTEMPTS,
        lease_expires_at=expired,
        heartbeat_at=expired,
    )
    second = Database(database.engine.url.render_as_string(hide_password=False))
    try:
        claimers = [EvaluationLeases(db, f"claimer-{db is second}", 60, EventOutbox(db)) for db in (database, second)]
        claims = await asyncio.gather(*(claimer.claim_abandoned(room=1) for claimer in claimers))
    finally:
        await second.dispose()
    assert sorted(len(claimed) for claimed in claims) == [0, 1]
    [failed] = await logged(database)
    assert failed.type == "evaluation.failed" and f"{MAX_ATTEMPTS} times" in failed.payload["error"]
    assert (failed.actor_kind, failed.actor_name, failed.actor_key_id) == ("api_key", "someone", "k_123")


# ---- over HTTP, on the real service and MLflow ---------------------------------------------------------------------

ACCURACY_MODEL = "events-accuracy"
LOSS_MODEL = "events-loss"
RMSE_MODEL = "events-rmse"


def events_of(reader, model: str, types: Sequence[str] = ANALYTICS_TYPES) -> list[dict]:
    """Every event of the model of these types, following the cursor."""
    found, cursor = [], None
    while True:
        params = {"model": model, "type": list(types), "limit": 100, **({"cursor": cursor} if cursor else {})}
        page = reader.get("/api/v1/events", params=params)
        assert page.status_code == 200, page.text
        found += page.json()["events"]
        if (cursor := page.json()["next_cursor"]) is None:
            return found


def by_version(events: list[dict], kind: str) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for event in events:
        if event["type"] == kind:
            grouped.setdefault(event["subject"]["version"], []).append(event)
    return grouped


@pytest.fixture(scope="module")
def scenario(service, keys) -> dict:
    """The analytics scenario's two trained classifiers (logged, unregistered) and its holdout file."""
    return run_analytics_scenario(service, keys["write"], "events-scenario")


def register(writer, name: str, model_uri: str, metric: str, value: float, contributor: str = ADDRESS) -> dict:
    metadata = {"benchmark_metric": metric, "benchmark_value": value, "contributor_address": contributor}
    body = {"model_data": model_uri, "model_type": "classifier", "model_name": name, "metadata": metadata}
    answer = writer.post("/models/register", json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def registered(writer, scenario) -> dict[str, list[dict]]:
    """Three models, each a chain of versions (each one's parent is the one before), all naming a contributor."""
    uri = scenario["versions"][1]["model_uri"]
    chains = {
        # +0.02 (improved), +0.005 (below the threshold), -0.015 (a regression)
        ACCURACY_MODEL: ("val_accuracy", [0.80, 0.82, 0.825, 0.81]),
        # a loss: 0.50 -> 0.45 is better by 0.05 (improved); then 0.455 is worse
        LOSS_MODEL: ("val_loss", [0.50, 0.45, 0.455]),
        # outside [0, 1]: relative; 10 -> 9.95 is 0.5 % (not), 9.95 -> 9.80 is 1.5 % (improved)
        RMSE_MODEL: ("rmse", [10.0, 9.95, 9.80]),
    }
    return {
        name: [register(writer, name, uri, metric, value) for value in values]
        for name, (metric, values) in chains.items()
    }


def test_each_registration_is_recorded_once_and_improvements_announced(reader, registered, keys):
    for name, versions in registered.items():
        events = events_of(reader, name)
        recorded = by_version(events, "contribution.recorded")
        assert sorted(recorded) == [v["version"] for v in versions] and all(len(e) == 1 for e in recorded.values())
        model_id = versions[0]["model_id"]
        for event in events:
            assert event["subject"]["model_id"] == model_id
            assert event["actor"]["kind"] == "api_key" and event["actor"]["name"].endswith("write")
        first = recorded["1"][0]["payload"]
        assert first["parent"] is None and first["improvement"] is None and first["first_record"] is True
        assert first["contributors"] == [{"address": ADDRESS, "weight": 1.0, "improvement_score": 0.0}]
        second = recorded["2"][0]["payload"]
        assert second["parent"] == f"{name}:1" and second["parent_value"] == first["benchmark_value"]

    improved = by_version(events_of(reader, ACCURACY_MODEL), "model_version.improved")
    assert list(improved) == ["2"]  # not v3 (+0.005), not v4 (a regression), not v1 (no parent)
    payload = improved["2"][0]["payload"]
    assert payload["metric"] == "val_accuracy" and (payload["value"], payload["parent_value"]) == (0.82, 0.80)
    assert payload["delta"] == pytest.approx(0.02) and payload["improvement"] == pytest.approx(0.02)
    assert payload["parent"] == f"{ACCURACY_MODEL}:1" and payload["direction"] == "higher_is_better"
    assert payload["threshold"] == THRESHOLD and payload["rule"] == "absolute"
    assert payload["relative"] == pytest.approx(0.025)
    assert payload["contributors"] == [{"address": ADDRESS, "weight": 1.0}]

    improved = by_version(events_of(reader, LOSS_MODEL), "model_version.improved")
    assert list(improved) == ["2"]
    payload = improved["2"][0]["payload"]
    assert payload["direction"] == "lower_is_better" and payload["rule"] == "absolute"
    assert payload["delta"] == pytest.approx(-0.05) and payload["improvement"] == pytest.approx(0.05)

    improved = by_version(events_of(reader, RMSE_MODEL), "model_version.improved")
    assert list(improved) == ["3"]  # 1.5 % better; v2 was 0.5 %
    payload = improved["3"][0]["payload"]
    assert payload["rule"] == "relative" and payload["relative"] == pytest.approx(0.15 / 9.95)
    assert payload["direction"] == "lower_is_better" and payload["parent"] == f"{RMSE_MODEL}:2"


def test_rebuild_announces_only_what_changed(service, reader, registered, mlflow_server):
    """Rebuilding records everything anew and announces nothing it had recorded; a value changed in MLflow since
    is recorded and announced again, as the command's user, and now beats its parent."""
    env = service_environment(HOKUSAI_HOME=str(service.home), HOKUSAI_MLFLOW_URL=mlflow_server.url)
    before = {name: events_of(reader, name) for name in registered}
    rebuilt = run_cli("contributions", "rebuild", "--json", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert {name: events_of(reader, name) for name in registered} == before

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    client.set_model_version_tag(ACCURACY_MODEL, "3", "benchmark_value", "0.84")  # v3 now +0.02 over v2
    again = run_cli("contributions", "rebuild", "--json", env=env)
    assert again.returncode == 0, again.stderr
    new = events_of(reader, ACCURACY_MODEL)[len(before[ACCURACY_MODEL]) :]
    # v3's record changed, and so did v4's (its parent's value is v3's): both recorded again; only v3 improved.
    assert sorted((e["subject"]["version"], e["type"]) for e in new) == [
        ("3", "contribution.recorded"),
        ("3", "model_version.improved"),
        ("4", "contribution.recorded"),
    ]
    recorded, improved = by_version(new, "contribution.recorded"), by_version(new, "model_version.improved")
    assert (
        recorded["3"][0]["payload"]["first_record"] is False and recorded["3"][0]["payload"]["benchmark_value"] == 0.84
    )
    assert recorded["4"][0]["payload"]["parent_value"] == 0.84 and recorded["4"][0]["payload"]["improvement"] < 0
    assert (
        improved["3"][0]["payload"]["parent"] == f"{ACCURACY_MODEL}:2" and improved["3"][0]["payload"]["value"] == 0.84
    )
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    assert all(e["actor"] == {"kind": "cli", "name": f"cli:{user}", "key_id": None} for e in new)

    third = run_cli("contributions", "rebuild", "--json", env=env)
    assert third.returncode == 0, third.stderr
    assert len(events_of(reader, ACCURACY_MODEL)) == len(before[ACCURACY_MODEL]) + 3


def test_evaluations_announce_their_outcome_once(service, writer, reader, registered, scenario):
    name, version = ACCURACY_MODEL, registered[ACCURACY_MODEL][0]["version"]
    body = {"model_name": name, "model_version": version, "dataset_path": "holdout.csv", "metrics": ["accuracy"]}
    succeeded = writer.post("/models/evaluate", json=body)
    assert succeeded.status_code == 200 and succeeded.json()["status"] == "succeeded", succeeded.text
    # A dataset without the target column: the evaluation is recorded, and fails.
    (service.home / "datasets" / "no-label.csv").write_text("a,b,c\n0.1,0.2,0.3\n")
    failed = writer.post("/models/evaluate", json={**body, "dataset_path": "no-label.csv"})
    assert failed.status_code == 400, failed.text

    events = events_of(reader, name, ("evaluation.*",))
    completed = [e for e in events if e["payload"]["evaluation_id"] == succeeded.json()["evaluation_id"]]
    assert [e["type"] for e in completed] == ["evaluation.completed"]
    payload = completed[0]["payload"]
    assert payload["status"] == "succeeded" and payload["dataset"] == "holdout.csv"
    assert payload["metrics"] == succeeded.json()["metrics"]
    assert payload["metrics"]["accuracy"] == pytest.approx(scenario["versions"][1]["holdout_accuracy"])
    assert payload["run_id"] == succeeded.json()["run_id"] and payload["sample_count"] == 300
    assert payload["duration_seconds"] == succeeded.json()["duration_seconds"] and payload["elapsed_seconds"] >= 0
    model_id = registered[name][0]["model_id"]
    assert completed[0]["subject"] == {"model_name": name, "version": version, "model_id": model_id}
    assert completed[0]["actor"]["kind"] == "api_key" and completed[0]["actor"]["name"].endswith("write")

    failures = [e for e in events if e["type"] == "evaluation.failed"]
    assert len(failures) == 1 and "target_column" in failures[0]["payload"]["error"]
    assert failures[0]["payload"]["status"] == "failed" and failures[0]["payload"]["dataset"] == "no-label.csv"
    assert failures[0]["actor"] == completed[0]["actor"]
