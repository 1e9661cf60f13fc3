"""Model code runs in supervised worker processes, never in the API process (issue 11, section 1).

The models are MLflow "models from code": their Python file is written here, logged through the gateway with the
stock mlflow client, and registered; the code exists nowhere the service could import it from, so it runs only
where the model is loaded. Each model reports what it saw (pid, parent, uid, environment, what it could read in the
service's HOME) into a marker directory any user can write.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from hokusai.server.models.protocol import ProtocolError, encode, read_message_blocking
from tests.support import ServiceProcess, through_the_gateway

pytestmark = pytest.mark.slow

AS_ROOT = os.geteuid() == 0

MODEL_CODE = {
    # Reports who loaded it, and whether the service's own files were within reach.
    "marker": """
        def load_context(self, context):
            report = {"pid": os.getpid(), "ppid": os.getppid(), "uid": os.getuid(), "environ": dict(os.environ)}
            for name in ("hokusai.db", "admin-key"):
                try:
                    with open(os.path.join(HOME, name), "rb") as secret:
                        report[name] = "read %d bytes" % len(secret.read())
                except OSError as exc:
                    report[name] = type(exc).__name__
            try:
                with open(os.path.join(HOME, "model-cache", "written-by-%d" % os.getpid()), "w") as planted:
                    planted.write("x")
                report["cache_writable"] = True
            except OSError:
                report["cache_writable"] = False
            for name, url in (("api", API + "/live"), ("mlflow", MLFLOW + "/health")):
                try:
                    urllib.request.urlopen(url, timeout=5).read()
                    report[name] = "reached"
                except OSError as exc:
                    report[name] = type(exc).__name__
            write_marker("marker", report)

        def predict(self, context, model_input, params=None):
            return [float(sum(row)) for row in model_input.itertuples(index=False)]
    """,
    "sleeper": """
        def load_context(self, context):
            write_marker("sleeper", {"pid": os.getpid()})

        def predict(self, context, model_input, params=None):
            while True:
                time.sleep(3600)
    """,
    "hog": """
        def predict(self, context, model_input, params=None):
            import numpy as np

            return np.ones(10 * 2**30 // 8)  # 10 GB, touched
    """,
    "crasher": """
        def predict(self, context, model_input, params=None):
            os.kill(os.getpid(), signal.SIGSEGV)
    """,
}

MODULE = """
import json
import os
import signal
import time
import urllib.request

import mlflow.pyfunc
from mlflow.models import set_model

MARKERS = {markers!r}
HOME = {home!r}
API = {api!r}
MLFLOW = {mlflow!r}


def write_marker(name, report):
    with open(os.path.join(MARKERS, name + ".json"), "w") as out:
        json.dump(report, out)


class Model(mlflow.pyfunc.PythonModel):
{body}

set_model(Model())
"""

LOG_MODELS = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import mlflow

experiment, files = sys.argv[1], json.loads(sys.argv[2])
mlflow.set_experiment(experiment)
uris = {}
for key, path in files.items():
    with mlflow.start_run():
        uris[key] = mlflow.pyfunc.log_model(name="model", python_model=path).model_uri
print(json.dumps(uris))
"""

ROWS = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.5}]


@pytest.fixture(scope="module")
def markers():
    """Outside pytest's own (root-only) temporary tree, writable by the workers' unprivileged user."""
    directory = Path(tempfile.mkdtemp(prefix="hokusai-markers-"))
    directory.chmod(0o777)  # noqa: S103 (the workers' user writes here)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def isolated(start_service, mlflow_server, tmp_path_factory, markers) -> ServiceProcess:
    """A service with a short call timeout, and the four models registered in it."""
    service = start_service(
        process=True,
        mlflow_url=mlflow_server.url,
        model_call_timeout="3",
        model_workers="2",
        model_spare_workers="1",  # the product's default (the test services start none; see tests/support.py)
    )
    sources = tmp_path_factory.mktemp("model-code")
    files = {}
    for key, body in MODEL_CODE.items():
        path = sources / f"{key}_model.py"
        module = MODULE.format(
            markers=str(markers),
            home=str(service.home),
            api=service.base_url,
            mlflow=mlflow_server.url,
            body=textwrap.indent(textwrap.dedent(body), "    "),
        )
        path.write_text(module)
        files[key] = str(path)
    admin = service.client(service.admin_key)
    writer = admin.post("/api/v1/keys", json={"name": "isolation writer", "scopes": ["write"]})
    assert writer.status_code in (200, 201), writer.text
    key = writer.json()["key"]
    logged = subprocess.run(
        [sys.executable, "-c", LOG_MODELS, "model-isolation", json.dumps(files)],
        env=through_the_gateway(service, key),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert logged.returncode == 0, logged.stderr[-3000:]
    uris = json.loads(logged.stdout.strip().splitlines()[-1])
    for written in markers.iterdir():  # by mlflow's own check of the models, in the logging client
        written.unlink()
    with service.client(key) as client:
        for name, uri in uris.items():
            body = {"model_data": uri, "model_type": "test", "model_name": f"isolation-{name}"}
            answer = client.post("/models/register", json=body)
            assert answer.status_code == 201, answer.text
    service.write_key = key
    return service


def predict(service: ServiceProcess, model: str, timeout: float = 120):
    with service.client(service.write_key) as client:
        return client.post(f"/models/isolation-{model}/1/predict", json={"inputs": ROWS}, timeout=timeout)


def worker_processes(service: ServiceProcess) -> list[psutil.Process]:
    children = psutil.Process(service.process.pid).children()
    return [child for child in children if "hokusai.server.models.worker" in " ".join(child.cmdline())]


def test_registration_fetches_the_files_and_starts_a_spare_worker_that_takes_the_first_call(isolated, markers):
    """Issue 17, before any call in this service: registering the versions fetched their files in the background and
    started one spare worker (HOKUSAI_MODEL_SPARE_WORKERS), holding no model; the first call of a version no worker
    holds loads it in that spare, not in a process started for the call."""
    cache = isolated.home / "model-cache"
    deadline = time.monotonic() + 120  # a bound on waiting, not a measure of speed
    while len([entry for entry in cache.iterdir() if entry.is_dir() and "." not in entry.name]) < len(MODEL_CODE):
        assert time.monotonic() < deadline, sorted(entry.name for entry in cache.iterdir())
        time.sleep(0.1)
    (spare,) = worker_processes(isolated)
    with isolated.client(isolated.write_key) as client:
        body = {"model_data": "models:/isolation-marker/1", "model_type": "test", "model_name": "isolation-fresh"}
        assert client.post("/models/register", json=body).status_code == 201
        first = client.post("/models/isolation-fresh/1/predict", json={"inputs": ROWS}, timeout=120)
    assert first.status_code == 200, first.text
    assert first.json()["loaded"] is True and first.json()["predictions"] == [3.0, 7.5]
    assert json.loads((markers / "marker.json").read_text())["pid"] == spare.pid
    deadline = time.monotonic() + 120
    while len(worker_processes(isolated)) < 2:  # the spare taken is replaced
        assert time.monotonic() < deadline, "no spare started after the first was taken"
        time.sleep(0.1)


def test_model_code_runs_in_a_worker_without_the_service_secrets(isolated, markers):
    first = predict(isolated, "marker")
    assert first.status_code == 200, first.text
    assert first.json()["predictions"] == [3.0, 7.5]
    assert first.json()["loaded"] is True and first.json()["load_ms"] > 0
    assert first.json()["latency_ms"] >= first.json()["load_ms"]
    again = predict(isolated, "marker").json()
    assert again["loaded"] is False and again["load_ms"] is None

    report = json.loads((markers / "marker.json").read_text())
    api_pid = isolated.process.pid
    assert report["pid"] != api_pid  # was the API process itself before the workers
    assert report["ppid"] == api_pid  # a worker the service started and supervises
    environ = report["environ"]
    assert not [name for name in environ if name.startswith("HOKUSAI_")]
    assert not {"MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI", "DATABASE_URL"} & set(environ)
    secrets = [isolated.admin_key, isolated.write_key, isolated.env["HOKUSAI_MLFLOW_URL"], str(isolated.home)]
    assert not [value for value in environ.values() for secret in secrets if secret in value]
    if AS_ROOT:  # the service runs as root here: its workers do not, and the service's files are out of reach
        assert report["uid"] != 0
        assert report["hokusai.db"] == report["admin-key"] == "PermissionError"
        assert report["cache_writable"] is False
        assert not (isolated.home / "model-cache" / f"written-by-{report['pid']}").exists()
        assert report["api"] == report["mlflow"] == "URLError"  # no network: not even the MLflow behind the gateway
    else:
        assert report["api"] == "reached"  # (the service's own user: the network is there)


def test_a_model_that_never_answers_costs_its_worker_and_gets_504(isolated, markers):
    answer = predict(isolated, "sleeper")
    assert answer.status_code == 504, answer.text
    assert "did not finish predicting within 3 s" in answer.json()["detail"]
    sleeper = json.loads((markers / "sleeper.json").read_text())["pid"]
    deadline = time.monotonic() + 30
    while psutil.pid_exists(sleeper) and psutil.Process(sleeper).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the hung worker was not killed"
        time.sleep(0.1)
    assert predict(isolated, "marker").status_code == 200
    assert predict(isolated, "marker").json()["predictions"] == [3.0, 7.5]


def test_a_model_that_allocates_10_gb_gets_a_clear_error_and_the_api_does_not_grow(isolated):
    assert predict(isolated, "marker").status_code == 200  # warm: the API's own memory settles
    api = psutil.Process(isolated.process.pid)
    before = api.memory_info().rss
    answer = predict(isolated, "hog")
    after = api.memory_info().rss
    assert answer.status_code == 422, answer.text
    assert "exceeded the memory limit of model workers (4.0 GiB)" in answer.json()["detail"]
    assert after - before < 50 * 1024 * 1024
    assert predict(isolated, "marker").status_code == 200
    assert predict(isolated, "hog").status_code == 422  # the same answer again: the limit holds per call


def test_a_model_that_crashes_its_worker_gets_502_and_the_api_goes_on(isolated):
    answer = predict(isolated, "crasher")
    assert answer.status_code == 502, answer.text
    assert "died (killed by SIGSEGV)" in answer.json()["detail"]
    assert isolated.process.poll() is None
    assert predict(isolated, "marker").json()["predictions"] == [3.0, 7.5]
    history = isolated.client(isolated.write_key).get("/models/isolation-crasher/1/predictions").json()
    assert history["failed_requests"] == 1


def test_workers_die_with_the_api_process(isolated):
    """Even when the API process is killed outright (no shutdown code runs): PR_SET_PDEATHSIG."""
    children = psutil.Process(isolated.process.pid).children()
    workers = [child for child in children if "hokusai.server.models.worker" in " ".join(child.cmdline())]
    assert workers, [child.cmdline() for child in children]
    isolated.process.send_signal(signal.SIGKILL)
    isolated.process.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive


def test_protocol_messages_are_length_prefixed_json_and_bounded():
    stream = io.BytesIO(encode({"op": "predict", "format": "json"}, b"[1,2]") + encode({"ok": True}))
    assert read_message_blocking(stream, 1024) == ({"op": "predict", "format": "json"}, b"[1,2]")
    assert read_message_blocking(stream, 1024) == ({"ok": True}, b"")
    assert read_message_blocking(stream, 1024) is None
    with pytest.raises(ProtocolError):
        read_message_blocking(io.BytesIO(encode({"ok": True}, b"x" * 2048)), 1024)
    with pytest.raises(ProtocolError):
        read_message_blocking(io.BytesIO(encode({"ok": True})[:-2]), 1024)


PID_MODEL = """
import os

import mlflow.pyfunc
from mlflow.models import set_model


class Model(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return [os.getpid()] * len(model_input)


set_model(Model())
"""


@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore::UserWarning")
async def test_a_spare_worker_waits_with_mlflow_imported_and_takes_the_first_call(tmp_path):
    """Issue 17: a pool keeping a spare starts none for a HOME that never served a model (most processes never
    predict), starts one at once for a HOME whose cache holds models (a restart); the spare greets with MLflow and
    scikit-learn imported, loads the first model asked for, and another spare takes its place."""
    import mlflow.pyfunc

    from hokusai.server.models.files import readable_to_workers
    from hokusai.server.models.pool import ModelSource, ModelWorkerPool, WorkerLimits

    limits = WorkerLimits(4 * 2**30, 30, 120, "nobody")
    cache = tmp_path / "home" / "model-cache"
    unused = ModelWorkerPool(1, cache, tmp_path / "home", limits, spare_workers=1)
    await unused.start()
    assert unused.worker_pids() == []
    await unused.aclose()

    code = tmp_path / "pid_model.py"
    code.write_text(PID_MODEL)
    mlflow.pyfunc.save_model(str(cache / "first"), python_model=str(code))
    readable_to_workers(cache / "first")
    pool = ModelWorkerPool(1, cache, tmp_path / "home", limits, spare_workers=1)
    await pool.start()
    rows = json.dumps([{"x": 1}]).encode()
    try:
        (spare,) = await pool.spares_ready()
        assert pool.worker_pids() == [spare["pid"]]
        assert {"mlflow.pyfunc", "pandas", "pyarrow", "sklearn", "mlflow.sklearn"} <= set(spare["imported"])
        answer = await pool.run(ModelSource("m:1", cache / "first"), "predict", "json", rows)
        assert answer.loaded and answer.load_ms > 0 and answer.data == [spare["pid"]]
        (replacement,) = await pool.spares_ready()
        assert replacement["pid"] != spare["pid"]
        assert sorted(pool.worker_pids()) == sorted([spare["pid"], replacement["pid"]])
    finally:
        await pool.aclose()
    assert not [pid for pid in (spare["pid"], replacement["pid"]) if psutil.pid_exists(pid)]


@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore::UserWarning")
async def test_each_model_gets_fresh_worker_processes_and_the_pool_stops_them(tmp_path):
    """In process, on a model saved here: a worker switching models is a new process (one model's code never runs
    beside another's inputs), a model loaded stays in its worker, and closing the pool ends every worker."""
    import mlflow.pyfunc

    from hokusai.server.models.files import readable_to_workers
    from hokusai.server.models.pool import ModelSource, ModelWorkerPool, WorkerLimits

    code = tmp_path / "pid_model.py"
    code.write_text(PID_MODEL)
    cache = tmp_path / "home" / "model-cache"
    for directory in ("first", "second"):
        mlflow.pyfunc.save_model(str(cache / directory), python_model=str(code))
        readable_to_workers(cache / directory)
    pool = ModelWorkerPool(1, cache, tmp_path / "home", WorkerLimits(4 * 2**30, 30, 120, "nobody"))
    await pool.start()
    first, second = (ModelSource(f"m:{index}", cache / name) for index, name in enumerate(("first", "second")))
    rows = json.dumps([{"x": 1}, {"x": 2}]).encode()
    try:
        answer = await pool.run(first, "predict", "json", rows)
        assert answer.loaded and answer.data[0] == answer.data[1] != os.getpid()
        again = await pool.run(first, "predict", "json", rows)
        assert not again.loaded and again.data == answer.data
        other = await pool.run(second, "predict", "json", rows)
        assert other.loaded and other.data[0] != answer.data[0]
        back = await pool.run(first, "predict", "json", rows)
        assert back.loaded and back.data[0] not in (answer.data[0], other.data[0])
    finally:
        await pool.aclose()
    assert not [pid for pid in (answer.data[0], other.data[0], back.data[0]) if psutil.pid_exists(pid)]
