"""/models/* over HTTP against the real MLflow: list, get, update, delete, stage transitions, production."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import httpx
import pytest

from tests.support import through_the_gateway

MODEL = "registry-test-model"
# Two versions of a real scikit-learn model, registered by the stock mlflow client.
REGISTER_TWO_VERSIONS = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import mlflow, numpy as np
from sklearn.linear_model import LogisticRegression
name = sys.argv[1]
mlflow.set_experiment(name)
x, y = np.array([[0.0], [1.0], [0.1], [0.9]]), np.array([0, 1, 0, 1])
for c in (1.0, 0.5):
    with mlflow.start_run():
        mlflow.sklearn.log_model(LogisticRegression(C=c).fit(x, y), name="model", registered_model_name=name)
print(json.dumps({"ok": True}))
"""


@pytest.fixture(scope="module")
def model(service, keys) -> str:
    env = through_the_gateway(service, keys["write"])
    result = subprocess.run(
        [sys.executable, "-c", REGISTER_TWO_VERSIONS, MODEL], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return MODEL


def test_list_versions_with_filter_and_pages(reader, model):
    listed = reader.get("/models/", params={"name": model})
    assert listed.status_code == 200
    body = listed.json()
    # by name, then newest version first (MLflow's own tie-break after the name order the service asks for)
    assert [(m["name"], m["version"]) for m in body["models"]] == [(model, "2"), (model, "1")]
    first = next(m for m in body["models"] if m["version"] == "1")
    assert first["status"] == "READY" and first["stage"] == "None"
    assert "aliases" not in first  # only when asked for: the reference's entry has none, and they cost an MLflow call
    assert abs(first["created_at"] / 1000 - datetime.now(UTC).timestamp()) < 3600
    page = reader.get("/api/models/", params={"name": model, "max_results": 1}).json()
    assert len(page["models"]) == 1 and page["next_page_token"]
    rest = reader.get("/models/", params={"name": model, "max_results": 1, "page_token": page["next_page_token"]})
    assert len(rest.json()["models"]) == 1 and rest.json()["models"][0]["version"] != page["models"][0]["version"]


def test_get_version_details_and_missing_ones(reader, model):
    detail = reader.get(f"/models/{model}/1").json()
    assert detail["name"] == model and detail["version"] == "1" and detail["stage"] == "None"
    assert detail["source"].startswith("models:/m-") and detail["run_id"]
    assert detail["updated_at"] >= detail["created_at"]
    assert reader.get(f"/api/models/{model}/1").json() == detail
    metrics = httpx.get(f"{reader.base_url}/metrics").text  # labelled by template, never by the model's name
    assert 'route="/api/models/{model_name}/{version}"' in metrics and model not in metrics
    for path, shown in (
        (f"/models/{model}/99", f"{model}:99"),
        (f"/models/{model}/abc", f"{model}:abc"),
        (f"/models/{model}/0", f"{model}:0"),
        (f"/models/{model}/{'9' * 30}", f"{model}:{'9' * 30}"),
        ("/models/no-such-model/1", "no-such-model:1"),
        (f"/models/{model}/²", f"{model}:²"),  # a digit to str.isdigit(), not to int(): was a 500
        (f"/models/{model}/٢", f"{model}:٢"),  # an Arabic-Indic 2: not read as version 2
    ):
        missing = reader.get(path)
        assert missing.status_code == 404 and missing.json() == {"detail": f"Model not found: {shown}"}


def test_update_merges_tags_and_sets_the_description(writer, reader, model):
    first = writer.patch(f"/models/{model}/1", json={"description": "first cut", "tags": {"team": "a", "tmp": "x"}})
    assert first.status_code == 200
    assert first.json()["description"] == "first cut" and first.json()["tags"] == {"team": "a", "tmp": "x"}
    second = writer.patch(f"/models/{model}/1", json={"tags": {"tmp": None, "owner": "b"}})
    assert second.json()["tags"] == {"team": "a", "owner": "b"} and second.json()["description"] == "first cut"
    assert reader.get(f"/models/{model}/1").json()["tags"] == {"team": "a", "owner": "b"}
    assert writer.patch(f"/models/{model}/42", json={"description": "x"}).status_code == 404
    assert writer.patch(f"/models/{model}/1", json={"tags": {"": "x"}}).status_code == 422


def test_transitions_keep_the_stage_alias_in_step(writer, reader, service, model, mlflow_server):
    to_staging = writer.post(f"/models/{model}/1/transition", json={"stage": "staging"})
    assert to_staging.status_code == 200
    assert to_staging.json()["stage"] == "Staging" and to_staging.json()["aliases"] == ["staging"]
    promoted = writer.post(f"/models/{model}/1/transition", json={"stage": "PRODUCTION"}).json()
    assert promoted["stage"] == "Production" and promoted["aliases"] == ["production"]
    # the alias resolves for modern clients: models:/name@production
    by_alias = httpx.get(
        f"{mlflow_server.url}/api/2.0/mlflow/registered-models/alias", params={"name": model, "alias": "production"}
    ).json()
    assert by_alias["model_version"]["version"] == "1"

    production = reader.get("/models/production").json()["models"]
    mine = [m for m in production if m["name"] == model]
    assert [(m["version"], m["stage"]) for m in mine] == [("1", "Production")]
    deployed = datetime.strptime(mine[0]["deployed_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - deployed).total_seconds()) < 120

    replaced = writer.post(f"/api/models/{model}/2/transition", json={"stage": "Production", "archive_existing": True})
    assert replaced.json()["stage"] == "Production" and replaced.json()["aliases"] == ["production"]
    old = reader.get(f"/models/{model}/1").json()
    assert old["stage"] == "Archived" and "production" not in old["aliases"]
    assert [m["version"] for m in reader.get("/models/production").json()["models"] if m["name"] == model] == ["2"]

    unknown = writer.post(f"/models/{model}/2/transition", json={"stage": "Live"})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "stage"]


def test_read_only_keys_cannot_change_anything(reader, model):
    assert reader.patch(f"/models/{model}/1", json={"description": "x"}).status_code == 403
    assert reader.post(f"/models/{model}/1/transition", json={"stage": "None"}).status_code == 403
    assert reader.delete(f"/models/{model}/1").status_code == 403


def test_quotes_in_names_cannot_change_the_query(reader, model):
    injected = reader.get("/models/", params={"name": f"{model}' OR name LIKE '%"})
    assert injected.status_code == 200 and injected.json()["models"] == []
    double = reader.get("/models/", params={"name": f'{model}" OR name LIKE "%'})
    assert double.status_code == 200 and double.json()["models"] == []
    both = reader.get("/models/", params={"name": "a'b\"c"})
    assert both.status_code == 400 and "cannot be searched" in both.json()["detail"]


def test_download_is_a_zip_that_loads_and_predicts(reader, model, tmp_path):
    import zipfile

    import mlflow.pyfunc
    import numpy as np

    with reader.stream("GET", f"/models/{model}/1/download") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/zip"
        assert response.headers["content-disposition"] == f'attachment; filename="{model}-1.zip"'
        archive_path = tmp_path / "model.zip"
        with open(archive_path, "wb") as out:
            for chunk in response.iter_bytes():
                out.write(chunk)
    with zipfile.ZipFile(archive_path) as archive:
        assert "MLmodel" in archive.namelist()
        assert archive.testzip() is None
        archive.extractall(tmp_path / "model")
    loaded = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    assert loaded.predict(np.array([[0.0], [1.0]])).tolist() == [0, 1]
    assert reader.get(f"/models/{model}/77/download").status_code == 404


def test_delete_a_version(writer, reader, model):
    deleted = writer.delete(f"/models/{model}/2")
    assert deleted.status_code == 200 and deleted.json() == {"message": f"Model {model}:2 deleted successfully"}
    assert reader.get(f"/models/{model}/2").status_code == 404
    assert writer.delete(f"/models/{model}/2").status_code == 404
    assert json.dumps(reader.get("/models/", params={"name": model}).json()).count('"version"') == 1


def test_batch_reports_each_operation_in_order(writer, reader, model):
    body = {
        "operations": [
            {"action": "set_tags", "model": f"{model}:1", "tags": {"batch": "yes", "drop": "me"}},
            {"action": "delete_tags", "model": f"{model}:1", "keys": ["drop"]},
            {"action": "set_alias", "model": f"{model}:1", "alias": "candidate"},
            {"action": "update_description", "model": f"{model}:404", "description": "nope"},
            {"action": "transition_stage", "model": f"{model}:1", "stage": "staging"},
            {"action": "delete_alias", "model": f"{model}:1", "alias": "candidate"},
        ]
    }
    response = writer.post("/models/batch", json=body)
    assert response.status_code == 200
    result = response.json()
    assert (result["total"], result["successful"], result["failed"], result["skipped"]) == (6, 5, 1, 0)
    assert [r["success"] for r in result["results"]] == [True, True, True, False, True, True]
    assert result["results"][3]["error"] == f"Model not found: {model}:404"
    assert result["results"][2]["result"]["aliases"] == ["candidate"]
    after = reader.get(f"/models/{model}/1").json()
    assert after["tags"].get("batch") == "yes" and "drop" not in after["tags"]
    assert after["stage"] == "Staging" and after["aliases"] == ["staging"]

    stopped = writer.post(
        "/api/models/batch",
        json={
            "stop_on_error": True,
            "operations": [
                {"action": "update_description", "model": f"{model}:404", "description": "x"},
                {"action": "update_description", "model": f"{model}:1", "description": "never applied"},
            ],
        },
    ).json()
    assert (stopped["failed"], stopped["skipped"]) == (1, 1)
    assert reader.get(f"/models/{model}/1").json()["description"] != "never applied"


@pytest.mark.parametrize(
    ("operations", "bad_index"),
    [
        ([{"action": "set_tags", "model": "m:1", "tags": {"a": "b"}}, {"action": "explode", "model": "m:1"}], 1),
        ([{"action": "set_alias", "model": "no-version", "alias": "x"}], 0),
        ([{"action": "transition_stage", "model": "m:1", "stage": "Live"}], 0),
        ([{"action": "set_tags", "model": "m:0", "tags": {"a": "b"}}], 0),
    ],
)
def test_batch_is_validated_whole_before_anything_runs(writer, operations, bad_index):
    response = writer.post("/models/batch", json={"operations": operations})
    assert response.status_code == 422
    assert any(error["loc"][:3] == ["body", "operations", bad_index] for error in response.json()["detail"])


def test_batch_limits_and_scope(writer, reader, model):
    too_many = [{"action": "set_tags", "model": f"{model}:1", "tags": {"n": str(i)}} for i in range(101)]
    assert writer.post("/models/batch", json={"operations": too_many}).status_code == 422
    assert writer.post("/models/batch", json={"operations": []}).status_code == 422
    assert reader.post("/models/batch", json={"operations": too_many[:1]}).status_code == 403


REGISTER = "/models/register"


@pytest.fixture(scope="module")
def logged_model(service, keys) -> dict[str, str]:
    """A run with a logged model (MLflow 3: models:/m-...) and a plain artifact that is not a model."""
    script = """
import json, sys, tempfile, warnings
warnings.filterwarnings("ignore")
import mlflow, numpy as np
from sklearn.linear_model import LogisticRegression
mlflow.set_experiment("registration-sources")
with mlflow.start_run() as run:
    info = mlflow.sklearn.log_model(LogisticRegression().fit(np.array([[0.0], [1.0]]), [0, 1]), name="churn-model")
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as notes:
        notes.write("not a model")
        notes.flush()
        mlflow.log_artifact(notes.name, artifact_path="docs")
print(json.dumps({"run_id": run.info.run_id, "model_id": info.model_id,
                  "artifact_uri": run.info.artifact_uri}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=through_the_gateway(service, keys["write"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_register_from_each_kind_of_source(writer, reader, logged_model):
    model_id_uri = f"models:/{logged_model['model_id']}"
    first = writer.post(
        REGISTER,
        json={
            "model_data": model_id_uri,
            "model_type": "classification",
            "model_name": "registered-churn",
            "metadata": {
                "hokusai_token_id": "churn",
                "benchmark_metric": "accuracy",
                "benchmark_value": 0.91,
                "contributor_address": "0x" + "ab" * 20,
            },
        },
    )
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["model_name"] == "registered-churn" and body["version"] == "1"
    assert body["model_id"].startswith("mdl_")
    assert datetime.strptime(body["registration_timestamp"], "%Y-%m-%dT%H:%M:%SZ")
    tags = reader.get("/models/registered-churn/1").json()["tags"]
    assert tags["hokusai_token_id"] == "churn" and tags["benchmark_value"] == "0.91"
    assert tags["contributor_address"] == "0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB"  # kept in EIP-55 form
    assert tags["model_type"] == "classification"

    sources = [f"runs:/{logged_model['run_id']}/churn-model", "models:/registered-churn/1"]
    for expected_version, source in enumerate(sources, start=2):
        again = writer.post(
            REGISTER, json={"model_data": source, "model_type": "classification", "model_name": "registered-churn"}
        )
        assert again.status_code == 201, again.text
        assert again.json()["version"] == str(expected_version)
        assert again.json()["model_id"] == body["model_id"]  # stable across versions

    unnamed = writer.post(REGISTER, json={"model_data": model_id_uri, "model_type": "classification"})
    assert unnamed.status_code == 201 and unnamed.json()["model_name"] == "churn-model"  # the logged model's name


@pytest.mark.parametrize(
    ("model_data", "reason"),
    [
        ("models:/m-00000000000000000000000000000000", "logged model m-00000000000000000000000000000000"),
        ("runs:/00000000000000000000000000000000/model", "run 00000000000000000000000000000000"),
        ("models:/no-such-registered-model/3", "model version no-such-registered-model:3"),
        ("s3://bucket/model", "must be a model URI"),
    ],
)
def test_sources_that_do_not_exist_are_400_with_the_reason(writer, model_data, reason):
    response = writer.post(REGISTER, json={"model_data": model_data, "model_type": "c", "model_name": "nowhere"})
    assert response.status_code == 400 and reason in response.json()["detail"]


def test_plain_artifacts_need_an_mlmodel_and_a_name(writer, logged_model):
    docs = writer.post(
        REGISTER,
        json={"model_data": f"runs:/{logged_model['run_id']}/docs", "model_type": "c", "model_name": "docs-model"},
    )
    assert docs.status_code == 400 and "no MLmodel" in docs.json()["detail"]
    served = writer.post(
        REGISTER,
        json={"model_data": f"{logged_model['artifact_uri']}/docs", "model_type": "c", "model_name": "docs-model"},
    )
    assert served.status_code == 400


@pytest.mark.parametrize(
    "name", ["production", "Register", "compare", "batch", "evaluate", "evaluations", "contributors", "a/b"]
)
def test_reserved_or_unaddressable_names_are_refused(writer, logged_model, name):
    response = writer.post(
        REGISTER, json={"model_data": f"models:/{logged_model['model_id']}", "model_type": "c", "model_name": name}
    )
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "model_name"]


def test_register_is_idempotent_with_an_idempotency_key(writer, reader, logged_model):
    request = {"model_data": f"models:/{logged_model['model_id']}", "model_type": "c", "model_name": "idem-model"}
    first = writer.post(REGISTER, json=request, headers={"Idempotency-Key": "retry-1"})
    again = writer.post("/api/models/register", json=request, headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    assert len(reader.get("/models/", params={"name": "idem-model"}).json()["models"]) == 1
    other = writer.post(REGISTER, json={**request, "model_type": "other"}, headers={"Idempotency-Key": "retry-1"})
    assert other.status_code == 409
    fresh = writer.post(REGISTER, json=request, headers={"Idempotency-Key": "retry-2"})
    assert fresh.json()["version"] == "2"
    failed = writer.post(
        REGISTER, json={**request, "model_data": "models:/m-" + "0" * 32}, headers={"Idempotency-Key": "retry-3"}
    )
    assert failed.status_code == 400
    after_fix = writer.post(REGISTER, json=request, headers={"Idempotency-Key": "retry-3"})
    assert after_fix.status_code == 201  # a failed attempt does not hold the key
    assert reader.post(REGISTER, json=request).status_code == 403


@pytest.mark.slow
def test_download_of_a_500_mb_model_keeps_memory_flat(service_process, mlflow_server, tmp_path):
    """A pyfunc model carrying a 500 MB artifact, registered, then downloaded as a zip through the service."""
    import threading
    import zipfile

    import psutil

    script = """
import os, sys, tempfile, warnings
warnings.filterwarnings("ignore")
import mlflow
class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input
with tempfile.TemporaryDirectory() as scratch:
    blob = os.path.join(scratch, "weights.bin")
    with open(blob, "wb") as out:
        for _ in range(500):
            out.write(os.urandom(1024 * 1024))
    mlflow.set_experiment("big-model")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="big", python_model=Echo(), artifacts={"weights": blob})
print(info.model_id)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HOKUSAI_"))}
    env["MLFLOW_TRACKING_URI"] = mlflow_server.url
    logged = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert logged.returncode == 0, logged.stderr[-3000:]
    model_id = logged.stdout.strip().splitlines()[-1]
    service = service_process  # a process of its own: its RSS is what is measured
    writer = service.client(_admin_write_key(service))
    registered = writer.post(
        "/models/register", json={"model_data": f"models:/{model_id}", "model_type": "blob", "model_name": "big-model"}
    )
    assert registered.status_code == 201, registered.text

    process = psutil.Process(service.process.pid)
    baseline = process.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    archive_path = tmp_path / "big.zip"
    try:
        with writer.stream("GET", "/models/big-model/1/download", timeout=600) as response:
            assert response.status_code == 200
            with open(archive_path, "wb") as out:
                for chunk in response.iter_bytes(1024 * 1024):
                    out.write(chunk)
    finally:
        done.set()
        sampler.join()
        writer.close()
    with zipfile.ZipFile(archive_path) as archive:
        sizes = {info.filename: info.file_size for info in archive.infolist()}
        assert archive.testzip() is None
    assert sizes["artifacts/weights.bin"] == 500 * 1024 * 1024 and "MLmodel" in sizes
    growth_mb = (peak[0] - baseline) / 2**20
    print(f"service RSS growth while streaming a 500 MB model zip: {growth_mb:.1f} MB")
    assert growth_mb < 50


def _admin_write_key(service) -> str:
    with service.client(service.admin_key) as admin:
        return admin.post("/api/v1/keys", json={"name": "cache", "scopes": ["write"]}).json()["key"]


def test_reads_are_cached_and_every_write_through_the_service_drops_them(start_service, mlflow_server, model):
    service = start_service(mlflow_url=mlflow_server.url, registry_cache_ttl="60")
    key = _admin_write_key(service)
    direct = f"{mlflow_server.url}/api/2.0/mlflow/model-versions/update"
    with service.client(key) as client:
        before = client.get(f"/models/{model}/1").json()["description"]
        listed_before = client.get("/models/", params={"name": model}).json()
        # A write straight to MLflow is not seen while the cached answer lives (here 60 s) ...
        httpx.patch(direct, json={"name": model, "version": "1", "description": "written behind our back"})
        assert client.get(f"/models/{model}/1").json()["description"] == before
        assert client.get("/models/", params={"name": model}).json() == listed_before
        # ... a write through the gateway is seen at once,
        through_gateway = client.patch(
            "/mlflow/api/2.0/mlflow/model-versions/update",
            json={"name": model, "version": "1", "description": "via the gateway"},
        )
        assert through_gateway.status_code == 200
        assert client.get(f"/models/{model}/1").json()["description"] == "via the gateway"
        # ... and so is one through /models.
        client.patch(f"/models/{model}/1", json={"tags": {"cache": "dropped"}})
        assert client.get("/models/", params={"name": model}).json() != listed_before
        assert client.get(f"/api/models/{model}/1").json()["tags"]["cache"] == "dropped"


@pytest.mark.redis
def test_the_cache_and_its_invalidation_are_shared_through_redis(
    start_service, mlflow_server, redis_url, model, tmp_path
):
    shared = {
        "mlflow_url": mlflow_server.url,
        "redis_url": redis_url,
        "registry_cache_ttl": "60",
        "database_url": f"sqlite:///{tmp_path / 'shared.db'}",
    }
    first = start_service(**shared, process=True)
    second = start_service(**shared, process=True, bootstrap=False)
    key = _admin_write_key(first)
    with first.client(key) as reader_a, second.client(key) as writer_b:
        reader_a.get(f"/models/{model}/1")
        writer_b.patch(f"/models/{model}/1", json={"description": "written by the other process"})
        assert reader_a.get(f"/models/{model}/1").json()["description"] == "written by the other process"
