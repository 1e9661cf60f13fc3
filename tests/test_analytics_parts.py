"""The parts of the model analytics on their own: EIP-55, metric directions, references, dataset paths, the stores
on SQLite and PostgreSQL, and the number of MLflow calls an improvement history makes."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta

import mlflow
import pytest
from sqlalchemy import inspect

from hokusai.server.analytics.contributors import ContributionStore, checksum_address, contributor_shares
from hokusai.server.analytics.evaluation import local_dataset
from hokusai.server.analytics.lineage import LineageService, training_data_tag
from hokusai.server.analytics.models import ContributionRow
from hokusai.server.analytics.performance import split_by_prefix
from hokusai.server.analytics.predictions import PredictionStore
from hokusai.server.analytics.versions import MetricDirection, ModelReference, VersionReader
from hokusai.server.config import Settings
from hokusai.server.db import Database, run_migrations
from hokusai.server.errors import InvalidRequest
from hokusai.server.mlflow.registry_client import MlflowApi
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.models.files import trim_directory
from hokusai.server.models.worker import jsonable_predictions
from hokusai.server.runtime import build_breaker

# The test vectors of EIP-55 itself.
EIP55 = [
    "0x52908400098527886E0F7030069857D2E4169EE7",
    "0x8617E340B3D01FA5F11F306F4090FD50E238070D",
    "0xde709f2102306220921060314715629080e2fb77",
    "0x27b1fdb04752bbc536007a920d24acb045561c26",
    "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
    "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
    "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
    "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
]


def test_eip55_checksums():
    for address in EIP55[4:]:
        assert checksum_address(address) == address
        assert checksum_address(address.lower()) == address
        assert checksum_address("0x" + address[2:].upper()) == address
    for address in EIP55[:4]:  # all one case: no checksum to check, answered in checksum form
        assert checksum_address(address).lower() == address.lower()
    assert checksum_address(EIP55[0]) == "0x52908400098527886E0F7030069857D2E4169EE7"
    # NIST SHA3-256 (hashlib's) gives another casing, which EIP-55 addresses would fail.
    lower = EIP55[4][2:].lower()
    nist = hashlib.sha3_256(lower.encode()).hexdigest()
    assert "".join(c.upper() if int(h, 16) >= 8 else c for c, h in zip(lower, nist, strict=False)) != EIP55[4][2:]
    flipped = EIP55[4].replace("aA", "Aa", 1)
    with pytest.raises(InvalidRequest, match="EIP-55 checksum"):
        checksum_address(flipped)
    for bad in ("", "0x", "0x123", "5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "0X" + EIP55[4][2:], "0x" + "z" * 40):
        with pytest.raises(InvalidRequest, match="0x followed by 40 hexadecimal digits"):
            checksum_address(bad)


def test_contributor_shares():
    assert contributor_shares({}) == []
    single = contributor_shares({"contributor_address": EIP55[4].lower()})
    assert [(s.address, s.weight) for s in single] == [(EIP55[4], 1.0)]
    listed = contributor_shares(
        {"contributors": f'[{{"address": "{EIP55[5]}", "weight": 0.4}}, {{"address": "{EIP55[6]}", "weight": 0.6}}]'}
    )
    assert [(s.address, s.weight) for s in listed] == [(EIP55[5], 0.4), (EIP55[6], 0.6)]
    thirds = [{"address": a, "weight": 1 / 3} for a in EIP55[5:8]]
    assert len(contributor_shares({"contributors": thirds})) == 3  # sums to 1 within float error
    for bad in (
        [{"address": EIP55[5], "weight": 0.4}],
        [{"address": EIP55[5], "weight": 0}],
        [{"address": EIP55[5], "weight": 1.5}],
        [{"address": EIP55[5], "weight": True}],
        [{"address": EIP55[5]}],
        [EIP55[5]],
        {"address": EIP55[5], "weight": 1},
    ):
        with pytest.raises(InvalidRequest):
            contributor_shares({"contributors": bad})


def test_metric_directions():
    direction = MetricDirection(Settings().lower_is_better)
    for lower in ("loss", "val_loss", "log_loss", "eval_log_loss", "rmse", "mae", "latency_ms", "p95-latency", "Error"):
        assert direction.lower_is_better(lower), lower
    for higher in ("accuracy", "f1_score", "roc_auc", "glossary", "closs", "maelstrom", "r2", "throughput"):
        assert not direction.lower_is_better(higher), higher
    assert direction.improvement("accuracy", 0.8, 0.9) == pytest.approx(0.1)
    assert direction.improvement("val_loss", 0.5, 0.3) == pytest.approx(0.2)
    assert direction.improvement("val_loss", 0.3, 0.5) == pytest.approx(-0.2)
    custom = MetricDirection(frozenset({"cost", "time_to_first_token"}))
    assert custom.lower_is_better("cloud_cost") and custom.lower_is_better("p50_time_to_first_token_ms")
    assert not custom.lower_is_better("val_loss") and not custom.lower_is_better("time_to")


def test_model_references():
    assert ModelReference.parse("clf:3") == ModelReference("clf", version="3")
    assert ModelReference.parse(" team:clf:12 ") == ModelReference("team:clf", version="12")
    assert ModelReference.parse("clf@champion") == ModelReference("clf", alias="champion")
    assert ModelReference.parse("a@b@prod-1") == ModelReference("a@b", alias="prod-1")
    for bad in ("clf", "clf:", ":3", "clf:v3", "clf:²", "clf@", "@x", "clf@bad alias", ""):
        with pytest.raises(InvalidRequest, match="Name:Version or Name@alias"):
            ModelReference.parse(bad)


def test_metrics_sorted_by_prefix():
    training, validation = split_by_prefix(
        {"loss": 0.9, "train_loss": 0.1, "training_accuracy": 0.97, "val_loss": 0.2, "eval_f1": 0.5, "epochs": 3.0}
    )
    assert training == {"loss": 0.1, "accuracy": 0.97, "epochs": 3.0}
    assert validation == {"loss": 0.2, "f1": 0.5}
    assert split_by_prefix({"train_": 1.0}) == ({"train_": 1.0}, {})


def test_dataset_paths_stay_inside_the_directory(tmp_path):
    root = (tmp_path / "datasets").resolve()
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.csv").write_text("x,label\n1,0\n")
    (tmp_path / "outside.csv").write_text("x\n")
    (root / "link.csv").symlink_to(tmp_path / "outside.csv")
    assert local_dataset("sub/a.csv", root).local == root / "sub" / "a.csv"
    assert local_dataset(str(root / "sub" / "a.csv"), root).size == 12
    for bad, words in (
        ("../outside.csv", "'..'"),
        ("sub/../../outside.csv", "'..'"),
        (str(tmp_path / "outside.csv"), "under the datasets directory"),
        ("link.csv", "under the datasets directory"),
        ("sub/a.txt", ".csv, .parquet or .jsonl"),
        ("sub/b.csv", "Dataset not found"),
        ("a\0.csv", "'..'"),
    ):
        with pytest.raises(InvalidRequest, match=words):
            local_dataset(bad, root)


def test_small_helpers():
    assert training_data_tag('["a", "b"]') == ["a", "b"]
    assert training_data_tag("a, b ,") == ["a", "b"]
    assert training_data_tag("") == []
    import numpy as np
    import pandas as pd

    assert jsonable_predictions(np.array([1.5, np.nan, np.inf])) == [1.5, None, None]
    assert jsonable_predictions(pd.DataFrame({"p": [np.int64(1)]})) == [{"p": 1}]
    assert jsonable_predictions(np.array([[1, 2]])) == [[1, 2]]


@pytest.mark.anyio
async def test_analytics_tables_and_indexes(database):
    async with database.engine.connect() as connection:
        tables, indexes = await connection.run_sync(
            lambda sync: (inspect(sync).get_table_names(), inspect(sync).get_indexes("contributions"))
        )
    assert {"contributions", "prediction_records", "evaluations"} <= set(tables)
    assert any(index["column_names"] == ["address", "contributed_at"] for index in indexes)


@pytest.mark.anyio
async def test_prediction_history_groups_by_utc_day(database):
    store = PredictionStore(database)
    async with database.session() as session, session.begin():
        from hokusai.server.analytics.models import PredictionRow

        for day, rows, success in ((1, 5, True), (1, 7, True), (2, 4, False), (3, 2, True)):
            moment = datetime(2026, 1, day, 23, 59, 59, tzinfo=UTC)  # late in the UTC day: not moved by time zones
            session.add(
                PredictionRow(
                    model_name="m", version="1", predicted_at=moment, rows=rows, latency_ms=day, success=success
                )
            )
    history = await store.history("m", "1", None, None)
    assert history.total_predictions == 14 and history.total_requests == 4 and history.failed_requests == 1
    assert [(d.date, d.count) for d in history.daily_counts] == [
        ("2026-01-01", 12),
        ("2026-01-02", 0),
        ("2026-01-03", 2),
    ]
    assert history.date_range.start == "2026-01-01" and history.date_range.end == "2026-01-03"
    window = await store.history("m", "1", datetime(2026, 1, 2).date(), datetime(2026, 1, 2).date())
    assert [(d.date, d.count) for d in window.daily_counts] == [("2026-01-02", 0)] and window.failed_requests == 1
    await store.record("m", "1", rows=3, latency_ms=10.0, success=True)
    await store.record("m", "1", rows=3, latency_ms=30.0, success=True)
    await store.record("m", "1", rows=3, latency_ms=99.0, success=False)
    production = await store.production_metrics("m", "1", window_seconds=600)
    assert production.request_count == 3 and production.prediction_count == 6
    assert production.latency_p50_ms == 20.0 and production.latency_p95_ms == pytest.approx(29.0)
    assert production.error_rate == pytest.approx(1 / 3) and production.throughput_rps == pytest.approx(3 / 600)


@pytest.mark.anyio
async def test_contributor_impact_totals(database):
    store = ContributionStore(database)
    start = datetime(2026, 3, 1, tzinfo=UTC)

    def row(model: str, version: str, score: float, days: int, address: str = EIP55[4]) -> ContributionRow:
        return ContributionRow(
            address=address,
            model_name=model,
            version=version,
            weight=1.0,
            improvement_score=score,
            contributed_at=start + timedelta(days=days),
        )

    await store.replace("a", "2", [row("a", "2", 0.05, 0)])
    await store.replace("a", "3", [row("a", "3", -0.02, 1)])
    await store.replace("b", "2", [row("b", "2", -0.01, 2), row("b", "2", 0.5, 2, address=EIP55[5])])
    await store.replace("c", "4", [row("c", "4", 0.2, 3)])
    impact = await store.impact(EIP55[4], limit=2, offset=0)
    assert impact.total_contributions == 4 and impact.total_models_improved == 2  # a (+0.03) and c; not b
    assert impact.total_improvement_score == pytest.approx(0.25)  # regressions are never impact
    assert [(c.model_name, c.version) for c in impact.contributions] == [("c", "4"), ("b", "2")]
    assert impact.first_contribution == "2026-03-01T00:00:00Z" and impact.last_contribution == "2026-03-04T00:00:00Z"
    await store.replace("c", "4", [])  # recorded anew (rebuild): replaced, not added
    assert (await store.impact(EIP55[4], limit=10, offset=0)).total_contributions == 3


@pytest.mark.anyio
async def test_improvement_history_calls_do_not_grow_with_versions(mlflow_server, tmp_path):
    """3 versions or 12: the same number of MLflow calls (versions, experiments, runs: each one page)."""
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    experiment = client.create_experiment(f"history-calls-{tmp_path.name}")
    for model, count in (("history-small", 3), ("history-large", 12)):
        client.create_registered_model(f"{model}-{tmp_path.name}")
        for index in range(count):
            run = client.create_run(experiment)
            client.log_metric(run.info.run_id, "accuracy", 0.5 + index / 100)
            client.create_model_version(
                f"{model}-{tmp_path.name}", f"{run.info.artifact_uri}/model", run_id=run.info.run_id
            )

    class CountingApi(MlflowApi):
        calls = 0

        async def __call__(self, *args, **kwargs):
            CountingApi.calls += 1
            return await super().__call__(*args, **kwargs)

    settings = Settings(home=tmp_path)
    run_migrations(settings.database_dsn)
    database = Database(settings.async_database_dsn)
    upstream = MlflowUpstream(mlflow_server.url, 30.0, breaker=build_breaker(settings))
    try:
        lineage = LineageService(VersionReader(CountingApi(upstream), "evals"), database, MetricDirection(frozenset()))
        counts = {}
        for model in ("history-small", "history-large"):
            CountingApi.calls = 0
            history = await lineage.improvement_history(f"{model}-{tmp_path.name}")
            counts[model] = CountingApi.calls
            improvements = [step.improvement for step in history.lineage]
            assert improvements[0] is None or history.lineage[0].benchmark_metric is None
        assert history.total_versions == 12 and history.latest_version == "12"
        assert history.lineage[5].metrics == {"accuracy": pytest.approx(0.55)}
        assert counts["history-small"] == counts["history-large"] == 3
    finally:
        await upstream.aclose()
        await database.dispose()


def test_model_files_are_trimmed_least_recently_used_first(tmp_path):
    root = tmp_path / "model-cache"
    for index, name in enumerate(["old", "loaded", "recent", "new", "fetching.partial"]):
        (root / name).mkdir(parents=True)
        (root / name / "model.bin").write_bytes(b"x" * 100)
        os.utime(root / name, (1000 + index, 1000 + index))
    removed = trim_directory(root, max_bytes=250, keep={root / "loaded", root / "new"})
    assert removed == [root / "old", root / "recent"]  # oldest first, skipping what is kept, until <= 250 bytes
    assert sorted(p.name for p in root.iterdir()) == ["fetching.partial", "loaded", "new"]
    assert trim_directory(root, max_bytes=10_000, keep=set()) == []
