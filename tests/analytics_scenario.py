"""A real scenario for the analytics tests, run by the stock mlflow client through the gateway.

Two scikit-learn classifiers trained on different data (the second on more, cleaner data), each run logging its
training dataset, training and validation metrics; the models are logged, not registered (the tests register them
through POST /models/register). Prints one JSON object with everything the tests compare against.

Usage: python analytics_scenario.py EXPERIMENT DATASETS_DIR
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score, log_loss  # noqa: E402

experiment, datasets_dir = sys.argv[1], sys.argv[2]
FEATURES = ["a", "b", "c"]
rng = np.random.default_rng(7)


def frame(rows: int, noise: float) -> pd.DataFrame:
    x = rng.normal(size=(rows, 3))
    y = ((x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=noise, size=rows)) > 0).astype(int)
    data = pd.DataFrame(x, columns=FEATURES)
    data["label"] = y
    return data


holdout = frame(300, 0.1)
holdout.to_csv(f"{datasets_dir}/holdout.csv", index=False)
holdout.to_parquet(f"{datasets_dir}/holdout.parquet")
holdout.to_json(f"{datasets_dir}/holdout.jsonl", orient="records", lines=True)
mlflow.set_experiment(experiment)
out = {"experiment_id": mlflow.get_experiment_by_name(experiment).experiment_id, "versions": []}
for name, train, c in (("train_a", frame(30, 2.0), 0.01), ("train_b", frame(400, 0.1), 1.0)):
    with mlflow.start_run() as run:
        dataset = mlflow.data.from_pandas(train, source=f"/data/{name}.csv", name=name, targets="label")
        mlflow.log_input(dataset, context="training")
        model = LogisticRegression(C=c).fit(train[FEATURES], train["label"])
        val_predicted = model.predict(holdout[FEATURES])
        metrics = {
            "train_accuracy": accuracy_score(train["label"], model.predict(train[FEATURES])),
            "val_accuracy": accuracy_score(holdout["label"], val_predicted),
            "val_error": 1 - accuracy_score(holdout["label"], val_predicted),
            "val_loss": log_loss(holdout["label"], model.predict_proba(holdout[FEATURES])),
        }
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(f"{datasets_dir}/holdout.csv", artifact_path="data")
        info = mlflow.sklearn.log_model(model, name="model", input_example=holdout[FEATURES].head(2))
        out["versions"].append(
            {
                "run_id": run.info.run_id,
                "model_uri": f"models:/{info.model_id}",
                "dataset": name,
                "digest": dataset.digest,
                "metrics": metrics,
                "holdout_accuracy": accuracy_score(holdout["label"], val_predicted),
                "holdout_f1": f1_score(holdout["label"], val_predicted),
                "first_rows": holdout[FEATURES].head(3).to_dict(orient="records"),
                "first_predictions": model.predict(holdout[FEATURES].head(3)).tolist(),
            }
        )
print(json.dumps(out))
