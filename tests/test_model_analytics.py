"""Model analytics over HTTP on a real scenario: compare, evaluate, predict, metrics, lineage, contributor impact.

Every expected number comes from what the scenario logged (analytics_scenario.py), or from scikit-learn on the same
file: a service returning constants fails these tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from hokusai.server.models.files import cache_directory_name
from hokusai.server.registry.download import served_artifact_root
from tests.support import (
    benchmark_metadata,
    run_analytics_scenario,
    run_cli,
    service_environment,
    through_the_gateway,
)

MODEL = "analytics-classifier"
CONTRIBUTOR = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # the EIP-55 example address
SECOND = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"
THIRD = "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB"


def register(writer, model_uri: str, metadata: dict):
    body = {"model_data": model_uri, "model_type": "classifier", "model_name": MODEL, "metadata": metadata}
    return writer.post("/models/register", json=body)


@pytest.fixture(scope="module")
def scenario(service, keys, writer) -> dict:
    """Two trained versions: v1 (no contributor), v2 contributed by CONTRIBUTOR (given in lowercase)."""
    logged = run_analytics_scenario(service, keys["write"], MODEL)
    registered = []
    for index, version in enumerate(logged["versions"]):
        metadata = benchmark_metadata(version, CONTRIBUTOR.lower() if index == 1 else None)
        answer = register(writer, version["model_uri"], metadata)
        assert answer.status_code == 201, answer.text
        registered.append(answer.json())
    assert [r["version"] for r in registered] == ["1", "2"]
    logged["model_id"] = registered[0]["model_id"]
    return logged


def cached_files(service, mlflow_server, name: str, version: str) -> Path:
    """Where the service keeps the version's files: HOME/model-cache/<a directory named for the version>."""
    answer = httpx.get(
        f"{mlflow_server.url}/api/2.0/mlflow/model-versions/get-download-uri",
        params={"name": name, "version": version},
    )
    answer.raise_for_status()
    root = served_artifact_root(answer.json()["artifact_uri"])
    return service.home / "model-cache" / cache_directory_name(name, version, root)


def wait_for_path(path: Path) -> None:
    deadline = time.monotonic() + 120  # a bound on waiting, not a measure of speed
    while not path.is_dir():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_registered_versions_are_fetched_ahead_of_their_first_call(service, mlflow_server, scenario):
    """Issue 17: registering a version fetches its files in the background; nothing of this module has asked for
    either version's files yet (this test runs first)."""
    for version in ("1", "2"):
        directory = cached_files(service, mlflow_server, MODEL, version)
        wait_for_path(directory)
        assert (directory / "MLmodel").is_file()


def test_a_version_entering_production_is_fetched_ahead_and_its_first_call_loads_it(
    service, mlflow_server, writer, reader, scenario
):
    """A version made in MLflow directly is not fetched until it enters Production through the service; its first
    predict then only loads it (`loaded`), later ones do not."""
    name = "analytics-production-prefetch"
    api = f"{mlflow_server.url}/api/2.0/mlflow"
    model_uri = scenario["versions"][0]["model_uri"]
    httpx.post(f"{api}/registered-models/create", json={"name": name}).raise_for_status()
    made = httpx.post(
        f"{api}/model-versions/create",
        json={"name": name, "source": model_uri, "model_id": model_uri.removeprefix("models:/")},
    )
    made.raise_for_status()
    version = made.json()["model_version"]["version"]
    directory = cached_files(service, mlflow_server, name, version)
    assert not directory.exists()
    moved = writer.post(f"/models/{name}/{version}/transition", json={"stage": "Production"})
    assert moved.status_code == 200, moved.text
    wait_for_path(directory)
    rows = scenario["versions"][0]["first_rows"]
    first = reader.post(f"/models/{name}/{version}/predict", json={"inputs": rows})
    assert first.status_code == 200, first.text
    assert first.json()["loaded"] is True and first.json()["load_ms"] > 0
    assert first.json()["predictions"] == scenario["versions"][0]["first_predictions"]
    again = reader.post(f"/models/{name}/{version}/predict", json={"inputs": rows}).json()
    assert again["loaded"] is False and again["load_ms"] is None


@pytest.mark.anyio
async def test_prefetch_skips_a_version_larger_than_the_model_cache(mlflow_server, scenario, tmp_path):
    """HOKUSAI_MODEL_CACHE_MAX_BYTES bounds what is fetched ahead: a version that could not stay is left to its
    first call."""
    from hokusai.server.mlflow.breaker import CircuitBreaker
    from hokusai.server.mlflow.upstream import MlflowUpstream
    from hokusai.server.models.files import ModelFiles

    upstream = MlflowUpstream(mlflow_server.url, 30, breaker=CircuitBreaker())
    try:
        small = ModelFiles(upstream, tmp_path / "small", max_bytes=100)
        small.prefetch(MODEL, "1")
        await small.prefetched()
        assert not list((tmp_path / "small").glob("*"))
        roomy = ModelFiles(upstream, tmp_path / "roomy", max_bytes=10**9)
        roomy.prefetch(MODEL, "1")
        roomy.prefetch(MODEL, "1")  # asked twice while queued: fetched once
        await roomy.prefetched()
        (fetched,) = (tmp_path / "roomy").iterdir()
        assert (fetched / "MLmodel").is_file()
        assert await roomy.local_copy(MODEL, "1") == fetched  # the first call finds it
        await roomy.aclose()
        await small.aclose()
    finally:
        await upstream.aclose()


def test_compare_reports_the_logged_differences(reader, scenario):
    v1, v2 = (v["metrics"] for v in scenario["versions"])
    answer = reader.get("/models/compare", params={"model1": f"{MODEL}:1", "model2": f"{MODEL}:2"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    for key in ("train_accuracy", "val_accuracy", "val_error", "val_loss"):
        assert body["model1"][key] == pytest.approx(v1[key]) and body["model1"]["metrics"][key] == pytest.approx(
            v1[key]
        )
        assert body["delta"][key] == pytest.approx(v2[key] - v1[key])
    assert body["model1"]["name"] == MODEL and body["model2"]["version"] == "2"
    assert v2["val_accuracy"] > v1["val_accuracy"]  # the scenario's second version is the better one
    assert body["metric"] == "val_accuracy" and body["higher_is_better"] is True  # the benchmark tag
    assert body["recommendation"] == "Use version 2" and body["better"] == "model2"
    reverse = reader.get("/api/models/compare", params={"model1": f"{MODEL}:2", "model2": f"{MODEL}:1"}).json()
    assert reverse["recommendation"] == "Use version 2" and reverse["better"] == "model1"


def test_a_lower_is_better_metric_flips_the_direction(reader, scenario):
    v1, v2 = (v["metrics"] for v in scenario["versions"])
    assert v2["val_error"] < v1["val_error"]
    by_error = reader.get(
        "/models/compare", params={"model1": f"{MODEL}:1", "model2": f"{MODEL}:2", "metric": "val_error"}
    ).json()
    # The error went down, which is an improvement: the same version wins as by accuracy.
    assert by_error["higher_is_better"] is False and by_error["better"] == "model2"
    assert by_error["delta"]["val_error"] == pytest.approx(v2["val_error"] - v1["val_error"])
    assert by_error["delta"]["val_error"] < 0
    by_loss = reader.get(
        "/models/compare", params={"model1": f"{MODEL}:2", "model2": f"{MODEL}:1", "metric": "val_loss"}
    ).json()
    assert by_loss["higher_is_better"] is False
    assert by_loss["better"] == ("model1" if v2["val_loss"] < v1["val_loss"] else "model2")


def test_compare_tolerance_aliases_and_bad_references(reader, writer, scenario):
    same = reader.get("/models/compare", params={"model1": f"{MODEL}:2", "model2": f"{MODEL}:2"}).json()
    assert same["better"] is None and same["recommendation"].startswith("Equivalent on val_accuracy")
    assert all(value == 0 for value in same["delta"].values())
    loose = reader.get(
        "/models/compare", params={"model1": f"{MODEL}:1", "model2": f"{MODEL}:2", "tolerance": 10}
    ).json()
    assert loose["better"] is None
    alias = writer.post(
        "/models/batch",
        json={"operations": [{"action": "set_alias", "model": f"{MODEL}:2", "alias": "champion"}]},
    )
    assert alias.json()["successful"] == 1
    by_alias = reader.get("/models/compare", params={"model1": f"{MODEL}:1", "model2": f"{MODEL}@champion"}).json()
    assert by_alias["model2"]["version"] == "2" and by_alias["better"] == "model2"
    for bad in ("no-version", f"{MODEL}:", f"{MODEL}:x1", "@champion"):
        refused = reader.get("/models/compare", params={"model1": bad, "model2": f"{MODEL}:1"})
        assert refused.status_code == 400 and "Name:Version or Name@alias" in refused.json()["detail"]
    missing = reader.get("/models/compare", params={"model1": f"{MODEL}:1", "model2": f"{MODEL}:99"})
    assert missing.status_code == 404 and missing.json() == {"detail": f"Model not found: {MODEL}:99"}
    assert reader.get("/models/compare", params={"model1": "nope:1", "model2": f"{MODEL}:1"}).status_code == 404
    unknown = reader.get("/models/compare", params={"model1": f"{MODEL}:1", "model2": f"{MODEL}:2", "metric": "nope"})
    assert unknown.status_code == 400 and "nope" in unknown.json()["detail"]
    assert reader.get("/models/compare", params={"model1": f"{MODEL}:1"}).status_code == 422


def test_evaluate_matches_scikit_learn_and_is_logged(reader, writer, scenario, mlflow_server):
    expected = scenario["versions"][1]
    for path in ("holdout.csv", "holdout.parquet", "holdout.jsonl"):
        answer = writer.post(
            "/models/evaluate",
            json={
                "model_name": MODEL,
                "model_version": "2",
                "dataset_path": path,
                "metrics": ["accuracy", "f1_score", "roc_auc", "log_loss"],
            },
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["status"] == "succeeded" and body["sample_count"] == 300
        assert body["metrics"]["accuracy"] == pytest.approx(expected["holdout_accuracy"])
        assert body["metrics"]["f1_score"] == pytest.approx(expected["holdout_f1"])
        assert body["metrics"]["log_loss"] == pytest.approx(expected["metrics"]["val_loss"])
        assert 0.5 < body["metrics"]["roc_auc"] <= 1 and body["duration_seconds"] > 0
    assert reader.get(f"/models/evaluations/{body['evaluation_id']}").json() == body
    import httpx

    run = httpx.get(f"{mlflow_server.url}/api/2.0/mlflow/runs/get", params={"run_id": body["run_id"]}).json()["run"]
    logged = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert logged["eval_accuracy"] == pytest.approx(expected["holdout_accuracy"])
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["hokusai_evaluated_model"] == MODEL and tags["hokusai_evaluated_version"] == "2"
    assert run["inputs"]["dataset_inputs"][0]["dataset"]["name"] == "holdout"
    # compare and metrics see the evaluation
    compared = reader.get("/models/compare", params={"model1": f"{MODEL}:1", "model2": f"{MODEL}:2"}).json()
    assert compared["model2"]["eval_accuracy"] == pytest.approx(expected["holdout_accuracy"])
    metrics = reader.get(f"/models/{MODEL}/2/metrics").json()
    assert metrics["validation_metrics"]["accuracy"] == pytest.approx(expected["holdout_accuracy"])
    assert metrics["evaluation_run_id"] == body["run_id"]


def test_evaluate_reads_mlflow_artifacts(writer, scenario):
    version = scenario["versions"][0]
    answer = writer.post(
        "/models/evaluate",
        json={
            "model_name": MODEL,
            "model_version": "1",
            "dataset_path": f"runs:/{version['run_id']}/data/holdout.csv",
            "metrics": ["accuracy", "precision", "recall"],
        },
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["metrics"]["accuracy"] == pytest.approx(version["holdout_accuracy"])


def test_evaluate_refuses_what_it_may_not_read(writer, reader, scenario, service, tmp_path):
    outside = tmp_path / "secret.csv"
    outside.write_text("a,label\n1,0\n")
    (service.home / "datasets" / "escape.csv").symlink_to(outside)
    base = {"model_name": MODEL, "model_version": "2", "metrics": ["accuracy"]}
    for path, status, words in (
        ("../hokusai.db", 400, "'..'"),
        ("datasets/../../x.csv", 400, "'..'"),
        (str(outside), 400, "under the datasets directory"),
        ("escape.csv", 400, "under the datasets directory"),
        ("/etc/passwd", 400, ".csv, .parquet or .jsonl"),
        ("missing.csv", 400, "Dataset not found"),
        ("s3://bucket/data.csv", 400, "MLflow artifact URI"),
        ("file:///etc/hosts.csv", 400, "MLflow artifact URI"),
        (f"runs:/{'0' * 32}/data/holdout.csv", 400, "Dataset not found"),
    ):
        refused = writer.post("/models/evaluate", json={**base, "dataset_path": path})
        assert refused.status_code == status and words in refused.json()["detail"], (path, refused.text)
    no_target = writer.post("/models/evaluate", json={**base, "dataset_path": "holdout.csv", "target_column": "y"})
    assert no_target.status_code == 400 and "'y' is not in the dataset" in no_target.json()["detail"]
    unknown = writer.post("/models/evaluate", json={**base, "dataset_path": "holdout.csv", "metrics": ["bleu"]})
    assert unknown.status_code == 422
    missing = writer.post("/models/evaluate", json={**base, "model_version": "77", "dataset_path": "holdout.csv"})
    assert missing.status_code == 404
    assert reader.post("/models/evaluate", json={**base, "dataset_path": "holdout.csv"}).status_code == 403
    assert reader.get("/models/evaluations/ev_nothing").status_code == 404


def test_large_datasets_are_evaluated_in_the_background(start_service, mlflow_server, scenario, service):
    small_limit = start_service(mlflow_url=mlflow_server.url, evaluation_sync_max_bytes="100")
    datasets = small_limit.home / "datasets"
    datasets.mkdir(exist_ok=True)
    (datasets / "holdout.csv").write_bytes((service.home / "datasets" / "holdout.csv").read_bytes())
    with small_limit.client(small_limit.admin_key) as client:
        queued = client.post(
            "/models/evaluate",
            json={"model_name": MODEL, "model_version": "2", "dataset_path": "holdout.csv", "metrics": ["accuracy"]},
        )
        assert queued.status_code == 202, queued.text
        assert queued.json()["status"] in ("queued", "running") and queued.json()["metrics"] is None
        location = queued.headers["location"]
        assert location == f"/models/evaluations/{queued.json()['evaluation_id']}"
        deadline = time.monotonic() + 120
        while (polled := client.get(location).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, polled
            time.sleep(0.2)
    assert polled["status"] == "succeeded", polled
    assert polled["metrics"]["accuracy"] == pytest.approx(scenario["versions"][1]["holdout_accuracy"])


def test_predictions_are_served_and_counted(reader, scenario):
    version = scenario["versions"][1]
    for _ in range(3):
        answer = reader.post(f"/models/{MODEL}/2/predict", json={"inputs": version["first_rows"]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == version["first_predictions"] and answer.json()["rows"] == 3
    columns = {key: [row[key] for row in version["first_rows"]] for key in version["first_rows"][0]}
    assert reader.post(f"/api/models/{MODEL}/2/predict", json={"inputs": columns}).json()["rows"] == 3
    refused = reader.post(f"/models/{MODEL}/2/predict", json={"inputs": [{"a": 1.0}]})
    assert refused.status_code == 422 and "rejected the input" in refused.json()["detail"]
    assert "missing inputs" in refused.json()["detail"]  # the model's whole message, not its first line (issue 12)
    assert reader.post(f"/models/{MODEL}/2/predict", json={"inputs": {"a": [1], "b": [1, 2]}}).status_code == 422
    assert reader.post(f"/models/{MODEL}/2/predict", json={"rows": []}).status_code == 422
    assert reader.post(f"/models/{MODEL}/9/predict", json={"inputs": version["first_rows"]}).status_code == 404

    today = datetime.now(UTC).date().isoformat()
    history = reader.get(f"/models/{MODEL}/2/predictions").json()
    assert history["total_predictions"] == 12 and history["total_requests"] == 5 and history["failed_requests"] == 1
    assert history["date_range"] == {"start": today, "end": today}
    assert history["daily_counts"] == [{"date": today, "count": 12}]
    assert reader.get(f"/models/{MODEL}/2/predictions", params={"end": "2000-01-01"}).json() == {
        "total_predictions": 0,
        "total_requests": 0,
        "failed_requests": 0,
        "date_range": None,
        "daily_counts": [],
    }
    assert (
        reader.get(f"/models/{MODEL}/2/predictions", params={"start": "2030-01-02", "end": "2030-01-01"}).status_code
        == 400
    )
    assert reader.get(f"/models/{MODEL}/2/predictions", params={"start": "yesterday"}).status_code == 422
    assert reader.get(f"/models/{MODEL}/1/predictions").json()["total_predictions"] == 0

    production = reader.get(f"/models/{MODEL}/2/metrics").json()["production_metrics"]
    assert production["request_count"] == 5 and production["prediction_count"] == 12
    assert production["error_rate"] == pytest.approx(0.2)
    assert 0 < production["latency_p50_ms"] <= production["latency_p95_ms"]
    assert production["throughput_rps"] == pytest.approx(5 / production["window_seconds"])


def test_metrics_sort_training_and_validation(reader, scenario):
    v1 = scenario["versions"][0]["metrics"]
    body = reader.get(f"/models/{MODEL}/1/metrics").json()
    assert body["training_metrics"] == pytest.approx({"accuracy": v1["train_accuracy"]})
    assert body["validation_metrics"]["error"] == pytest.approx(v1["val_error"])
    assert body["validation_metrics"]["loss"] == pytest.approx(v1["val_loss"])
    assert body["production_metrics"]["request_count"] == 0 and body["production_metrics"]["latency_ms"] is None
    assert reader.get(f"/models/{MODEL}/5/metrics").status_code == 404


def test_lineage_names_the_parent_and_the_dataset(reader, writer, scenario):
    first, second = scenario["versions"]
    answer = reader.get(f"/models/{MODEL}/2/lineage")
    assert answer.headers["ratelimit-policy"].startswith('"route";q=100;w=60')  # the reference's lineage limit
    lineage = answer.json()
    assert lineage["model"] == f"{MODEL}:2" and lineage["parents"] == [f"{MODEL}:1"]
    assert lineage["training_data"] == ["train_b"] and lineage["datasets"][0]["digest"] == second["digest"]
    assert json.loads(lineage["datasets"][0]["source"]) == {"uri": "/data/train_b.csv"}
    assert lineage["experiments"] == [scenario["experiment_id"]] and lineage["run_id"] == second["run_id"]
    assert lineage["contributors"] == [{"address": CONTRIBUTOR, "weight": 1.0}]
    root = reader.get(f"/api/models/{MODEL}/1/lineage").json()
    assert root["parents"] == [] and root["datasets"][0]["digest"] == first["digest"]
    assert reader.get(f"/models/{MODEL}/8/lineage").status_code == 404


def test_parents_named_by_tags(reader, writer, scenario):
    uri = scenario["versions"][0]["model_uri"]
    for metadata, parent in (
        ({"parent_version": "1"}, f"{MODEL}:1"),
        ({"baseline_model_id": scenario["model_id"], "baseline_version": "2"}, f"{MODEL}:2"),
        ({"baseline_model_id": f"{MODEL}:1"}, f"{MODEL}:1"),
    ):
        version = register(writer, uri, metadata).json()["version"]
        assert reader.get(f"/models/{MODEL}/{version}/lineage").json()["parents"] == [parent], metadata
    version = register(writer, uri, {"parent_version": "latest"}).json()["version"]  # names nothing: ignored
    assert reader.get(f"/models/{MODEL}/{version}/lineage").json()["parents"] == [f"{MODEL}:{int(version) - 1}"]
    # The history reads the same tags; versions with no benchmark are compared on the model's benchmark metric.
    steps = {s["version"]: s for s in reader.get(f"/models/{MODEL}/lineage").json()["lineage"]}
    assert steps[version]["parent"] == f"{MODEL}:{int(version) - 1}"


def test_improvement_history_and_contributor_impact(reader, writer, scenario):
    v1, v2 = (v["metrics"]["val_accuracy"] for v in scenario["versions"])
    history = reader.get(f"/models/{scenario['model_id']}/lineage")
    assert history.status_code == 200, history.text
    body = history.json()
    assert body["model_id"] == scenario["model_id"] and body["total_versions"] >= 2
    steps = {step["version"]: step for step in body["lineage"]}
    assert steps["1"]["improvement"] is None and steps["1"]["parent"] is None
    assert steps["2"]["improvement"] == pytest.approx(v2 - v1) and steps["2"]["parent"] == f"{MODEL}:1"
    assert steps["2"]["metrics"]["val_accuracy"] == pytest.approx(v2) and steps["2"]["contributor"] == CONTRIBUTOR
    assert datetime.fromisoformat(steps["2"]["created_at"]) >= datetime.fromisoformat(steps["1"]["created_at"])
    assert history.headers["ratelimit-policy"].startswith('"route";q=100;w=60')
    by_name = reader.get(f"/models/{MODEL}/lineage").json()
    assert by_name["lineage"] == body["lineage"] and by_name["latest_version"] == body["latest_version"]
    assert reader.get("/models/no-such-model/lineage").status_code == 404

    for asked in (CONTRIBUTOR, CONTRIBUTOR.lower(), "0x" + CONTRIBUTOR[2:].upper()):
        impact = reader.get(f"/models/contributors/{asked}/impact")
        assert impact.status_code == 200, impact.text
        assert impact.headers["ratelimit-policy"].startswith('"route";q=100;w=60')
        impact = impact.json()
        assert impact["address"] == CONTRIBUTOR
    own = [c for c in impact["contributions"] if c["model_name"] == MODEL]
    assert len(own) == 1 and own[0]["version"] == "2" and own[0]["model_id"] == scenario["model_id"]
    assert own[0]["improvement_score"] == pytest.approx(v2 - v1) and own[0]["parent"] == f"{MODEL}:1"
    assert impact["total_improvement_score"] == pytest.approx(v2 - v1) and impact["total_models_improved"] == 1
    assert impact["first_contribution"] == impact["last_contribution"] == own[0]["contributed_at"]
    assert own[0]["contributed_at"] == steps["2"]["created_at"]


def test_weighted_contributors_and_regressions(reader, writer, scenario):
    """v3: the weaker model again, on top of v2, by two contributors: a regression, scored negative, never impact."""
    v1, v2 = (v["metrics"]["val_accuracy"] for v in scenario["versions"])
    contributors = [{"address": SECOND.lower(), "weight": 0.25}, {"address": THIRD, "weight": 0.75}]
    metadata = {
        "benchmark_metric": "val_accuracy",
        "benchmark_value": v1,
        "contributors": contributors,
        "parent_version": "2",
    }
    answer = register(writer, scenario["versions"][0]["model_uri"], metadata)
    assert answer.status_code == 201, answer.text
    version = answer.json()["version"]
    second = reader.get(f"/models/contributors/{SECOND}/impact").json()
    assert second["contributions"][0]["version"] == version and second["contributions"][0]["weight"] == 0.25
    assert second["contributions"][0]["improvement_score"] == pytest.approx((v1 - v2) * 0.25)
    assert second["contributions"][0]["improvement_score"] < 0
    assert second["total_improvement_score"] == 0 and second["total_models_improved"] == 0
    third = reader.get(f"/models/contributors/{THIRD}/impact").json()
    assert third["contributions"][0]["improvement_score"] == pytest.approx((v1 - v2) * 0.75)
    stored = reader.get(f"/models/{MODEL}/{version}").json()["tags"]["contributors"]
    assert json.loads(stored)[0]["address"] == SECOND  # written in checksum form
    nobody = reader.get("/models/contributors/0x0000000000000000000000000000000000000001/impact").json()
    assert nobody["total_contributions"] == 0 and nobody["first_contribution"] is None
    paged = reader.get(f"/models/contributors/{THIRD}/impact", params={"limit": 1, "offset": 1}).json()
    assert paged["contributions"] == [] and paged["total_contributions"] == 1


def test_bad_addresses_are_refused_and_nothing_is_stored(reader, writer, scenario):
    bad_checksum = CONTRIBUTOR[:-1] + ("d" if CONTRIBUTOR[-1] == "D" else "D")
    for address, words in (
        (bad_checksum, "EIP-55 checksum"),
        ("0x123", "0x followed by 40 hexadecimal digits"),
        ("5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed00", "0x followed by 40"),
        ("0x" + "g" * 40, "0x followed by 40"),
    ):
        refused = reader.get(f"/models/contributors/{address}/impact")
        assert refused.status_code == 400 and words in refused.json()["detail"], refused.text
    before = reader.get("/models/", params={"name": MODEL}).json()["models"]
    for metadata, words in (
        ({"contributor_address": bad_checksum}, "EIP-55"),
        ({"contributors": [{"address": SECOND, "weight": 0.5}]}, "sum to 1"),
        ({"contributors": [{"address": SECOND, "weight": 0.5}, {"address": SECOND, "weight": 0.5}]}, "twice"),
        ({"contributors": "not json"}, "JSON list"),
        ({"contributors": [{"address": SECOND, "weight": "all"}]}, "weight"),
    ):
        refused = register(writer, scenario["versions"][0]["model_uri"], metadata)
        assert refused.status_code == 400 and words in refused.json()["detail"], refused.text
    assert reader.get("/models/", params={"name": MODEL}).json()["models"] == before


def test_rebuild_backfills_versions_made_in_mlflow(service, keys, reader, scenario, mlflow_server):
    """A version tagged by the stock client (not through /models/register) counts once rebuilt from MLflow."""
    address = "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb"
    script = (
        "import mlflow, sys; c = mlflow.MlflowClient(); "
        "v = c.create_model_version(sys.argv[1], sys.argv[2], tags={'contributor_address': sys.argv[3]}, "
        "model_id=sys.argv[2].removeprefix('models:/')); print(v.version)"
    )
    made = subprocess.run(
        [sys.executable, "-c", script, MODEL, scenario["versions"][1]["model_uri"], address.lower()],
        env=through_the_gateway(service, keys["write"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    assert reader.get(f"/models/contributors/{address}/impact").json()["total_contributions"] == 0
    env = service_environment(HOKUSAI_HOME=str(service.home), HOKUSAI_MLFLOW_URL=mlflow_server.url)
    rebuilt = run_cli("contributions", "rebuild", "--json", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    report = json.loads(rebuilt.stdout)
    assert report["versions_with_contributors"] >= 3 and report["contributions"] >= 4
    impact = reader.get(f"/models/contributors/{address}/impact").json()
    assert impact["total_contributions"] == 1 and impact["contributions"][0]["version"] == made.stdout.strip()
    # Rebuilding again records the same, not twice as much.
    again = run_cli("contributions", "rebuild", "--json", env=env)
    assert json.loads(again.stdout) == report
    assert reader.get(f"/models/contributors/{CONTRIBUTOR}/impact").json()["total_contributions"] == 1
