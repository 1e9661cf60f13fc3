"""charts.py: the dashboard's inline SVG charts, from values to markup (pure functions, no service)."""

from __future__ import annotations

import math

import pytest

from hokusai.server.web.dashboard.charts import Bar, ChartPoint, bar_chart, format_number, line_chart, nice_ticks
from tests.html_page import parse


@pytest.mark.parametrize(
    ("low", "high"),
    [(0.61, 0.93), (0.0, 1.0), (-3.2, 7.9), (1234.0, 98765.0), (0.5, 0.5), (-2.0, -2.0), (0.0, 0.0), (1e-7, 3e-7)],
)
def test_ticks_are_round_and_cover_the_values(low, high):
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high and ticks[-1] > ticks[0]
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert len(steps) == 1  # evenly spaced
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5))
    assert 2 <= len(ticks) <= 12


def test_ticks_refuse_what_cannot_be_drawn():
    with pytest.raises(ValueError):
        nice_ticks(0, math.inf)


def test_a_line_chart_carries_every_point_as_data_and_in_a_table():
    points = [
        ChartPoint("v1", 0.61, data={"version": "1"}),
        ChartPoint("v2", 0.93, marked=True, note="contributed by 0xabc", data={"version": "2"}),
        ChartPoint("v3", 0.88, data={"version": "3"}),
    ]
    figure = parse(line_chart("c", points, "Accuracy", "Accuracy of each version", "Version", "accuracy"))
    svg = figure.one("svg")
    assert svg.attrs["role"] == "img" and svg.attrs["aria-labelledby"] == "c-title c-desc"
    assert svg.one("title", id="c-title").text == "Accuracy"
    assert svg.one("desc", id="c-desc").text == "Accuracy of each version"
    drawn = svg.find_all("g", data_version=True)
    assert [(g.attrs["data-version"], float(g.attrs["data-value"])) for g in drawn] == [
        ("1", 0.61),
        ("2", 0.93),
        ("3", 0.88),
    ]
    assert [g.attrs.get("data-marked") for g in drawn] == [None, "true", None]
    assert drawn[1].find("rect") is not None and drawn[0].find("circle") is not None  # a distinct marker
    # Points run left to right, and a higher value sits higher (a smaller y).
    xs = [float(g.find("circle", cx=True).attrs["cx"]) for g in (drawn[0], drawn[2])]
    assert xs[0] < xs[1]
    ys = {g.attrs["data-version"]: float(g.find("circle", cy=True).attrs["cy"]) for g in (drawn[0], drawn[2])}
    assert ys["3"] < ys["1"]
    assert svg.find("polyline") is not None
    # Axis titles and the text alternative.
    texts = [t.text for t in svg.find_all("text")]
    assert "Version" in texts and "accuracy" in texts and "v1" in texts
    rows = figure.one("table").find("tbody").find_all("tr")
    assert [r.find("th").text for r in rows] == ["v1", "v2", "v3"]
    assert "contributed by 0xabc" in rows[1].text


def test_a_numeric_x_axis_spaces_points_by_their_values():
    points = [ChartPoint("a", 1, x=0), ChartPoint("b", 2, x=1), ChartPoint("c", 3, x=10)]
    drawn = parse(line_chart("t", points, "T", "d", "x", "y")).find_all("g", data_value=True)
    a, b, c = (float(g.find("circle").attrs["cx"]) for g in drawn)
    assert (b - a) * 5 < (c - b)


def test_text_is_escaped_everywhere():
    hostile = '<script>alert("x")</script>&'
    points = [ChartPoint(hostile, 1.0, marked=True, note=hostile, data={"version": hostile, 'bad"name': "v"})]
    markup = str(line_chart("e", points, hostile, hostile, hostile, hostile, marked_label=hostile))
    assert "<script>" not in markup and "&lt;script&gt;" in markup
    assert 'bad"name' not in markup
    bars = str(bar_chart("b", [Bar(hostile, -1.0, note=hostile, data={"metric": hostile})], hostile, hostile, hostile))
    assert "<script>" not in bars


def test_no_values_is_a_message_not_an_empty_chart():
    markup = str(line_chart("n", [ChartPoint("v1", math.nan)], "Nothing", "d", "x", "y"))
    assert "<svg" not in markup and "No values" in markup
    assert "<svg" not in str(bar_chart("n", [], "Nothing", "d", "v"))


def test_one_point_and_equal_values_are_drawn():
    one = parse(line_chart("o", [ChartPoint("v1", 0.5)], "One", "d", "x", "y"))
    assert len(one.find_all("g", data_value=True)) == 1 and one.find("polyline") is None
    flat = parse(line_chart("f", [ChartPoint("v1", 2.0), ChartPoint("v2", 2.0)], "Flat", "d", "x", "y"))
    ys = {float(c.attrs["cy"]) for c in flat.find_all("circle")}
    assert len(ys) == 1 and all(math.isfinite(y) for y in ys)


def test_bars_extend_from_zero_both_ways_with_their_tone():
    bars = [
        Bar("accuracy", 12.5, tone="better", data={"metric": "accuracy"}),
        Bar("loss", -30.0, tone="worse", data={"metric": "loss"}),
    ]
    figure = parse(bar_chart("b", bars, "Change", "How each metric changed", "Change (%)"))
    drawn = {g.attrs["data-metric"]: g for g in figure.find_all("g", data_metric=True)}
    assert drawn["accuracy"].has_class("chart-bar-better") and drawn["loss"].has_class("chart-bar-worse")
    assert float(drawn["loss"].attrs["data-value"]) == -30.0
    better, worse = (drawn[m].find("rect") for m in ("accuracy", "loss"))
    zero = float(better.attrs["x"])
    assert math.isclose(float(worse.attrs["x"]) + float(worse.attrs["width"]), zero)  # ends at zero
    assert float(worse.attrs["width"]) > float(better.attrs["width"])  # 30 is longer than 12.5
    assert figure.one("svg").find("title").text == "Change"
    assert [r.find("th").text for r in figure.one("table").find("tbody").find_all("tr")] == ["accuracy", "loss"]


def test_numbers_are_short():
    assert format_number(0.876543) == "0.8765"
    assert format_number(0) == "0"
    assert format_number(12345678) == "1.235e+07"
    assert format_number(-0.25) == "-0.25"
