"""The SDK and client CLI against a scripted server: where setup() points mlflow, where downloads land, and how
rate limiting is reported (issue 12's first-hour findings)."""

from __future__ import annotations

import os
import warnings

import pytest

import hokusai
from hokusai import ModelRegistry, RateLimited
from hokusai.sdk import config
from tests.support import ScriptedServer, run_cli, service_environment

DETAIL = {"name": "m", "version": "1"}


@pytest.fixture
def fresh_sdk(tmp_path, monkeypatch):
    """No URL or key from anywhere: no setup() yet, no HOKUSAI_URL, no saved config, no mlflow variables."""
    monkeypatch.setattr(config, "_configured", config._Configured())
    monkeypatch.setenv("HOKUSAI_CONFIG", str(tmp_path / "config"))
    for name in ("HOKUSAI_URL", "HOKUSAI_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def start(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_setup_without_a_url_says_so_and_mlflow_follows_the_registry(fresh_sdk):
    with pytest.warns(UserWarning, match="no service URL"):
        hokusai.setup(api_key="hk_test_k")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # no guess at localhost
    ModelRegistry("https://registry.example/api/mlflow").close()
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://registry.example/api/mlflow"
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "hk_test_k"


def test_setup_url_and_registry_url_agree(fresh_sdk):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a URL was given: no warning
        hokusai.setup(api_key="hk_test_k", url="https://one.example/api/mlflow")
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://one.example/api/mlflow"
    ModelRegistry("https://two.example/api/mlflow").close()
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://two.example/api/mlflow"


def test_setup_without_configure_mlflow_leaves_mlflow_alone(fresh_sdk):
    hokusai.setup(api_key="hk_test_k", configure_mlflow=False)
    ModelRegistry("https://two.example/api/mlflow").close()
    assert "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.parametrize(
    ("dest", "expected"),
    [
        ("models/", "models/m-1.zip"),  # a directory that does not exist yet
        ("a/b/", "a/b/m-1.zip"),
        ("out.zip", "out.zip"),
        ("new/out.zip", "new/out.zip"),
        (".", "m-1.zip"),
    ],
)
def test_downloads_land_where_the_path_says(fresh_sdk, scripted, tmp_path, monkeypatch, dest, expected):
    server = scripted([(200, {}, DETAIL)])
    monkeypatch.chdir(tmp_path)
    with ModelRegistry(server.url, api_key="hk_test_k") as registry:
        target = registry.download("m", 1, dest)
    assert target.resolve() == (tmp_path / expected).resolve() and target.is_file()


def test_a_long_retry_after_fails_at_once_saying_when(fresh_sdk, scripted):
    headers = {"Retry-After": "689", "X-RateLimit-Limit": "1000", "RateLimit-Policy": '"key";q=1000;w=3600'}
    server = scripted([(429, headers, {"detail": "Rate limit exceeded"})])
    with ModelRegistry(server.url, api_key="hk_test_k") as registry, pytest.raises(RateLimited) as caught:
        registry.get_model("m", 1)
    assert len(server.requests) == 1  # no waiting and no retry: the server asked for longer than the budget
    assert caught.value.detail == "rate limited; retry after 689 s (limit 1000/h)"
    assert caught.value.retry_after == 689


def test_the_cli_says_it_waits_and_fails_fast_on_long_limits(scripted, tmp_path):
    env = service_environment(HOKUSAI_CONFIG=str(tmp_path / "config"))
    server = scripted([(429, {"Retry-After": "1"}, {"detail": "Rate limit exceeded"}), (200, {}, DETAIL)])
    waited = run_cli("models", "show", "m:1", "--url", server.url, "--api-key", "hk_test_k", "--json", env=env)
    assert waited.returncode == 0, waited.stderr
    assert "HTTP 429; retrying in 1.0 s" in waited.stderr

    headers = {"Retry-After": "689", "X-RateLimit-Limit": "20", "RateLimit-Policy": '"route";q=20;w=60'}
    server = scripted([(429, headers, {"detail": "Rate limit exceeded"})])
    refused = run_cli("models", "show", "m:1", "--url", server.url, "--api-key", "hk_test_k", env=env)
    assert refused.returncode == 6
    assert "rate limited; retry after 689 s (limit 20/min)" in refused.stderr
