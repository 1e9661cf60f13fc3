"""The Python SDK against a live service: every method end to end, the async twins, the error hierarchy, retries,
setup() for the stock mlflow client, and `import hokusai` with the client's dependencies alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

import hokusai
from hokusai import (
    AsyncDSPyClient,
    AsyncModelRegistry,
    AuthenticationError,
    BadRequest,
    Conflict,
    DSPyClient,
    ModelRegistry,
    NotFound,
    PermissionDenied,
    RateLimited,
    UpstreamError,
    ValidationError,
)
from hokusai.sdk import config
from hokusai.sdk.dspy import dspy_prefix
from hokusai.sdk.models import ComparedVersion, Registration
from tests.support import (
    ScriptedServer,
    benchmark_metadata,
    run_analytics_scenario,
    run_cli,
    service_environment,
)

MODEL = "sdk-classifier"
CONTRIBUTOR = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"


@pytest.fixture(scope="module")
def sdk_service(start_service, mlflow_server, fake_lm):
    return start_service(
        mlflow_url=mlflow_server.url,
        dspy_lm="openai/instant",
        dspy_api_base=fake_lm.base_url,
        dspy_num_retries="0",
        rate_limit_registration="1000/minute",
    )


@pytest.fixture(scope="module")
def sdk_keys(sdk_service) -> dict[str, str]:
    made = {"admin": sdk_service.admin_key}
    with sdk_service.client(sdk_service.admin_key) as admin:
        for scope in ("read", "write"):
            made[scope] = admin.post("/api/v1/keys", json={"name": f"sdk {scope}", "scopes": [scope]}).json()["key"]
    return made


@pytest.fixture(scope="module")
def registry(sdk_service, sdk_keys):
    # The reference passes the MLflow URL; the SDK derives the API base from it.
    with ModelRegistry(f"{sdk_service.base_url}/api/mlflow", api_key=sdk_keys["write"]) as client:
        yield client


@pytest.fixture(scope="module")
def versions(sdk_service, sdk_keys, registry) -> dict:
    logged = run_analytics_scenario(sdk_service, sdk_keys["write"], MODEL)
    logged["registered"] = []
    for index, version in enumerate(logged["versions"]):
        metadata = benchmark_metadata(version, CONTRIBUTOR.lower() if index == 1 else None)
        logged["registered"].append(registry.register(version["model_uri"], "classifier", MODEL, metadata))
    return logged


def test_the_api_base_is_derived_from_the_mlflow_url():
    assert ModelRegistry("http://h:8001/api/mlflow", api_key="k").url == "http://h:8001/api"
    assert ModelRegistry("http://h:8001/mlflow/", api_key="k").url == "http://h:8001"
    assert ModelRegistry("https://registry.hokus.ai/api", api_key="k").url == "https://registry.hokus.ai/api"
    assert dspy_prefix("https://registry.hokus.ai/api") == "/v1/dspy" and dspy_prefix("http://h:8001") == "/api/v1/dspy"


def test_every_model_method_end_to_end(registry, versions, tmp_path):
    first, second = versions["registered"]
    assert isinstance(first, Registration) and (first.version, second.version) == ("1", "2")
    listed = registry.list_models(MODEL, page_size=1)  # one version a page: every page is read
    assert sorted(v.version for v in listed) == ["1", "2"] and all(v.name == MODEL for v in listed)
    detail = registry.get_model(MODEL, 2)
    assert detail.source.startswith("models:/m-") and detail.tags["contributor_address"] == CONTRIBUTOR
    updated = registry.update_model(MODEL, 1, description="first", tags={"team": "sdk"})
    assert updated.description == "first" and updated.tags["team"] == "sdk"
    promoted = registry.transition(MODEL, 2, "production")
    assert promoted.stage == "Production" and "production" in promoted.aliases
    assert any(p.name == MODEL and p.version == "2" for p in registry.production_models())

    v1, v2 = (v["metrics"] for v in versions["versions"])
    comparison = registry.compare(f"{MODEL}:1", f"{MODEL}@production")
    assert isinstance(comparison.model1, ComparedVersion) and comparison.better == "model2"
    assert comparison.delta["val_accuracy"] == pytest.approx(v2["val_accuracy"] - v1["val_accuracy"])

    evaluation = registry.evaluate(MODEL, 2, "holdout.csv", ["accuracy", "f1_score"])
    assert evaluation.status == "succeeded" and evaluation.sample_count == 300
    assert evaluation.metrics["accuracy"] == pytest.approx(versions["versions"][1]["holdout_accuracy"])
    assert registry.evaluation(evaluation.evaluation_id).run_id == evaluation.run_id

    prediction = registry.predict(MODEL, 2, versions["versions"][1]["first_rows"])
    assert prediction.predictions == versions["versions"][1]["first_predictions"] and prediction.rows == 3
    history = registry.predictions(MODEL, 2, start=datetime.now(UTC).date())
    assert history.total_predictions == 3 and history.daily_counts[0].count == 3

    metrics = registry.metrics(MODEL, 2)
    assert metrics.validation_metrics["accuracy"] == pytest.approx(evaluation.metrics["accuracy"])
    assert metrics.production_metrics.request_count == 1
    lineage = registry.lineage(MODEL, 2)
    assert lineage.parents == [f"{MODEL}:1"] and lineage.datasets[0].digest == versions["versions"][1]["digest"]
    improvements = registry.improvement_history(first.model_id)
    assert improvements.total_versions == 2 and improvements.lineage[1].improvement == pytest.approx(
        v2["val_accuracy"] - v1["val_accuracy"]
    )
    impact = registry.contributor_impact(CONTRIBUTOR.lower())
    assert impact.address == CONTRIBUTOR and impact.contributions[0].version == "2"

    batch = registry.batch(
        [
            {"action": "set_tags", "model": f"{MODEL}:1", "tags": {"checked": "yes"}},
            {"action": "set_alias", "model": f"{MODEL}:1", "alias": "baseline"},
        ]
    )
    assert batch.successful == 2 and batch.results[1].success
    path = registry.download(MODEL, 2, tmp_path, progress=True)
    assert path == tmp_path / f"{MODEL}-2.zip"
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "model")
    import mlflow.pyfunc

    loaded = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    import pandas as pd

    assert loaded.predict(pd.DataFrame(versions["versions"][1]["first_rows"])).tolist() == prediction.predictions
    seen = []
    registry.download(MODEL, 1, tmp_path / "one.zip", progress=seen.append)
    assert seen and seen[-1] == (tmp_path / "one.zip").stat().st_size
    extra = registry.register(versions["versions"][0]["model_uri"], "classifier", MODEL)
    assert registry.delete_model(MODEL, extra.version).message == f"Model {MODEL}:{extra.version} deleted successfully"
    with pytest.raises(NotFound):
        registry.get_model(MODEL, extra.version)


def test_the_async_twins(sdk_service, sdk_keys, versions, fake_lm, tmp_path):
    import asyncio

    async def scenario() -> None:
        async with AsyncModelRegistry(sdk_service.base_url, api_key=sdk_keys["write"]) as registry:
            listed, detail = await asyncio.gather(
                registry.list_models(MODEL, page_size=1), registry.get_model(MODEL, 1)
            )
            assert len(listed) == 2 and detail.version == "1"
            assert (await registry.compare(f"{MODEL}:1", f"{MODEL}:2")).better == "model2"
            path = await registry.download(MODEL, 1, tmp_path)
            assert zipfile.is_zipfile(path)
            with pytest.raises(NotFound):
                await registry.get_model(MODEL, 99)
        async with AsyncDSPyClient(sdk_service.base_url, api_key=sdk_keys["write"]) as dspy:
            await dspy.register_program("async-qa", "QA", "question -> answer")
            result = await dspy.execute("async-qa", {"question": "why"})
            assert result.outputs == {"answer": "answer for why"}

    asyncio.run(scenario())


def test_dspy_client(sdk_service, sdk_keys):
    with DSPyClient(sdk_service.base_url, api_key=sdk_keys["write"]) as client:
        program = client.register_program(
            "sdk-email", "Email", "recipient, subject -> generated_email", module="ChainOfThought"
        )
        assert program.signatures[0].input_fields == ["recipient", "subject"]
        assert any(p.program_id == "sdk-email" for p in client.programs())
        assert client.program("sdk-email").version == "1.0.0"
        with pytest.raises(Conflict):
            client.register_program("sdk-email", "Email", "recipient, subject -> generated_email")
        result = client.execute("sdk-email", {"recipient": "ann", "subject": "hi"})
        assert result.success and result.outputs["generated_email"] == "generated_email for ann"
        record = client.execution(result.execution_id)
        assert record.success and record.program_id == "sdk-email"
        batch = client.execute_batch("sdk-email", [{"recipient": "a", "subject": "b"}, {"recipient": "x"}])
        assert (batch.total, batch.successful, batch.failed) == (2, 1, 1)
        stats = client.stats()
        assert stats.statistics.per_program["sdk-email"].total_executions == 3
        assert client.health().status == "healthy"
        updated = client.update_program("sdk-email", "1.0.0", "Email", "recipient -> generated_email")
        assert updated.signatures[0].input_fields == ["recipient"]
        with pytest.raises(ValidationError):
            client.execute("sdk-email", {"nobody": "x"})
        assert client.delete_program("sdk-email").message.startswith("Deleted")
    with DSPyClient(sdk_service.base_url, api_key=sdk_keys["admin"]) as admin:
        assert admin.clear_cache().message.startswith("Cache cleared")


def test_error_hierarchy(sdk_service, sdk_keys, service, versions):
    anonymous = ModelRegistry(sdk_service.base_url, api_key="hk_live_" + "A" * 38)
    with anonymous, pytest.raises(AuthenticationError) as refused:
        anonymous.get_model(MODEL, 1)
    assert refused.value.status_code == 401 and refused.value.detail == "Invalid or expired API key"
    assert refused.value.request_id
    with ModelRegistry(sdk_service.base_url, api_key=sdk_keys["read"]) as reader:
        with pytest.raises(PermissionDenied) as denied:
            reader.update_model(MODEL, 1, description="x")
        assert "lacks the 'write' scope" in denied.value.detail
        with pytest.raises(NotFound) as missing:
            reader.get_model(MODEL, 42)
        assert missing.value.detail == f"Model not found: {MODEL}:42"
        with pytest.raises(BadRequest):
            reader.compare("no-version", f"{MODEL}:1")
    with ModelRegistry(sdk_service.base_url, api_key=sdk_keys["write"]) as writer:
        with pytest.raises(ValidationError) as invalid:
            writer.batch([{"action": "explode", "model": f"{MODEL}:1"}])
        assert invalid.value.errors and invalid.value.errors[0]["loc"][:2] == ["body", "operations"]
    with sdk_service.client(sdk_service.admin_key) as admin:
        limited = admin.post("/api/v1/keys", json={"name": "sdk limited", "rate_limit_per_hour": 2}).json()["key"]
    with ModelRegistry(sdk_service.base_url, api_key=limited, max_retries=0) as client:
        client.get_model(MODEL, 1)
        client.get_model(MODEL, 1)
        with pytest.raises(RateLimited) as limited_error:
            client.get_model(MODEL, 1)
    assert limited_error.value.retry_after and limited_error.value.retry_after >= 1
    with DSPyClient(service.base_url, api_key=service.admin_key) as no_lm:
        no_lm.register_program("sdk-no-lm", "x", "a -> b")
        with pytest.raises(UpstreamError) as unavailable:
            no_lm.execute("sdk-no-lm", {"a": "1"})
    assert unavailable.value.status_code == 503
    assert unavailable.value.detail.startswith("No language model configured for DSPy execution: set HOKUSAI_DSPY_LM")


def test_retries_honour_retry_after_and_keep_the_idempotency_key():
    detail = {"name": "m", "version": "1"}
    server = ScriptedServer(
        [
            (429, {"Retry-After": "1"}, {"detail": "Rate limit exceeded"}),
            (200, {}, detail),
            (502, {}, {"detail": "MLflow down"}),
            (201, {}, {"model_id": "mdl_1", "model_name": "m", "version": "1", "registration_timestamp": "t"}),
            (503, {}, {"detail": "busy"}),
        ]
    )
    try:
        with ModelRegistry(server.url, api_key="hk_test_x", max_retries=2) as client:
            assert client.get_model("m", 1).version == "1"
            first, second = server.requests[0][3], server.requests[1][3]
            assert second - first >= 0.9  # waited as Retry-After said
            registered = client.register("models:/m-" + "0" * 32, "c", "m")
            assert registered.model_id == "mdl_1"
            keys = [headers.get("Idempotency-Key") for _, _, headers, _ in server.requests[2:4]]
            assert keys[0] and keys[0] == keys[1]  # the retry is the same registration, not a second one
            with pytest.raises(UpstreamError):
                client.batch([{"action": "delete_version", "model": "m:1"}])  # not idempotent: no retry on 503
            assert len(server.requests) == 5
    finally:
        server.stop()


def test_setup_points_the_stock_mlflow_client_at_the_gateway(sdk_service, sdk_keys, mlflow_server):
    script = (
        "import hokusai, mlflow, sys\n"
        "hokusai.setup(api_key=sys.argv[1], url=sys.argv[2] + '/api/mlflow')\n"
        "mlflow.set_experiment('sdk-setup')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_metric('accuracy', 0.95)\n"
        "print(run.info.run_id)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HOKUSAI_"))}
    done = subprocess.run(
        [sys.executable, "-c", script, sdk_keys["write"], sdk_service.base_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run = httpx.get(
        f"{mlflow_server.url}/api/2.0/mlflow/runs/get", params={"run_id": done.stdout.strip().splitlines()[-1]}
    ).json()["run"]
    assert run["data"]["metrics"][0]["value"] == 0.95


def test_setup_and_saved_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOKUSAI_CONFIG", str(tmp_path / "config"))
    monkeypatch.delenv("HOKUSAI_API_KEY", raising=False)
    monkeypatch.delenv("HOKUSAI_URL", raising=False)
    path = config.write_config("http://saved:1/api", "hk_test_saved")
    assert path.stat().st_mode & 0o777 == 0o600
    assert ModelRegistry().url == "http://saved:1/api"
    monkeypatch.setenv("HOKUSAI_URL", "http://env:2")
    assert ModelRegistry().url == "http://env:2"
    monkeypatch.setattr(config, "_configured", config._Configured())
    resolved = hokusai.setup(api_key="hk_test_set", url="http://set:3/mlflow", configure_mlflow=True)
    assert resolved.url == "http://set:3" and os.environ["MLFLOW_TRACKING_URI"] == "http://set:3/mlflow"
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "hk_test_set"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")


def test_client_cli(sdk_service, sdk_keys, versions, tmp_path):
    env = service_environment(HOKUSAI_CONFIG=str(tmp_path / "config"))
    login = run_cli("login", "--url", sdk_service.base_url, "--api-key", sdk_keys["write"], env=env)
    assert login.returncode == 0, login.stderr
    assert (tmp_path / "config").stat().st_mode & 0o777 == 0o600
    listed = run_cli("models", "list", "--name", MODEL, "--json", env=env)
    assert listed.returncode == 0 and {v["version"] for v in json.loads(listed.stdout)} >= {"1", "2"}
    table = run_cli("models", "list", "--name", MODEL, env=env)
    assert MODEL in table.stdout and "Model versions" in table.stdout
    shown = run_cli("models", "show", f"{MODEL}:2", "--json", env=env)
    assert json.loads(shown.stdout)["version"] == "2"
    compared = run_cli("models", "compare", f"{MODEL}:1", f"{MODEL}:2", env=env)
    assert compared.returncode == 0 and "Use version 2" in compared.stdout
    promoted = run_cli("models", "promote", f"{MODEL}:1", "--stage", "staging", env=env)
    assert promoted.returncode == 0 and "Staging" in promoted.stdout
    # Issue 12: promote archives what was in the stage unless told to keep it (version 2 is in Production here).
    assert run_cli("models", "promote", f"{MODEL}:1", env=env).returncode == 0
    assert json.loads(run_cli("models", "show", f"{MODEL}:2", "--json", env=env).stdout)["stage"] == "Archived"
    assert run_cli("models", "promote", f"{MODEL}:2", "--keep-existing", env=env).returncode == 0
    both = {
        v["version"]: v["stage"]
        for v in json.loads(run_cli("models", "list", "--name", MODEL, "--json", env=env).stdout)
    }
    assert both["1"] == both["2"] == "Production"
    # Issue 12: login with only --api-key takes the URL from HOKUSAI_URL (or the default) without prompting.
    quiet_login = run_cli("login", "--api-key", sdk_keys["read"], env={**env, "HOKUSAI_URL": sdk_service.base_url})
    assert quiet_login.returncode == 0 and "URL" not in quiet_login.stdout, quiet_login.stdout + quiet_login.stderr
    login = run_cli("login", "--url", sdk_service.base_url, "--api-key", sdk_keys["write"], env=env)
    downloaded = run_cli("models", "download", f"{MODEL}:1", "--dest", str(tmp_path), "--quiet", env=env)
    assert downloaded.returncode == 0 and zipfile.is_zipfile(downloaded.stdout.strip())
    assert run_cli("models", "show", f"{MODEL}:77", env=env).returncode == 4
    assert run_cli("models", "show", f"{MODEL}:1", "--api-key", "hk_live_" + "B" * 38, env=env).returncode == 3
    assert run_cli("models", "compare", "bad", f"{MODEL}:1", env=env).returncode == 5
    assert run_cli("models", "list", "--url", "http://127.0.0.1:9", env=env).returncode == 8
    assert run_cli("models", "show", "no-colon", env=env).returncode == 2
    health = run_cli("health", "--json", env=env)
    assert health.returncode == 0 and json.loads(health.stdout)["status"] in ("healthy", "degraded")
    programs = run_cli("dspy", "programs", "--json", env=env)
    assert programs.returncode == 0
    with DSPyClient(sdk_service.base_url, api_key=sdk_keys["write"]) as client:
        client.register_program("cli-qa", "QA", "question, n: int -> answer")
    ran = run_cli("dspy", "run", "cli-qa", "-i", "question=why", "-i", "n=3", env=env)
    assert ran.returncode == 0 and "answer: answer for why" in ran.stdout
    assert run_cli("dspy", "run", "cli-qa", "-i", "question=why", env=env).returncode == 5
    dry = run_cli("dspy", "run", "cli-qa", "-i", "question=why", "-i", "n=3", "--mode", "dry_run", env=env)
    assert dry.returncode == 0 and "--- system ---" in dry.stdout and "why" in dry.stdout, dry.stdout


@pytest.mark.slow
def test_import_hokusai_with_the_client_dependencies_alone(tmp_path, sdk_service, sdk_keys, versions):
    """A fresh venv with `pip install .` (no extras): the SDK imports and works, and nothing server-side is there."""
    root = Path(__file__).resolve().parent.parent
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(root)], capture_output=True, text=True, timeout=900
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    script = (
        "import sys, hokusai\n"
        "from hokusai import setup, ModelRegistry\n"
        "setup(api_key=sys.argv[2], url=sys.argv[1], configure_mlflow=False)\n"
        "names = {v.name for v in ModelRegistry().list_models()}\n"
        "heavy = [m for m in ('mlflow', 'fastapi', 'sqlalchemy', 'dspy', 'pandas') if m in sys.modules]\n"
        "print(sorted(names), heavy)\n"
        "for missing in ('mlflow', 'fastapi', 'sqlalchemy', 'dspy'):\n"
        "    try:\n"
        "        __import__(missing)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    raise SystemExit(missing + ' is installed in the client venv')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOKUSAI_", "MLFLOW_"))}
    ran = subprocess.run(
        [str(python), "-c", script, sdk_service.base_url, sdk_keys["read"]],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert MODEL in ran.stdout and ran.stdout.strip().endswith("[]")
    cli = subprocess.run([str(venv / "bin" / "hokusai"), "--help"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "models" in cli.stdout
    for command in (["keys", "list"], ["db", "upgrade"], ["serve"], ["contributions", "rebuild"]):
        server_side = subprocess.run(
            [str(venv / "bin" / "hokusai"), *command], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
        )
        assert server_side.returncode == 2, (command, server_side.stderr)
        assert "pip install 'hokusai[server]'" in server_side.stderr and "Traceback" not in server_side.stderr
