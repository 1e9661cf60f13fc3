"""The dashboard (/ui/) over HTTP against the real service and MLflow, on the analytics scenario.

Every number a page is checked for comes from what the scenario logged or from the JSON API of the same service:
a page showing constants, or numbers of its own, fails here. Pages are loaded with the API key in the header (the
same guard a signed-in browser's session passes).
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.html_page import Element, parse
from tests.support import benchmark_metadata, run_analytics_scenario

MODEL = "dashboard-classifier"
# Lowercase hex: accepted without an EIP-55 checksum; the service keeps the checksummed form.
CONTRIBUTOR = "0x" + "d45b0a4d" * 5
ESCAPED_MODEL = "dashboard-<b>&-escape"


def page(client, path: str, status: int = 200, **params) -> Element:
    answer = client.get(path, params=params or None)
    assert answer.status_code == status, answer.text[:2000]
    assert answer.headers["content-type"].startswith("text/html"), answer.headers
    return parse(answer.text)


def register(writer, model_uri: str, name: str, metadata: dict) -> dict:
    body = {"model_data": model_uri, "model_type": "classifier", "model_name": name, "metadata": metadata}
    answer = writer.post("/models/register", json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def scenario(service, keys, writer) -> dict:
    """Two trained versions of MODEL: v1 without a contributor, v2 (the better one) contributed by CONTRIBUTOR."""
    logged = run_analytics_scenario(service, keys["write"], MODEL)
    versions = [
        register(writer, version["model_uri"], MODEL, benchmark_metadata(version, CONTRIBUTOR if index else None))
        for index, version in enumerate(logged["versions"])
    ]
    assert [v["version"] for v in versions] == ["1", "2"]
    return logged


@pytest.fixture(scope="module")
def contributor(reader, scenario) -> dict:
    answer = reader.get(f"/models/contributors/{CONTRIBUTOR}/impact")
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_assets_are_public_and_shipped(service):
    with service.client() as anonymous:
        css = anonymous.get("/ui/static/hokusai.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert ":focus-visible" in css.text


def test_the_models_page_lists_each_model_with_its_latest_and_production_versions(reader, scenario):
    document = page(reader, "/ui/", q=MODEL)
    row = document.one("tr", data_model=MODEL)
    assert row.one("td", data_latest=True).attrs["data-latest"] == "2"
    assert row.one("td", data_production=True).attrs["data-production"] == ""
    assert row.find("a", href=f"/ui/models/{MODEL}") is not None
    assert row.find("a", href=f"/mlflow/#/models/{MODEL}") is not None
    # The search keeps models whose name holds the text, in any case, and only those.
    assert page(reader, "/ui/", q=MODEL.upper()).find("tr", data_model=MODEL) is not None
    nothing = page(reader, "/ui/", q="no-model-has-this-name-" + MODEL)
    assert nothing.find("tr", data_model=True) is None
    # Landmarks, the skip link and the navigation with the key's name and scopes.
    everything = page(reader, "/ui/")
    assert everything.find("a", class_="skip-link", href="#main") is not None
    assert everything.find("main", id="main") is not None and everything.find("header") is not None
    nav = everything.one("nav", aria_label="Main")
    assert [a.attrs["href"] for a in nav.find_all("a")] == [
        "/ui/",
        "/ui/contributors",
        "/ui/dspy",
        "/ui/health",
        "/mlflow/",
    ]
    assert "read" in everything.one("p", class_="signed-in").text
    sign_out = everything.one("form", action="/logout")
    assert sign_out.find("input", type="hidden", name="csrf_token") is not None


def test_the_improvement_chart_plots_each_versions_benchmark_and_marks_contributions(reader, scenario, contributor):
    document = page(reader, f"/ui/models/{MODEL}")
    chart = document.one("figure", id="improvement-chart")
    svg = chart.one("svg")
    assert svg.attrs["role"] == "img" and svg.find("title") is not None and svg.find("desc") is not None
    points = {g.attrs["data-version"]: g for g in svg.find_all("g", data_version=True)}
    assert sorted(points) == ["1", "2"]
    for number, version in zip(("1", "2"), scenario["versions"], strict=True):
        assert float(points[number].attrs["data-value"]) == pytest.approx(version["metrics"]["val_accuracy"])
    # v2 names the contributor: it is marked, with the address as the service checksums it.
    assert "data-marked" not in points["1"].attrs
    assert points["2"].attrs["data-marked"] == "true"
    assert points["2"].attrs["data-contributors"] == contributor["address"]
    # The axes are labelled, and a table says the same in text.
    assert "val_accuracy" in svg.text and "Version" in svg.text
    assert chart.find("table") is not None and chart.find("caption") is not None


def test_the_model_page_shows_versions_metrics_contributors_and_mlflow_links(reader, scenario, contributor):
    document = page(reader, f"/ui/models/{MODEL}")
    table = document.one("table", id="versions-table")
    assert table.find("caption") is not None
    assert all(th.attrs.get("scope") == "col" for th in table.find("thead").find_all("th"))
    rows = table.find_all("tr", data_version=True)
    assert [r.attrs["data-version"] for r in rows] == ["2", "1"]  # newest first
    for row in rows:
        logged = scenario["versions"][int(row.attrs["data-version"]) - 1]
        run = f"/mlflow/#/experiments/{scenario['experiment_id']}/runs/{logged['run_id']}"
        assert row.find("a", href=run) is not None
        assert row.find("a", href=run + "/artifacts") is not None
        assert row.attrs["data-stage"] == "None"
        assert f"{logged['metrics']['val_accuracy']:.4g}" in row.text
    assert rows[0].find("a", href=f"/ui/contributors/{contributor['address']}") is not None
    assert rows[1].find("a", class_="address") is None
    contributors = document.one("table", id="model-contributors-table")
    assert contributors.one("tr", data_address=contributor["address"]).find(
        "a", href=f"/ui/contributors/{contributor['address']}"
    )
    assert document.find("a", href=f"/ui/models/{MODEL}/compare?a=1&b=2") is not None


def test_forms_are_for_write_keys_only(reader, writer, scenario):
    read_view = page(reader, f"/ui/models/{MODEL}")
    assert read_view.find("form", id="stage-form") is None and read_view.find("form", id="tag-form") is None
    write_view = page(writer, f"/ui/models/{MODEL}")
    for form_id in ("stage-form", "alias-form", "tag-form"):
        form = write_view.one("form", id=form_id)
        assert form.attrs["method"] == "post" and form.attrs["action"].startswith(f"/ui/models/{MODEL}/")
        assert form.find("input", type="hidden", name="csrf_token") is not None
        for control in form.find_all("select") + [i for i in form.find_all("input") if i.attrs.get("type") != "hidden"]:
            assert write_view.find("label", for_=control.attrs["id"]) is not None, control.attrs  # every input


def test_a_read_key_cannot_post_a_form(reader, scenario):
    refused = reader.post(f"/ui/models/{MODEL}/stage", data={"version": "1", "stage": "Staging"})
    assert refused.status_code == 403
    assert reader.get(f"/models/{MODEL}/1").json()["stage"] == "None"


def test_a_write_key_promotes_tags_and_aliases_through_the_forms(reader, writer, scenario):
    moved = writer.post(f"/ui/models/{MODEL}/stage", data={"version": "2", "stage": "Production"})
    assert moved.status_code == 303, moved.text
    assert moved.headers["location"].startswith(f"/ui/models/{MODEL}?done=stage")
    registry = reader.get(f"/models/{MODEL}/2").json()
    assert registry["stage"] == "Production" and "production" in registry["aliases"]
    after = page(reader, moved.headers["location"])
    assert after.one("p", role="status").text == "Version 2 moved to stage Production."
    assert after.one("tr", data_version="2").attrs["data-stage"] == "Production"
    listed = page(reader, "/ui/", q=MODEL).one("tr", data_model=MODEL)
    assert listed.one("td", data_production=True).attrs["data-production"] == "2"

    aliased = writer.post(f"/ui/models/{MODEL}/alias", data={"version": "1", "alias": "baseline"})
    assert aliased.status_code == 303, aliased.text
    assert "baseline" in reader.get(f"/models/{MODEL}/1").json()["aliases"]
    assert "baseline" in page(reader, f"/ui/models/{MODEL}").one("tr", data_version="1").attrs["data-aliases"]

    tagged = writer.post(f"/ui/models/{MODEL}/tags", data={"version": "1", "key": "reviewed_by", "value": "<ops>"})
    assert tagged.status_code == 303, tagged.text
    assert reader.get(f"/models/{MODEL}/1").json()["tags"]["reviewed_by"] == "<ops>"

    # Bad form input is a readable page, not a change and not a 500.
    bad = writer.post(f"/ui/models/{MODEL}/alias", data={"version": "1", "alias": "has space"})
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("text/html")
    missing = writer.post(f"/ui/models/{MODEL}/stage", data={"version": "99", "stage": "Staging"})
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")


def test_compare_shows_metrics_side_by_side_with_direction(reader, scenario):
    v1, v2 = (v["metrics"] for v in scenario["versions"])
    api = reader.get("/models/compare", params={"model1": f"{MODEL}:1", "model2": f"{MODEL}:2"}).json()
    document = page(reader, f"/ui/models/{MODEL}/compare", a="1", b="2")
    assert api["recommendation"] in document.one("p", id="recommendation").text
    assert document.one("p", id="recommendation").attrs["data-better"] == "2"
    table = document.one("table", id="compare-table")
    # Higher accuracy and lower error are both better: the same version wins on each.
    assert table.one("tr", data_metric="val_accuracy").attrs["data-verdict"] == "better"
    assert table.one("tr", data_metric="val_error").attrs["data-verdict"] == "better"
    assert f"{v2['val_error'] - v1['val_error']:.4g}" in table.one("tr", data_metric="val_error").text
    bars = {
        bar.attrs["data-metric"]: bar
        for bar in document.one("figure", id="compare-chart").find_all("g", data_metric=True)
    }
    for metric in ("val_accuracy", "val_error", "val_loss", "train_accuracy"):
        assert float(bars[metric].attrs["data-a"]) == pytest.approx(v1[metric])
        assert float(bars[metric].attrs["data-b"]) == pytest.approx(v2[metric])
    assert bars["val_error"].attrs["data-tone"] == "better" and float(bars["val_error"].attrs["data-value"]) > 0
    # Without versions: the latest two.
    latest = page(reader, f"/ui/models/{MODEL}/compare")
    assert latest.one("select", id="compare-b").one("option", selected=True).attrs["value"] == "2"


def test_the_leaderboard_follows_the_impact_numbers(reader, scenario, contributor):
    api = reader.get("/models/contributors", params={"limit": 1000}).json()
    document = page(reader, "/ui/contributors", limit="200")
    rows = document.one("table", id="leaderboard-table").find_all("tr", data_address=True)
    expected = api["contributors"][:200]
    assert [r.attrs["data-address"] for r in rows] == [c["address"] for c in expected]
    assert [int(r.attrs["data-rank"]) for r in rows] == [c["rank"] for c in expected]
    mine = document.one("tr", data_address=contributor["address"])
    assert float(mine.attrs["data-score"]) == pytest.approx(contributor["total_improvement_score"])
    assert mine.find("a", href=f"/ui/models/{MODEL}") is not None  # the model it improved
    # Pages: one address a page, the second page starts at rank 2.
    if api["total"] > 1:
        second = page(reader, "/ui/contributors", limit="1", offset="1")
        assert [r.attrs["data-rank"] for r in second.find_all("tr", data_rank=True)] == ["2"]
        assert second.find("a", rel="prev") is not None


def test_the_contributor_page_shows_impact_and_contributions_over_time(reader, scenario, contributor):
    document = page(reader, f"/ui/contributors/{contributor['address']}")
    impact = document.one("dl", id="impact")
    assert float(impact.one("dd", data_value=True).attrs["data-value"]) == pytest.approx(
        contributor["total_improvement_score"]
    )
    rows = document.one("table", id="contributions-table").find_all("tr", data_model=True)
    assert [(r.attrs["data-model"], r.attrs["data-version"]) for r in rows] == [
        (c["model_name"], c["version"]) for c in contributor["contributions"]
    ]
    points = document.one("figure", id="impact-chart").find_all("g", data_model=True)
    assert len(points) == contributor["total_contributions"]
    assert float(points[-1].attrs["data-value"]) == pytest.approx(contributor["total_improvement_score"])
    # The same page answers for the lowercase form of the address.
    assert page(reader, f"/ui/contributors/{CONTRIBUTOR}").find("dl", id="impact") is not None


def test_dspy_and_health_pages_show_the_services_state(reader):
    stats = reader.get("/api/v1/dspy/stats").json()
    dspy = page(reader, "/ui/dspy")
    assert str(stats["statistics"]["total_executions"]) in dspy.one("dl", id="dspy-totals").text
    status = reader.get("/health/status").json()
    health = page(reader, "/ui/health")
    checks = {row.attrs["data-check"]: row.attrs["data-status"] for row in health.find_all("tr", data_check=True)}
    assert checks["database"] == status["services"]["database"] == "healthy"
    assert checks["mlflow"] == status["services"]["mlflow"] == "healthy"
    assert checks["redis"] == status["services"]["redis"]
    assert health.one("dl", id="breaker").attrs["data-state"] == status["mlflow"]["circuit_breaker"]["state"]
    assert health.one("p", id="overall").attrs["data-status"] == status["overall_health"]


def test_unknown_things_and_bad_parameters_are_html_error_pages(reader, scenario):
    for path, status in (
        ("/ui/models/no-such-dashboard-model", 404),
        (f"/ui/models/{MODEL}/compare?a=1&b=99", 404),
        (f"/ui/models/{MODEL}/compare?a=x", 422),
        ("/ui/contributors/0x" + "0" * 39 + "1", 404),  # a valid address with no contributions
        ("/ui/contributors/not-an-address", 400),
        ("/ui/contributors?limit=0", 422),
        ("/ui/?offset=-1", 422),
    ):
        answer = reader.get(path)
        assert answer.status_code == status, (path, answer.status_code, answer.text[:500])
        assert answer.headers["content-type"].startswith("text/html"), path
        assert parse(answer.text).find(role="alert") is not None, path


def test_every_value_is_escaped(reader, writer, scenario):
    register(writer, scenario["versions"][0]["model_uri"], ESCAPED_MODEL, benchmark_metadata(scenario["versions"][0]))
    answer = reader.get(f"/ui/models/{quote(ESCAPED_MODEL, safe='')}")
    assert answer.status_code == 200, answer.text[:500]
    assert "<b>&" not in answer.text and "dashboard-&lt;b&gt;&amp;-escape" in answer.text
    listed = reader.get("/ui/", params={"q": "<b>&"})
    assert "<b>&" not in listed.text and parse(listed.text).find("tr", data_model=ESCAPED_MODEL) is not None
