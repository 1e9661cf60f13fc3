"""The stock MLflow client's everyday workflow, run as its own process against MLFLOW_TRACKING_URI.

Used by the gateway tests (and bench/gateway.py): prints one JSON object describing what it saw.
Usage: python tests/mlflow_workflow.py <experiment-and-model-name>
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from sklearn.linear_model import LogisticRegression

warnings.filterwarnings("ignore")


def main(name: str) -> dict:
    client = MlflowClient()
    mlflow.set_experiment(name)
    features = np.array([[0.0, 0.1], [0.2, 0.0], [1.0, 0.9], [0.9, 1.1], [0.1, 0.2], [1.1, 1.0]])
    labels = np.array([0, 0, 1, 1, 0, 1])
    with tempfile.TemporaryDirectory() as scratch, mlflow.start_run(run_name="gateway-e2e") as run:
        mlflow.log_param("C", 1.0)
        mlflow.log_metrics({"accuracy": 0.9, "loss": 0.25})
        mlflow.log_metric("accuracy", 0.95, step=1)
        mlflow.set_tag("team", "gateway")
        notes = Path(scratch) / "notes.txt"
        notes.write_text("artifact through the gateway\n" * 100)
        mlflow.log_artifact(str(notes), artifact_path="docs")
        mlflow.log_dict({"hello": "world"}, "config/settings.json")
        model = LogisticRegression().fit(features, labels)
        info = mlflow.sklearn.log_model(model, name="model", registered_model_name=name, input_example=features[:2])
        downloaded = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="docs/notes.txt", dst_path=scratch + "/down"
        )
        artifact_roundtrip = Path(downloaded).read_text() == notes.read_text()
    run_data = client.get_run(run.info.run_id).data
    history = [m.value for m in client.get_metric_history(run.info.run_id, "accuracy")]

    version = client.get_latest_versions(name)[0].version if hasattr(client, "get_latest_versions") else "1"
    client.transition_model_version_stage(name, version, "Staging")
    stage = client.get_model_version(name, version).current_stage
    client.set_model_version_tag(name, version, "validated", "yes")
    client.set_registered_model_alias(name, "champion", version)
    by_alias = client.get_model_version_by_alias(name, "champion").version
    loaded_by_version = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    loaded_by_alias = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    predictions = loaded_by_version.predict(features).tolist()
    alias_predictions = loaded_by_alias.predict(features).tolist()
    client.delete_registered_model_alias(name, "champion")
    aliases_after_delete = client.get_registered_model(name).aliases

    experiment = mlflow.get_experiment_by_name(name)
    return {
        "run_id": run.info.run_id,
        "params": run_data.params,
        "metrics": run_data.metrics,
        "accuracy_history": history,
        "tags_team": run_data.tags.get("team"),
        "artifact_roundtrip": artifact_roundtrip,
        "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
        "model_uri": info.model_uri,
        "model_version": version,
        "stage": stage,
        "version_tags": client.get_model_version(name, version).tags,
        "alias_version": by_alias,
        "aliases_after_delete": dict(aliases_after_delete),
        "predictions": predictions,
        "alias_predictions": alias_predictions,
        "expected_predictions": model.predict(features).tolist(),
        "searched_runs": len(mlflow.search_runs(experiment_ids=[experiment.experiment_id])),
        "searched_experiments": [e.name for e in client.search_experiments(filter_string=f"name = '{name}'")],
        "searched_models": [m.name for m in client.search_registered_models(filter_string=f"name = '{name}'")],
        "searched_versions": len(client.search_model_versions(f"name = '{name}'")),
        "searched_logged_models": len(
            mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
        ),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
