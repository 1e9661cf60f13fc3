"""/models/* against hostile input: no caller can trip the shared breaker, every input is answered 4xx, one odd
name never breaks the list, and parallel changes to one model take turns."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from urllib.parse import quote

import httpx
import pytest

API = "/api/2.0/mlflow"
BAD_PAGE_TOKENS = [
    "\u008b",  # ?page_token=%C2%8B: MLflow's base64 decoder raised on non-ASCII (500)
    "ünïcødé",
    "%%%garbage%%%",
    "Zm9v",  # base64 of "foo": not JSON
    base64.b64encode(b"[1, 2]").decode(),  # JSON, not an object: MLflow answered 500
    base64.b64encode(b'"x"').decode(),
    base64.b64encode(json.dumps({"offset": 2**63}).encode()).decode(),  # beyond SQLite's integer: 500
    base64.b64encode(json.dumps({"offset": -5}).encode()).decode(),
    base64.b64encode(json.dumps({"offset": "abc"}).encode()).decode(),
    base64.b64encode(json.dumps({"offset": True}).encode()).decode(),
    "A" * 600,
]


def mlflow_model(mlflow_url: str, name: str, versions: int) -> None:
    """A registered model with `versions` versions, made straight in MLflow (bypassing the service's checks)."""
    with httpx.Client(base_url=mlflow_url + API, timeout=30) as mlflow:
        run = mlflow.post("/runs/create", json={"experiment_id": "0"}).json()["run"]["info"]
        created = mlflow.post("/registered-models/create", json={"name": name})
        assert created.status_code == 200, created.text
        for _ in range(versions):
            version = mlflow.post(
                "/model-versions/create",
                json={"name": name, "source": f"{run['artifact_uri']}/model", "run_id": run["run_id"]},
            )
            assert version.status_code == 200, version.text


def delete_mlflow_model(mlflow_url: str, name: str) -> None:
    httpx.request("DELETE", f"{mlflow_url}{API}/registered-models/delete", json={"name": name}, timeout=30)


def new_key(service, scope: str) -> str:
    with service.client(service.admin_key) as admin:
        answer = admin.post("/api/v1/keys", json={"name": f"hardening {scope}", "scopes": [scope]})
    assert answer.status_code == 201, answer.text
    return answer.json()["key"]


def breaker(service) -> dict:
    return httpx.get(f"{service.base_url}/health/status", timeout=30).json()["mlflow"]["circuit_breaker"]


# --- the breaker counts upstream faults only ------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_service(start_service, mlflow_server):
    """A service of this module's own, so that its breaker's counts are this module's alone."""
    return start_service(mlflow_url=mlflow_server.url, breaker_failure_threshold="5")


def test_fifty_bad_page_tokens_from_a_read_key_leave_the_breaker_closed(own_service):
    with own_service.client(new_key(own_service, "read")) as reader:
        for attempt in range(50):
            token = BAD_PAGE_TOKENS[attempt % len(BAD_PAGE_TOKENS)]
            answer = reader.get("/models/", params={"page_token": token})
            assert 400 <= answer.status_code < 500, (token, answer.status_code, answer.text)
            assert "detail" in answer.json()
        listed = reader.get("/models/")
        assert listed.status_code == 200
        health = reader.get("/health/mlflow")
        assert health.status_code == 200 and health.json()["circuit_breaker_state"] == "CLOSED"
    state = breaker(own_service)
    assert state["state"] == "CLOSED" and state["failure_count"] == 0 and state["times_opened"] == 0


def test_versions_beyond_what_mlflow_holds_are_answered_before_asking_it(own_service, mlflow_server):
    name = f"hardening-big-{secrets.token_hex(3)}"
    mlflow_model(mlflow_server.url, name, 1)
    try:
        with (
            own_service.client(new_key(own_service, "write")) as writer,
            own_service.client(new_key(own_service, "read")) as reader,
        ):
            for version in ("99999999999999999999", str(2**31), str(2**63), "9" * 5000):
                source = writer.post(
                    "/models/register",
                    json={"model_data": f"models:/{name}/{version}", "model_type": "c", "model_name": name},
                )
                assert source.status_code in (400, 422), source.text
                assert reader.get(f"/models/{name}/{version}").status_code == 404
                assert reader.get(f"/models/{name}/{version}/lineage").status_code == 404
                batch = writer.post(
                    "/models/batch",
                    json={"operations": [{"action": "set_tags", "model": f"{name}:{version}", "tags": {"a": "b"}}]},
                )
                assert batch.status_code == 422
            first = writer.post(
                "/models/register",
                json={"model_data": f"models:/{name}/1", "model_type": "c", "model_name": name + "-copy"},
            )
            assert first.status_code == 201, first.text
        state = breaker(own_service)
        assert state["state"] == "CLOSED" and state["failure_count"] == 0
    finally:
        delete_mlflow_model(mlflow_server.url, name)
        delete_mlflow_model(mlflow_server.url, name + "-copy")


# --- one odd name never breaks the list ---------------------------------------------------------------------

ODD_NAMES = ["q'\"x-{}", "nul\x00x-{}", "back\\slash-{}", "new\nline-{}"]


@pytest.fixture(scope="module")
def odd_models(mlflow_server):
    """Models MLflow accepts but no filter literal can hold, each with an alias on its version 1."""
    names = [template.format(secrets.token_hex(3)) for template in ODD_NAMES]
    for name in names:
        mlflow_model(mlflow_server.url, name, 1)
        alias = httpx.post(
            f"{mlflow_server.url}{API}/registered-models/alias", json={"name": name, "alias": "champ", "version": "1"}
        )
        assert alias.status_code == 200, alias.text
    yield names
    for name in names:
        delete_mlflow_model(mlflow_server.url, name)


def everything_listed(reader) -> dict[str, list[dict]]:
    """Every version the list shows, page by page, by model name."""
    found: dict[str, list[dict]] = {}
    token = None
    while True:
        params = {"max_results": 1000, "include": "aliases", **({"page_token": token} if token else {})}
        page = reader.get("/models/", params=params)
        assert page.status_code == 200, page.text
        for model in page.json()["models"]:
            found.setdefault(model["name"], []).append(model)
        token = page.json()["next_page_token"]
        if not token:
            return found


def test_models_with_odd_names_made_in_mlflow_do_not_break_the_list(reader, odd_models):
    listed = everything_listed(reader)
    for name in odd_models:
        assert [(m["version"], m["aliases"]) for m in listed[name]] == [("1", ["champ"])], name
    assert reader.get("/models/production").status_code == 200
    both_quotes, nul, backslash, newline = odd_models
    # still addressable where MLflow takes the name as a plain parameter
    for name in (both_quotes, backslash, newline):
        detail = reader.get(f"/models/{quote(name, safe='')}/1")
        assert detail.status_code == 200 and detail.json()["aliases"] == ["champ"], (name, detail.text)
    for name in (backslash, newline):
        only = reader.get("/models/", params={"name": name, "include": "aliases"}).json()["models"]
        assert [(m["name"], m["aliases"]) for m in only] == [(name, ["champ"])]
    for facet in ("lineage", "metrics"):  # were 400: their filters could not name it
        assert reader.get(f"/models/{quote(both_quotes, safe='')}/1/{facet}").status_code == 200, facet
    assert reader.get("/models/", params={"name": nul}).json() == {"models": [], "next_page_token": None}
    assert reader.get(f"/models/{quote(nul, safe='')}/1").status_code == 404  # no name MLflow should hold


@pytest.mark.parametrize(
    "name", ["it's", 'say "hi"', "back\\slash", "nul\x00", "new\nline", "tab\tname", "x" * 257, " padded"]
)
def test_names_that_would_break_filters_cannot_be_registered(writer, name):
    response = writer.post(
        "/models/register", json={"model_data": "models:/m-" + "0" * 32, "model_type": "c", "model_name": name}
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "model_name"]


# --- every input bounded ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_model(mlflow_server) -> str:
    name = f"hardening-plain-{secrets.token_hex(3)}"
    mlflow_model(mlflow_server.url, name, 2)
    yield name
    delete_mlflow_model(mlflow_server.url, name)


@pytest.mark.parametrize(
    "body",
    [
        {"tags": {"k" * 251: "v"}},
        {"tags": {"k": "v" * 5001}},
        {"tags": {f"k{i}": "v" for i in range(101)}},
        {"description": "d" * 5001},
    ],
)
def test_patch_bodies_are_bounded_as_mlflow_columns_are(writer, plain_model, body):
    assert writer.patch(f"/models/{plain_model}/1", json=body).status_code == 422


def test_strings_and_numbers_at_their_bounds(writer, reader, plain_model):
    at_bounds = writer.patch(
        f"/models/{plain_model}/1", json={"tags": {"k" * 250: "v" * 5000}, "description": "d" * 5000}
    )
    assert at_bounds.status_code == 200, at_bounds.text
    register = {"model_data": "models:/m-" + "0" * 32, "model_type": "c", "model_name": "bounded"}
    assert writer.post("/models/register", json={**register, "metadata": {"note": "n" * 5001}}).status_code == 422
    assert writer.post("/models/register", json={**register, "metadata": {"k" * 251: "v"}}).status_code == 422
    assert writer.post("/models/register", json={**register, "model_data": "x" * 1001}).status_code == 422
    assert reader.get("/models/", params={"name": "n" * 257}).status_code == 422

    impact = "/models/contributors/0x" + "ab" * 20 + "/impact"
    for params in ({"offset": 2**63}, {"offset": -1}, {"limit": 0}, {"limit": 1001}, {"offset": "9" * 30}):
        assert reader.get(impact, params=params).status_code == 422, params
    assert reader.get(impact, params={"offset": 2**63 - 1}).status_code == 200

    predictions = f"/models/{plain_model}/1/predictions"
    for params in ({"end": "9999-12-31"}, {"start": "0001-01-01"}, {"start": "0001-01-01", "end": "9999-12-31"}):
        answer = reader.get(predictions, params=params)
        assert answer.status_code == 200 and answer.json()["total_requests"] == 0, (params, answer.text)
    assert reader.get(predictions, params={"end": "10000-01-01"}).status_code == 422

    compare = {"model1": f"{plain_model}:1", "model2": f"{plain_model}:2"}
    assert reader.get("/models/compare", params={**compare, "tolerance": "nan"}).status_code == 422
    assert reader.get("/models/compare", params={**compare, "model1": "m" * 600 + ":1"}).status_code == 422
    assert reader.get("/models/compare", params={**compare, "model2": f"{plain_model}:{2**40}"}).status_code == 404


# --- parallel changes to one model take turns ---------------------------------------------------------------


async def promote_all(base_url: str, key: str, name: str, versions: list[int]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        return await asyncio.gather(
            *(
                client.post(
                    f"/models/{name}/{version}/transition", json={"stage": "Production", "archive_existing": True}
                )
                for version in versions
            )
        )


def production_versions(reader, name: str) -> list[dict]:
    listed = reader.get("/models/", params={"name": name, "max_results": 1000, "include": "aliases"}).json()["models"]
    return [m for m in listed if m["stage"] == "Production"]


def assert_one_in_production(reader, name: str, answers: list[httpx.Response]) -> None:
    in_production = production_versions(reader, name)
    assert len(in_production) == 1, [m["version"] for m in in_production]  # was 7 or 8 of 10
    assert in_production[0]["aliases"] == ["production"]
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers if a.status_code != 200]


def test_ten_parallel_transitions_leave_exactly_one_version_in_production(service, keys, reader, mlflow_server):
    name = f"hardening-race-{secrets.token_hex(3)}"
    mlflow_model(mlflow_server.url, name, 10)
    try:
        answers = asyncio.run(promote_all(service.base_url, keys["write"], name, list(range(1, 11))))
        assert_one_in_production(reader, name, answers)
    finally:
        delete_mlflow_model(mlflow_server.url, name)


def test_racing_writes_to_one_model_never_leak_sql(service, keys, reader, mlflow_server):
    """Parallel alias and tag writes raced inside MLflow (`(sqlite3.IntegrityError) UNIQUE constraint failed ...`
    relayed as a 400); they now take turns, and a race that still happens is retried, then a clean 409."""
    name = f"hardening-alias-{secrets.token_hex(3)}"
    mlflow_model(mlflow_server.url, name, 3)

    async def race(client: httpx.AsyncClient, round_: int) -> list[httpx.Response]:
        aliases = [
            client.post(
                "/models/batch",
                json={"operations": [{"action": "set_alias", "model": f"{name}:{1 + i % 3}", "alias": f"a{round_}"}]},
            )
            for i in range(10)
        ]
        tags = [client.patch(f"/models/{name}/1", json={"tags": {f"t{round_}": str(i)}}) for i in range(10)]
        return await asyncio.gather(*aliases, *tags)

    async def main() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {keys['write']}"}
        # Idle connections are dropped before the server's 5 s keep-alive ends: a round's writes take turns for
        # seconds, and a POST sent on a connection the server is closing fails with no answer (not retried).
        limits = httpx.Limits(keepalive_expiry=2.0)
        async with httpx.AsyncClient(base_url=service.base_url, headers=headers, timeout=120, limits=limits) as client:
            return [answer for round_ in range(3) for answer in await race(client, round_)]

    try:
        answers = asyncio.run(main())
        for answer in answers:
            assert answer.status_code in (200, 409), answer.text
            assert "sqlite3" not in answer.text and "[SQL:" not in answer.text and "IntegrityError" not in answer.text
            if answer.request.method == "POST":
                assert answer.json()["successful"] == 1, answer.text
    finally:
        delete_mlflow_model(mlflow_server.url, name)


@pytest.mark.redis
def test_transitions_take_turns_across_service_processes_with_redis(start_service, mlflow_server, redis_url):
    """Two service processes on one Redis: the lock is Redis's, so requests to either process serialize."""
    # One deployment: the same Redis prefix (by default it derives from the database, and each test service has a
    # SQLite database of its own).
    shared = {"mlflow_url": mlflow_server.url, "redis_url": redis_url, "redis_prefix": f"hk-{secrets.token_hex(4)}:"}
    first = start_service(process=True, **shared)
    second = start_service(process=True, **shared)
    name = f"hardening-redis-{secrets.token_hex(3)}"
    mlflow_model(mlflow_server.url, name, 10)

    first_key, second_key = new_key(first, "write"), new_key(second, "write")

    async def both() -> list[httpx.Response]:
        odd, even = await asyncio.gather(
            promote_all(first.base_url, first_key, name, [1, 3, 5, 7, 9]),
            promote_all(second.base_url, second_key, name, [2, 4, 6, 8, 10]),
        )
        return odd + even

    try:
        answers = asyncio.run(both())
        with first.client(new_key(first, "read")) as reader:
            assert_one_in_production(reader, name, answers)
    finally:
        delete_mlflow_model(mlflow_server.url, name)


@pytest.mark.redis
@pytest.mark.anyio
async def test_model_locks_on_one_redis_exclude_each_other_across_instances(redis_url):
    """Two ModelLocks on one Redis stand for two service processes: a model is held by one of them at a time."""
    from redis.asyncio import Redis

    from hokusai.server.registry.locks import ModelLocks

    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url)]
    locks = [ModelLocks(client) for client in clients]
    name = f"lock-{secrets.token_hex(3)}"
    holding, most = 0, 0

    async def change(lock: ModelLocks) -> None:
        nonlocal holding, most
        async with lock.hold(name):
            holding += 1
            most = max(most, holding)
            await asyncio.sleep(0.02)
            holding -= 1

    try:
        await asyncio.gather(*(change(locks[i % 2]) for i in range(10)))
        assert most == 1
        async with locks[0].hold(name), locks[1].hold(name + "-other"):
            pass  # different models do not wait on each other
        assert locks[0]._local == {} and locks[1]._local == {}  # nothing kept per name once released
    finally:
        for client in clients:
            await client.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_model_lock_outlives_its_ttl_while_held_and_frees_soon_after_its_holder_dies(redis_url):
    """A live holder renews the Redis lock (a slow change keeps its turn); a killed one stops renewing, so the model
    is free again within one TTL instead of being stuck for a minute."""
    from redis.asyncio import Redis

    from hokusai.server.registry.locks import ModelBusy, ModelLocks

    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url)]
    holder, other = ModelLocks(clients[0], ttl=0.3, wait=0.1), ModelLocks(clients[1], ttl=0.3, wait=0.1)
    name = f"lock-{secrets.token_hex(3)}"
    try:
        async with holder.hold(name):
            await asyncio.sleep(1.0)  # more than three TTLs
            with pytest.raises(ModelBusy):
                async with other.hold(name):
                    pass
        # A holder killed mid-change: its lock is taken and never renewed nor released.
        dead = clients[0].lock(holder._key_prefix + hashlib.sha256(name.encode()).hexdigest(), timeout=0.3)
        assert await dead.acquire(blocking=False)
        waiting = ModelLocks(clients[1], ttl=0.3, wait=5.0)
        async with waiting.hold(name):  # answered once the dead holder's TTL ran out, not after `wait`
            pass
    finally:
        for client in clients:
            await client.aclose()
