"""What a new user meets in the first hour, over HTTP (issue 12): paths typed without their slash, and the datasets
directory that evaluate names."""

from __future__ import annotations

import httpx


def test_a_fresh_service_makes_its_datasets_directory(start_service, mlflow_server, tmp_path):
    datasets = tmp_path / "not" / "yet" / "there"
    start_service(mlflow_url=mlflow_server.url, datasets_dir=str(datasets))
    assert datasets.is_dir()


def test_models_without_the_slash_is_served_not_redirected(service, reader):
    plain = reader.get("/models", follow_redirects=False)
    assert plain.status_code == 200 and "models" in plain.json()
    assert plain.json() == reader.get("/models/").json()
    assert reader.get("/api/models", follow_redirects=False).status_code == 200
    with httpx.Client(base_url=service.base_url) as anonymous:
        assert anonymous.get("/models").status_code == 401  # still guarded


def test_the_mlflow_ui_root_without_the_slash_redirects(service):
    with httpx.Client(base_url=service.base_url) as client:
        for prefix in ("/mlflow", "/api/mlflow"):
            answer = client.get(prefix, follow_redirects=False)
            assert answer.status_code == 307 and answer.headers["location"] == prefix + "/"
        with_query = client.get("/mlflow?x=1", follow_redirects=False)
        assert with_query.headers["location"] == "/mlflow/?x=1"
