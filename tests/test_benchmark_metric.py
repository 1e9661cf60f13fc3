"""A `benchmark_metric` registered without a `benchmark_value` is measured by the version's own metric of that name.

Impact, compare, the improvement history and `hokusai contributions rebuild` must all use that number; the expected
values come from what tests/analytics_scenario.py logged, never from the service.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from hokusai.server.analytics.lineage import LineageService
from hokusai.server.analytics.versions import MetricDirection, VersionReader
from hokusai.server.config import Settings
from hokusai.server.db import Database
from hokusai.server.mlflow.registry_client import MlflowApi
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.runtime import build_breaker
from tests.support import run_analytics_scenario, run_cli, service_environment

MODEL = "benchmark-metric-classifier"
TRAINER = "0x52908400098527886E0F7030069857D2E4169EE7"  # EIP-55 test vectors
OVERRIDER = "0x8617E340B3D01FA5F11F306F4090FD50E238070D"
LOSS_CUTTER = "0x27b1fdb04752bbc536007a920d24acb045561c26"


def register(writer, model_uri: str, metadata: dict) -> str:
    body = {"model_data": model_uri, "model_type": "classifier", "model_name": MODEL, "metadata": metadata}
    answer = writer.post("/models/register", json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()["version"]


def contribution(reader, address: str) -> tuple[dict, dict]:
    impact = reader.get(f"/models/contributors/{address}/impact")
    assert impact.status_code == 200, impact.text
    body = impact.json()
    own = [c for c in body["contributions"] if c["model_name"] == MODEL]
    assert len(own) == 1, body
    return body, own[0]


def history_steps(reader) -> dict[str, dict]:
    answer = reader.get(f"/models/{MODEL}/lineage")
    assert answer.status_code == 200, answer.text
    return {step["version"]: step for step in answer.json()["lineage"]}


@pytest.fixture(scope="module")
def scenario(service, keys, writer) -> dict:
    """v1: the weak model, no metadata; v2: the better one, naming val_accuracy as its benchmark (no value)."""
    logged = run_analytics_scenario(service, keys["write"], MODEL)
    first, second = logged["versions"]
    assert register(writer, first["model_uri"], {}) == "1"
    metadata = {"benchmark_metric": "val_accuracy", "contributor_address": TRAINER.lower()}
    assert register(writer, second["model_uri"], metadata) == "2"
    return logged


def test_impact_uses_the_logged_benchmark_metric(reader, scenario):
    v1, v2 = (v["metrics"]["val_accuracy"] for v in scenario["versions"])
    assert v2 != v1
    impact, own = contribution(reader, TRAINER)
    assert own["benchmark_metric"] == "val_accuracy" and own["parent"] == f"{MODEL}:1"
    assert own["benchmark_value"] == pytest.approx(v2) and own["parent_value"] == pytest.approx(v1)
    assert own["improvement_score"] == pytest.approx(v2 - v1)
    assert impact["total_models_improved"] == (1 if v2 > v1 else 0)
    assert impact["total_improvement_score"] == pytest.approx(max(v2 - v1, 0.0))
    assert v2 > v1  # the scenario's second model is the better one


def test_compare_recommends_by_the_benchmark_tag(reader, scenario):
    v1, v2 = (v["metrics"]["val_accuracy"] for v in scenario["versions"])
    for first, second in (("1", "2"), ("2", "1")):
        answer = reader.get("/models/compare", params={"model1": f"{MODEL}:{first}", "model2": f"{MODEL}:{second}"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        # Not the first shared metric (train_accuracy): the tag of version 2 names val_accuracy.
        assert body["metric"] == "val_accuracy" and body["higher_is_better"] is True
        assert body["delta"]["val_accuracy"] == pytest.approx((v2 - v1) if first == "1" else (v1 - v2))
        assert body["recommendation"] == "Use version 2"
        assert body["better"] == ("model2" if second == "2" else "model1")


def test_history_agrees_with_impact(reader, scenario):
    v1, v2 = (v["metrics"]["val_accuracy"] for v in scenario["versions"])
    steps = history_steps(reader)
    assert steps["1"]["improvement"] is None and steps["1"]["metrics"]["val_accuracy"] == pytest.approx(v1)
    assert steps["2"]["benchmark_metric"] == "val_accuracy" and steps["2"]["parent"] == f"{MODEL}:1"
    assert steps["2"]["metrics"]["val_accuracy"] == pytest.approx(v2)
    _, own = contribution(reader, TRAINER)
    assert steps["2"]["improvement"] == pytest.approx(v2 - v1) == pytest.approx(own["improvement_score"])
    lineage = reader.get(f"/models/{MODEL}/2/lineage").json()
    assert lineage["parents"] == [f"{MODEL}:1"] and lineage["contributors"][0]["address"] == TRAINER


def test_benchmark_value_still_overrides(reader, writer, scenario):
    """v3: the weak model's files, registered with a value of its own: the value counts, not the run's metric."""
    v2 = scenario["versions"][1]["metrics"]["val_accuracy"]
    metadata = {
        "benchmark_metric": "val_accuracy",
        "benchmark_value": 0.99,
        "contributor_address": OVERRIDER,
        "parent_version": "2",
    }
    version = register(writer, scenario["versions"][0]["model_uri"], metadata)
    _, own = contribution(reader, OVERRIDER)
    assert own["version"] == version and own["benchmark_value"] == pytest.approx(0.99)
    assert own["parent_value"] == pytest.approx(v2) and own["improvement_score"] == pytest.approx(0.99 - v2)
    step = history_steps(reader)[version]
    assert step["metrics"]["val_accuracy"] == pytest.approx(0.99) and step["improvement"] == pytest.approx(0.99 - v2)
    compared = reader.get("/models/compare", params={"model1": f"{MODEL}:2", "model2": f"{MODEL}:{version}"}).json()
    assert compared["metric"] == "val_accuracy" and compared["model2"]["val_accuracy"] == pytest.approx(0.99)
    assert compared["delta"]["val_accuracy"] == pytest.approx(0.99 - v2)


def test_lower_is_better_metric(reader, writer, scenario):
    """The better model's files on top of v1, benchmarked by val_loss: a drop in loss is a positive score."""
    loss1, loss2 = (v["metrics"]["val_loss"] for v in scenario["versions"])
    assert loss2 < loss1
    metadata = {"benchmark_metric": "val_loss", "contributor_address": LOSS_CUTTER, "parent_version": "1"}
    version = register(writer, scenario["versions"][1]["model_uri"], metadata)
    impact, own = contribution(reader, LOSS_CUTTER)
    assert own["version"] == version and own["benchmark_metric"] == "val_loss"
    assert own["benchmark_value"] == pytest.approx(loss2) and own["parent_value"] == pytest.approx(loss1)
    assert own["improvement_score"] == pytest.approx(loss1 - loss2) and own["improvement_score"] > 0
    assert impact["total_models_improved"] == 1
    step = history_steps(reader)[version]
    assert step["benchmark_metric"] == "val_loss" and step["improvement"] == pytest.approx(loss1 - loss2)
    compared = reader.get("/models/compare", params={"model1": f"{MODEL}:1", "model2": f"{MODEL}:{version}"}).json()
    assert compared["metric"] == "val_loss" and compared["higher_is_better"] is False
    assert compared["better"] == "model2"


def test_rebuild_fixes_rows_recorded_without_the_value(service, reader, scenario, mlflow_server):
    """Rows as the old code recorded them (no metric, score 0) are recomputed by `hokusai contributions rebuild`."""
    v1, v2 = (v["metrics"]["val_accuracy"] for v in scenario["versions"])
    with sqlite3.connect(service.home / "hokusai.db") as db:
        stale = db.execute(
            "UPDATE contributions SET benchmark_metric = NULL, benchmark_value = NULL, parent_value = NULL, "
            "improvement_score = 0 WHERE model_name = ? AND version = '2'",
            (MODEL,),
        )
        assert stale.rowcount == 1
    impact, own = contribution(reader, TRAINER)
    assert own["improvement_score"] == 0 and impact["total_models_improved"] == 0
    env = service_environment(HOKUSAI_HOME=str(service.home), HOKUSAI_MLFLOW_URL=mlflow_server.url)
    rebuilt = run_cli("contributions", "rebuild", "--json", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout)["contributions"] >= 3
    impact, own = contribution(reader, TRAINER)
    assert own["benchmark_metric"] == "val_accuracy" and own["benchmark_value"] == pytest.approx(v2)
    assert own["parent_value"] == pytest.approx(v1) and own["improvement_score"] == pytest.approx(v2 - v1)
    assert impact["total_models_improved"] == 1


def test_history_reads_what_compare_reads(reader, writer, scenario):
    """Logged model and latest evaluation included: the history's metrics of a version are compare's."""
    evaluated = writer.post(
        "/models/evaluate",
        json={"model_name": MODEL, "model_version": "2", "dataset_path": "holdout.csv", "metrics": ["accuracy"]},
    )
    assert evaluated.status_code == 200, evaluated.text
    steps = history_steps(reader)
    compared = reader.get("/models/compare", params={"model1": f"{MODEL}:1", "model2": f"{MODEL}:2"}).json()
    assert steps["2"]["metrics"]["eval_accuracy"] == pytest.approx(scenario["versions"][1]["holdout_accuracy"])
    assert steps["1"]["metrics"] == compared["model1"]["metrics"]
    assert steps["2"]["metrics"] == compared["model2"]["metrics"]


@pytest.mark.anyio
async def test_history_calls_stay_batched_with_logged_models_and_evaluations(service, scenario, mlflow_server):
    """Every version here is a logged model and one has an evaluation: still a fixed number of MLflow calls
    (versions, experiments, runs, logged models, evaluations), none per version."""

    class CountingApi(MlflowApi):
        calls: list[str] = []

        async def __call__(self, method, path, *args, **kwargs):
            CountingApi.calls.append(path)
            return await super().__call__(method, path, *args, **kwargs)

    settings = Settings(home=service.home)
    database = Database(settings.async_database_dsn)
    upstream = MlflowUpstream(mlflow_server.url, 30.0, breaker=build_breaker(settings))
    try:
        reader = VersionReader(CountingApi(upstream), settings.evaluation_experiment)
        lineage = LineageService(reader, database, MetricDirection(settings.lower_is_better))
        history = await lineage.improvement_history(MODEL)
        history_calls = list(CountingApi.calls)
        facts = await reader.facts_of_versions(await reader.all_versions(MODEL))  # what those calls found
    finally:
        await upstream.aclose()
        await database.dispose()
    assert history.total_versions >= 4
    assert sorted(history_calls) == sorted(
        ["/model-versions/search", "/experiments/search", "/runs/search", "/logged-models/search", "/runs/search"]
    )
    assert all(one.logged_model is not None and one.run is not None for one in facts.values())
    assert facts["2"].evaluation is not None and facts["1"].evaluation is None
    assert facts["2"].metrics()["eval_accuracy"] == pytest.approx(scenario["versions"][1]["holdout_accuracy"])
