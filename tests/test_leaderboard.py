"""The contributors leaderboard (GET /models/contributors): the store on SQLite and PostgreSQL, then over HTTP on the
analytics scenario, where every ranked address must show the numbers of its own impact endpoint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from hokusai import AsyncModelRegistry, ModelRegistry
from hokusai.sdk.models import ContributorLeaderboard, RankedContributor
from hokusai.server.analytics.contributors import ContributionStore, checksum_address
from hokusai.server.analytics.models import ContributionRow
from hokusai.server.registry.inputs import MAX_SQL_INTEGER
from hokusai.server.timestamps import iso
from tests.support import benchmark_metadata, run_analytics_scenario

pytestmark = pytest.mark.anyio

# Two addresses whose checksum forms sort one way byte-wise ("0xB..." < "0xa...") and the other way by value: the
# tie-break is by value (lowercase), the same on SQLite's binary collation and on PostgreSQL's.
LOWER_HEX = "0xa000000000000000000000000000000000000002"
UPPER_HEX = "0xB000000000000000000000000000000000000004"
STEADY = "0x1111111111111111111111111111111111111111"
MIXED = "0x2222222222222222222222222222222222222222"
REGRESSED = "0x3333333333333333333333333333333333333333"
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def contribution(address: str, model: str, version: str, score: float, day: int) -> ContributionRow:
    return ContributionRow(
        address=address,
        model_name=model,
        version=version,
        model_id=None,
        weight=1.0,
        benchmark_metric="accuracy",
        benchmark_value=0.9,
        parent=None,
        parent_value=None,
        improvement_score=score,
        contributed_at=START + timedelta(days=day),
    )


async def record(store: ContributionStore, rows: list[ContributionRow]) -> None:
    """Each row as the contribution of its own version (the store records a version's contributions at once)."""
    for row in rows:
        await store.replace(row.model_name, row.version, [row])


async def test_the_store_ranks_by_positive_improvement(database):
    assert all(checksum_address(a) == a for a in (LOWER_HEX, UPPER_HEX, STEADY, MIXED, REGRESSED))
    store = ContributionStore(database)
    empty = await store.leaderboard(50, 0)
    assert empty.contributors == [] and empty.total == 0

    # Binary fractions, so equal totals are equal floats whatever order the database sums in.
    await record(
        store,
        [
            contribution(UPPER_HEX, "beta", "1", 0.25, 1),
            contribution(UPPER_HEX, "alpha", "1", 0.25, 3),
            contribution(LOWER_HEX, "alpha", "2", 0.5, 2),
            contribution(STEADY, "gamma", "1", 0.125, 4),
            contribution(STEADY, "alpha", "3", -0.5, 5),  # a regression: not counted, and alpha is not improved
            # +0.375 and -0.5 in one model: 0.375 counts, but the model's summed score is negative (not improved).
            contribution(MIXED, "delta", "1", 0.375, 6),
            contribution(MIXED, "delta", "2", -0.5, 7),
            contribution(REGRESSED, "beta", "2", -0.25, 8),
        ],
    )
    board = await store.leaderboard(50, 0)
    assert board.total == 5 and board.limit == 50 and board.offset == 0
    ranked = [(e.rank, e.address, e.total_improvement_score) for e in board.contributors]
    assert ranked == [
        (1, LOWER_HEX, 0.5),  # tied with UPPER_HEX at 0.5: 0xa... comes before 0xB... by value
        (2, UPPER_HEX, 0.5),
        (3, MIXED, 0.375),
        (4, STEADY, 0.125),
        (5, REGRESSED, 0.0),
    ]
    entries = {e.address: e for e in board.contributors}
    assert entries[UPPER_HEX].models_improved == ["alpha", "beta"] and entries[UPPER_HEX].total_models_improved == 2
    assert entries[UPPER_HEX].total_contributions == 2
    assert entries[UPPER_HEX].first_contribution == iso(START + timedelta(days=1))
    assert entries[UPPER_HEX].last_contribution == iso(START + timedelta(days=3))
    assert entries[STEADY].models_improved == ["gamma"] and entries[STEADY].total_contributions == 2
    assert entries[MIXED].models_improved == [] and entries[MIXED].total_models_improved == 0
    assert entries[REGRESSED].models_improved == [] and entries[REGRESSED].total_contributions == 1

    # Every figure is the one the address's impact shows.
    for entry in board.contributors:
        impact = await store.impact(entry.address, 1, 0)
        assert entry.total_improvement_score == impact.total_improvement_score
        assert entry.total_contributions == impact.total_contributions
        assert entry.total_models_improved == impact.total_models_improved
        assert entry.first_contribution == impact.first_contribution
        assert entry.last_contribution == impact.last_contribution


async def test_the_store_pages_keep_the_global_rank(database):
    store = ContributionStore(database)
    addresses = [checksum_address(f"0x{index:040x}") for index in range(1, 8)]
    # Scores 1/8, 2/8, ... so the ranking is the reverse of the creation order; two models for the last address.
    await record(store, [contribution(a, "m", str(i), (i + 1) / 8, i) for i, a in enumerate(addresses)])
    await record(store, [contribution(addresses[-1], "n", "1", 0.125, 9)])
    whole = await store.leaderboard(50, 0)
    assert [e.address for e in whole.contributors] == addresses[::-1]
    assert whole.contributors[0].models_improved == ["m", "n"]
    assert whole.contributors[0].total_improvement_score == 1.0

    pages = [await store.leaderboard(3, offset) for offset in (0, 3, 6)]
    assert [len(page.contributors) for page in pages] == [3, 3, 1]
    assert all(page.total == 7 and page.limit == 3 for page in pages)
    assert [e for page in pages for e in page.contributors] == whole.contributors
    assert [e.rank for e in pages[1].contributors] == [4, 5, 6]
    for offset in (7, MAX_SQL_INTEGER):
        beyond = await store.leaderboard(3, offset)
        assert beyond.contributors == [] and beyond.total == 7 and beyond.offset == offset


# --- over HTTP, on the analytics scenario --------------------------------------------------------------------------

MODEL = "leaderboard-classifier"
OTHER_MODEL = "leaderboard-regressor"
# Addresses of this module alone (in EIP-55 form): the MLflow server is shared by every module, and
# `hokusai contributions rebuild` in test_model_analytics credits whatever versions name its own addresses.
FIRST = "0x1EADE4B0a4d3f1B6c2e8a7D9c0B1A2F3E4d5C6B7"
SECOND = "0x9FB6A2c3d4E5F60718293A4B5C6D7e8f90A1b2C3"
THIRD = "0xc0ffee254729296a45a3885639AC7E10F9d54979"


@pytest.fixture(scope="module")
def board_service(start_service, mlflow_server):
    """A service of its own (its own database), so the leaderboard holds this module's contributions alone."""
    return start_service(mlflow_url=mlflow_server.url, auth_cache_ttl="1")


@pytest.fixture(scope="module")
def board_keys(board_service) -> dict[str, str]:
    made = {}
    with board_service.client(board_service.admin_key) as admin:
        for scope in ("read", "write"):
            answer = admin.post("/api/v1/keys", json={"name": f"leaderboard {scope}", "scopes": [scope]})
            made[scope] = answer.json()["key"]
    return made


@pytest.fixture(scope="module")
def board_reader(board_service, board_keys):
    with board_service.client(board_keys["read"]) as client:
        yield client


@pytest.fixture(scope="module")
def scenario(board_service, board_keys) -> dict:
    """The scenario's two versions, registered so that FIRST and SECOND tie with the same improvement (each made
    the better version on top of the weaker one) and THIRD only regressed or scored nothing:
      MODEL 1 (weaker, FIRST), MODEL 2 (better, FIRST), MODEL 3 (weaker again on 2: SECOND 0.25, THIRD 0.75),
      OTHER_MODEL 1 (weaker, THIRD), OTHER_MODEL 2 (better, SECOND)."""
    logged = run_analytics_scenario(board_service, board_keys["write"], MODEL)
    weaker, better = logged["versions"]
    regression = {
        "benchmark_metric": "val_accuracy",
        "benchmark_value": weaker["metrics"]["val_accuracy"],
        "contributors": [{"address": SECOND, "weight": 0.25}, {"address": THIRD, "weight": 0.75}],
        "parent_version": "2",
    }
    registrations = [
        (MODEL, weaker["model_uri"], benchmark_metadata(weaker, FIRST)),
        (MODEL, better["model_uri"], benchmark_metadata(better, FIRST)),
        (MODEL, weaker["model_uri"], regression),
        (OTHER_MODEL, weaker["model_uri"], benchmark_metadata(weaker, THIRD.lower())),
        (OTHER_MODEL, better["model_uri"], benchmark_metadata(better, SECOND)),
    ]
    with board_service.client(board_keys["write"]) as writer:
        for name, uri, metadata in registrations:
            body = {"model_data": uri, "model_type": "classifier", "model_name": name, "metadata": metadata}
            answer = writer.post("/models/register", json=body)
            assert answer.status_code == 201, answer.text
    return logged


def impact_of(reader, address: str) -> dict:
    answer = reader.get(f"/models/contributors/{address}/impact", params={"limit": 1000})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_leaderboard_equals_each_addresses_impact(board_reader, scenario):
    weaker, better = (v["metrics"]["val_accuracy"] for v in scenario["versions"])
    gain = better - weaker
    answer = board_reader.get("/models/contributors")
    assert answer.status_code == 200, answer.text
    assert answer.headers["ratelimit-policy"].startswith('"route";q=100;w=60')  # the impact's policy
    board = answer.json()
    assert board["total"] == 3 and board["limit"] == 50 and board["offset"] == 0
    tied = sorted([FIRST, SECOND], key=str.lower)
    assert [e["address"] for e in board["contributors"]] == [*tied, THIRD]
    assert [e["rank"] for e in board["contributors"]] == [1, 2, 3]
    entries = {e["address"]: e for e in board["contributors"]}
    assert entries[FIRST]["total_improvement_score"] == pytest.approx(gain)
    assert entries[FIRST]["total_improvement_score"] == entries[SECOND]["total_improvement_score"]
    assert entries[FIRST]["models_improved"] == [MODEL] and entries[FIRST]["total_contributions"] == 2
    # SECOND regressed MODEL (scored negative there) and improved OTHER_MODEL.
    assert entries[SECOND]["models_improved"] == [OTHER_MODEL] and entries[SECOND]["total_contributions"] == 2
    assert entries[THIRD]["total_improvement_score"] == 0 and entries[THIRD]["models_improved"] == []

    for entry in board["contributors"]:
        impact = impact_of(board_reader, entry["address"])
        for figure in (
            "total_improvement_score",
            "total_contributions",
            "total_models_improved",
            "first_contribution",
            "last_contribution",
        ):
            assert entry[figure] == impact[figure], (entry["address"], figure)
        summed: dict[str, float] = {}
        for one in impact["contributions"]:
            summed[one["model_name"]] = summed.get(one["model_name"], 0.0) + one["improvement_score"]
        assert entry["models_improved"] == sorted(name for name, score in summed.items() if score > 0)

    assert board_reader.get("/api/models/contributors").json() == board


def test_leaderboard_pages(board_reader, scenario):
    whole = board_reader.get("/models/contributors").json()["contributors"]
    pages = [board_reader.get("/models/contributors", params={"limit": 2, "offset": o}).json() for o in (0, 2, 4)]
    assert [[e["rank"] for e in page["contributors"]] for page in pages] == [[1, 2], [3], []]
    assert [e for page in pages for e in page["contributors"]] == whole
    assert all(page["total"] == 3 and page["limit"] == 2 for page in pages)
    assert pages[2]["offset"] == 4


def test_leaderboard_access_and_bad_paging(board_service, board_reader, scenario):
    with board_service.client() as anonymous:
        refused = anonymous.get("/models/contributors")
        assert refused.status_code == 401 and refused.json()["detail"], refused.text
    for params in (
        {"limit": 0},
        {"limit": 1001},
        {"limit": "many"},
        {"offset": -1},
        {"offset": 2**63},
        {"offset": "1.5"},
    ):
        refused = board_reader.get("/models/contributors", params=params)
        assert refused.status_code == 422 and refused.json()["detail"], (params, refused.text)


def test_model_routes_are_not_taken_by_the_leaderboard(board_reader, scenario):
    """The leaderboard is one segment: /models/{name}/{version}... still reach the registry, for "contributors"
    as for "compare" (both reserved names, so only a model made in MLflow directly could bear them)."""
    for name in ("contributors", "compare"):
        missing = board_reader.get(f"/models/{name}/1")
        assert missing.status_code == 404, missing.text
        assert name in missing.json()["detail"]  # the registry's "model not found", not a missing route
    assert board_reader.get(f"/models/{MODEL}/2").json()["version"] == "2"


async def test_the_sdk_reads_the_leaderboard(board_service, board_keys, board_reader, scenario):
    expected = board_reader.get("/models/contributors", params={"limit": 2, "offset": 1}).json()
    with ModelRegistry(board_service.base_url, api_key=board_keys["read"]) as registry:
        board = registry.contributor_leaderboard(limit=2, offset=1)
    assert isinstance(board, ContributorLeaderboard) and isinstance(board.contributors[0], RankedContributor)
    assert board.total == expected["total"] and board.offset == 1 and board.limit == 2
    assert [vars(e) for e in board.contributors] == expected["contributors"]
    async with AsyncModelRegistry(board_service.base_url, api_key=board_keys["read"]) as registry:
        assert await registry.contributor_leaderboard(limit=2, offset=1) == board
