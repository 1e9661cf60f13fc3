"""What do the model analytics cost, against doing the same work directly?

One MLflow server, one `hokusai serve` in front of it, one scikit-learn classifier. Alternating in one run:
  1. predict: POST /models/{name}/1/predict with 100 rows, against mlflow.pyfunc's predict on the same rows in
     this process (the floor: no HTTP, no auth, no record, no isolation), and against a ModelWorkerPool driven from
     this process (the model in a worker process, as the service runs it: the cost of isolation alone);
  2. evaluate: POST /models/evaluate on a 20,000-row CSV, against loading the CSV, predicting and scoring it with
     scikit-learn in this process (the service also logs an MLflow run and records the evaluation);
  3. improvement history: GET /models/{name}/lineage of a model with 100 versions against one with 10 (the MLflow
     calls must not grow with the versions), and against MLflow's own model-versions/search of the 100.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, stop_group  # noqa: E402
from gateway import start_gateway, start_mlflow  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402

ROUNDS = 30
EVALUATE_ROUNDS = 5
FEATURES = ["a", "b", "c", "d"]


def train_and_log(mlflow_url: str, datasets: Path):
    import mlflow
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(20_000, 4))
    data = pd.DataFrame(x, columns=FEATURES)
    data["label"] = (x[:, 0] - x[:, 2] > 0).astype(int)
    data.to_csv(datasets / "eval.csv", index=False)
    mlflow.set_tracking_uri(mlflow_url)
    mlflow.set_experiment("analytics-bench")
    with mlflow.start_run():
        model = LogisticRegression().fit(data[FEATURES], data["label"])
        info = mlflow.sklearn.log_model(model, name="model", input_example=data[FEATURES].head(2))
    return info.model_id, data


def fill_histories(mlflow_url: str, model_id: str) -> None:
    """Models of 10 and 100 versions, each version from its own run with a metric and a benchmark tag."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name("analytics-bench").experiment_id
    api = f"{mlflow_url}/api/2.0/mlflow"
    with httpx.Client(timeout=60) as http:
        for count in (10, 100):
            name = f"bench-history-{count}"
            http.post(f"{api}/registered-models/create", json={"name": name}).raise_for_status()
            for index in range(count):
                run = client.create_run(experiment)
                client.log_metric(run.info.run_id, "accuracy", 0.5 + index / 1000)
                tags = [
                    {"key": "benchmark_metric", "value": "accuracy"},
                    {"key": "benchmark_value", "value": str(0.5 + index / 1000)},
                ]
                http.post(
                    f"{api}/model-versions/create",
                    json={
                        "name": name,
                        "source": f"models:/{model_id}",
                        "model_id": model_id,
                        "run_id": run.info.run_id,
                        "tags": tags,
                    },
                ).raise_for_status()


def timed_ms(call) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    key = generate_api_key()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "mlflow").mkdir()
        (root / "service" / "datasets").mkdir(parents=True)
        mlflow_process, mlflow_url = start_mlflow(root / "mlflow")
        processes = [mlflow_process]
        try:
            model_id, data = train_and_log(mlflow_url, root / "service" / "datasets")
            fill_histories(mlflow_url, model_id)
            service_process, service_url = start_gateway(
                root / "service",
                mlflow_url,
                key,
                HOKUSAI_MLFLOW_KEEPALIVE="true",
                HOKUSAI_RATE_LIMIT_DEFAULT_PER_HOUR="100000000",
                HOKUSAI_RATE_LIMIT_LINEAGE="100000/minute",
                HOKUSAI_EVALUATION_SYNC_MAX_BYTES="100000000",
            )
            processes.append(service_process)
            service = httpx.Client(base_url=service_url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
            mlflow_client = httpx.Client(base_url=mlflow_url, timeout=60)
            report(service, mlflow_client, mlflow_url, data, root / "service" / "datasets" / "eval.csv")
        finally:
            for process in reversed(processes):
                stop_group(process)


def report(service: httpx.Client, mlflow_client: httpx.Client, mlflow_url: str, data, csv: Path) -> None:
    import mlflow.pyfunc
    import pandas as pd
    from sklearn.metrics import accuracy_score, f1_score

    name = "bench-history-10"
    rows = data[FEATURES].head(100)
    records = rows.to_dict(orient="records")
    mlflow.set_tracking_uri(mlflow_url)
    direct_model = mlflow.pyfunc.load_model(f"models:/{name}/1")

    def through_service() -> None:
        service.post(f"/models/{name}/1/predict", json={"inputs": records}).raise_for_status()

    first = service.post(f"/models/{name}/1/predict", json={"inputs": records}).json()  # loads it in a worker
    print(
        f"first predict (a worker starts and loads the model): {first['latency_ms']:.0f} ms, "
        f"of which worker and load {first['load_ms']:.0f} ms"
    )
    loop = asyncio.new_event_loop()
    pool, source = loop.run_until_complete(worker_pool(name))

    def through_pool() -> None:
        payload = json.dumps(records, separators=(",", ":")).encode()
        loop.run_until_complete(pool.run(source, "predict", "json", payload))

    through_pool()
    timings: dict[str, list[float]] = {"service": [], "worker pool": [], "direct": []}
    for _ in range(ROUNDS):
        timings["service"].append(timed_ms(through_service))
        timings["worker pool"].append(timed_ms(through_pool))
        timings["direct"].append(timed_ms(lambda: direct_model.predict(rows)))
    loop.run_until_complete(pool.aclose())
    loop.close()
    shutil.rmtree(source.directory.parent.parent, ignore_errors=True)
    service_ms, pool_ms, direct_ms = (median(timings[side]) for side in ("service", "worker pool", "direct"))
    print(
        f"predict, 100 rows: service {service_ms:.1f} ms, pyfunc in process {direct_ms:.1f} ms, "
        f"ratio {service_ms / direct_ms:.2f}x (+{service_ms - direct_ms:.1f} ms); "
        f"worker pool alone {pool_ms:.1f} ms (isolation +{pool_ms - direct_ms:.1f} ms)"
    )

    def evaluate_service() -> None:
        body = {
            "model_name": name,
            "model_version": "1",
            "dataset_path": "eval.csv",
            "metrics": ["accuracy", "f1_score"],
        }
        service.post("/models/evaluate", json=body).raise_for_status()

    def evaluate_direct() -> None:
        frame = pd.read_csv(csv)
        predicted = direct_model.predict(frame[FEATURES])
        accuracy_score(frame["label"], predicted), f1_score(frame["label"], predicted)

    evaluate_service()
    evaluations: dict[str, list[float]] = {"service": [], "direct": []}
    for _ in range(EVALUATE_ROUNDS):
        evaluations["service"].append(timed_ms(evaluate_service))
        evaluations["direct"].append(timed_ms(evaluate_direct))
    service_ms, direct_ms = median(evaluations["service"]), median(evaluations["direct"])
    print(
        f"evaluate, 20,000 rows: service {service_ms:.0f} ms, in process {direct_ms:.0f} ms, "
        f"ratio {service_ms / direct_ms:.2f}x (+{service_ms - direct_ms:.0f} ms: an MLflow run and its logging)"
    )

    histories: dict[str, list[float]] = {"10": [], "100": [], "mlflow search 100": []}
    for _ in range(ROUNDS):
        histories["10"].append(timed_ms(lambda: service.get("/models/bench-history-10/lineage").raise_for_status()))
        histories["100"].append(timed_ms(lambda: service.get("/models/bench-history-100/lineage").raise_for_status()))
        histories["mlflow search 100"].append(
            timed_ms(
                lambda: mlflow_client.get(
                    "/api/2.0/mlflow/model-versions/search", params={"filter": "name = 'bench-history-100'"}
                ).raise_for_status()
            )
        )
    ten, hundred, search = (median(values) for values in histories.values())
    print(
        f"improvement history: 10 versions {ten:.1f} ms, 100 versions {hundred:.1f} ms "
        f"(ratio {hundred / ten:.2f}x for 10x the versions); MLflow's search of the 100 alone {search:.1f} ms"
    )


async def worker_pool(name: str):
    """A pool of one worker in this process, on the version's files (downloaded as the service would have them)."""
    import mlflow.artifacts

    from hokusai.server.models.files import readable_to_workers
    from hokusai.server.models.pool import ModelSource, ModelWorkerPool, WorkerLimits

    home = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    cache = home / "model-cache"
    directory = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(cache / "version")))
    readable_to_workers(directory)
    pool = ModelWorkerPool(1, cache, home, WorkerLimits(4 * 2**30, 60, 300, "nobody"))
    await pool.start()
    return pool, ModelSource(f"{name}:1", directory)


if __name__ == "__main__":
    main()
