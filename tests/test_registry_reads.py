"""What a /models read costs MLflow (issue 17): a list is one MLflow call, with each entry's aliases only when asked
for (`include=aliases`, a second call: MLflow's version search does not return them); a get is one call. Cached
answers with and without aliases are kept apart, and a write drops both, in one process and across processes on
one Redis. MLflow calls are counted in front of the real MLflow."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest

from hokusai import ModelRegistry
from hokusai.server.registry.schemas import ModelList, ModelVersionDetail, ModelVersionSummary
from tests.support import mlflow_model_with_versions
from tests.test_single_flight import API, CountingMlflow

SEARCH, ALIASES_BY_SEARCH = "GET /api/2.0/mlflow/model-versions/search", "GET /api/2.0/mlflow/registered-models/search"


@pytest.fixture
def counting(mlflow_server) -> Iterator[CountingMlflow]:
    upstream = CountingMlflow(mlflow_server.url, hold=0)
    yield upstream
    upstream.close()


@pytest.fixture
def aliased_model(mlflow_server) -> str:
    """A model with two versions made in MLflow, its version 2 aliased `champ` there (not through the service)."""
    name = mlflow_model_with_versions(mlflow_server.url, "reads")
    with httpx.Client(base_url=mlflow_server.url + API, timeout=30) as mlflow:
        alias = mlflow.post("/registered-models/alias", json={"name": name, "alias": "champ", "version": "2"})
        assert alias.status_code == 200, alias.text
    return name


def calls_for(counting: CountingMlflow, read) -> dict[str, int]:
    """The MLflow calls one read made, by method and path."""
    before = counting.every.copy()
    read()
    return dict(counting.every - before)


def test_entries_carry_aliases_only_when_asked_for():
    """Absent, not [], when not asked: "not asked" must never read as "no aliases"."""
    plain = ModelVersionSummary(name="m", version="1", status="READY", created_at=1, tags={}, stage="None")
    assert "aliases" not in plain.model_dump() and "aliases" not in plain.model_dump_json()
    assert ModelVersionSummary.model_validate(plain.model_dump()).aliases is None  # a cached entry stays without
    listed = ModelList(models=[plain.model_copy(update={"aliases": []})])
    assert listed.model_dump()["models"][0]["aliases"] == []
    detail = ModelVersionDetail(**plain.model_dump(), aliases=[], description="", source="s", run_id=None, updated_at=1)
    assert detail.model_dump()["aliases"] == []  # a get always has them (model-versions/get returns them)


def test_a_cold_list_is_one_mlflow_call_and_aliases_a_second_only_when_asked(start_service, counting, aliased_model):
    service = start_service(mlflow_url=counting.url, registry_cache_ttl="0")
    with service.client(service.admin_key) as client:
        plain: list[httpx.Response] = []
        assert calls_for(counting, lambda: plain.append(client.get("/models/", params={"name": aliased_model}))) == {
            SEARCH: 1
        }
        assert plain[0].status_code == 200, plain[0].text
        entries = plain[0].json()["models"]
        assert [m["version"] for m in entries] == ["2", "1"] and all("aliases" not in m for m in entries)

        with_aliases: list[httpx.Response] = []
        made = calls_for(
            counting,
            lambda: with_aliases.append(client.get("/models/", params={"name": aliased_model, "include": "aliases"})),
        )
        assert made == {SEARCH: 1, ALIASES_BY_SEARCH: 1}
        assert [(m["version"], m["aliases"]) for m in with_aliases[0].json()["models"]] == [
            ("2", ["champ"]),
            ("1", []),
        ]
        # The same entries otherwise: the aliases are the only difference.
        assert [{k: v for k, v in m.items() if k != "aliases"} for m in with_aliases[0].json()["models"]] == entries

        everything = client.get("/models/", params={"max_results": 1000, "include": ["aliases"]}).json()["models"]
        assert [(m["version"], m["aliases"]) for m in everything if m["name"] == aliased_model] == [
            ("2", ["champ"]),
            ("1", []),
        ]

        got: list[httpx.Response] = []
        assert calls_for(counting, lambda: got.append(client.get(f"/models/{aliased_model}/2"))) == {
            "GET /api/2.0/mlflow/model-versions/get": 1
        }
        assert got[0].json()["aliases"] == ["champ"] and got[0].json()["version"] == "2"


@pytest.mark.parametrize("include", ["bogus", "aliases,stages", ["aliases", "everything"]])
def test_an_unknown_include_is_a_400_that_names_it(reader, include):
    answer = reader.get("/models/", params={"include": include})
    assert answer.status_code == 400
    assert answer.json()["detail"].startswith("Unknown include: ") and "(known: aliases)" in answer.json()["detail"]


def test_include_accepts_a_list_a_repeat_and_blanks(reader):
    for include in ("aliases,aliases", ["aliases", " aliases "], ""):
        answer = reader.get("/models/", params={"include": include, "max_results": 1})
        assert answer.status_code == 200, (include, answer.text)
        entries = answer.json()["models"]
        assert all(("aliases" in m) == (include != "") for m in entries), include


def aliases_listed(client: httpx.Client, name: str) -> dict[str, list[str]]:
    listed = client.get("/models/", params={"name": name, "include": "aliases"})
    assert listed.status_code == 200, listed.text
    return {m["version"]: m["aliases"] for m in listed.json()["models"]}


def set_alias(client: httpx.Client, name: str, version: str, alias: str) -> None:
    answer = client.post(
        "/models/batch", json={"operations": [{"action": "set_alias", "model": f"{name}:{version}", "alias": alias}]}
    )
    assert answer.status_code == 200 and answer.json()["successful"] == 1, answer.text


def test_cached_lists_with_and_without_aliases_are_kept_apart_and_dropped_by_a_write(
    start_service, counting, aliased_model
):
    service = start_service(mlflow_url=counting.url, registry_cache_ttl="30")
    with service.client(service.admin_key) as client:
        plain = client.get("/models/", params={"name": aliased_model}).json()
        assert all("aliases" not in m for m in plain["models"])  # cached first ...
        assert aliases_listed(client, aliased_model) == {"2": ["champ"], "1": []}  # ... not answered from it
        assert client.get("/models/", params={"name": aliased_model}).json() == plain  # both cached now
        assert calls_for(counting, lambda: aliases_listed(client, aliased_model)) == {}
        set_alias(client, aliased_model, "1", "candidate")
        assert aliases_listed(client, aliased_model) == {"2": ["champ"], "1": ["candidate"]}


@pytest.mark.redis
def test_two_processes_on_one_redis_see_each_others_alias_changes_at_once(
    start_service, counting, aliased_model, redis_url
):
    prefix = f"test-reads-{secrets.token_hex(4)}:"  # one deployment (each test service has its own database)
    shared = {"mlflow_url": counting.url, "registry_cache_ttl": "30", "redis_url": redis_url, "redis_prefix": prefix}
    first, second = start_service(**shared), start_service(**shared)
    try:
        with first.client(first.admin_key) as one, second.client(second.admin_key) as other:
            assert aliases_listed(one, aliased_model) == {"2": ["champ"], "1": []}
            # The second process answers from the entry the first one stored: no MLflow call.
            assert calls_for(counting, lambda: aliases_listed(other, aliased_model)) == {}
            plain = other.get("/models/", params={"name": aliased_model}).json()["models"]
            assert all("aliases" not in m for m in plain)  # a list without aliases is an entry of its own
            set_alias(other, aliased_model, "1", "candidate")
            assert aliases_listed(one, aliased_model) == {"2": ["champ"], "1": ["candidate"]}
    finally:
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_the_sdk_and_cli_lists_still_show_aliases(start_service, mlflow_server, aliased_model):
    """The SDK asks for them (`hokusai models list` shows an aliases column)."""
    service = start_service(mlflow_url=mlflow_server.url)
    with ModelRegistry(service.base_url, api_key=service.admin_key) as registry:
        versions = registry.list_models(aliased_model)
    assert [(v.version, v.aliases) for v in versions] == [("2", ["champ"]), ("1", [])]
