"""Server-side charts: inline SVG built from plain values, so a page needs no JavaScript and no network.

Each chart is a `<figure>` holding the SVG (a `<title>`, a `<desc>`, labelled axes, and every point or bar carrying
its values in `data-*` attributes that tests and browser scripts read back) and a text alternative: a table of the
same values, for screen readers and for anyone who prefers numbers. Pure functions: values in, markup out; every
piece of text is escaped here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from markupsafe import Markup, escape

Tone = Literal["better", "worse", "neutral"]

# The drawing area inside the SVG's viewBox; the figure scales with its container (width: 100%).
WIDTH = 640
HEIGHT = 320
MARGIN_LEFT = 72
MARGIN_RIGHT = 24
MARGIN_TOP = 24
MARGIN_BOTTOM = 64
MAX_X_LABELS = 12  # more points than this: only every n-th x label is written, so they do not overlap


@dataclass(frozen=True)
class ChartPoint:
    """One point of a line chart. `x` places it on a numeric axis (a time, say); None spaces points evenly.
    `marked` points are drawn with a distinct marker (a contribution) and named in `note`."""

    label: str
    value: float
    x: float | None = None
    marked: bool = False
    note: str = ""
    data: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Bar:
    """One bar of a horizontal bar chart (negative values extend left of zero)."""

    label: str
    value: float
    tone: Tone = "neutral"
    note: str = ""
    data: Mapping[str, str] = field(default_factory=dict)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2, 2.5 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("tick bounds must be finite")
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw_step = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value < high + step * 0.5:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def format_number(value: float) -> str:
    """Short and exact enough for an axis or a label: 4 significant digits, no trailing zeros."""
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"


def _attributes(data: Mapping[str, str]) -> str:
    """`data-*` attributes, names reduced to safe characters and values escaped."""
    parts = []
    for name, value in data.items():
        safe_name = "".join(c for c in name.lower() if c.isalnum() or c == "-")
        if safe_name:
            parts.append(f' data-{safe_name}="{escape(value)}"')
    return "".join(parts)


def _finite(points: Sequence[ChartPoint]) -> list[ChartPoint]:
    return [p for p in points if math.isfinite(p.value) and (p.x is None or math.isfinite(p.x))]


def _no_data(title: str, message: str) -> Markup:
    return Markup('<figure class="chart chart-empty"><figcaption>{}</figcaption><p>{}</p></figure>').format(
        title, message
    )


def line_chart(
    chart_id: str,
    points: Sequence[ChartPoint],
    title: str,
    description: str,
    x_label: str,
    y_label: str,
    marked_label: str = "marked",
    from_zero: bool = False,
) -> Markup:
    """A line through the points in order, with y ticks, x labels, both axis titles, and a table alternative.

    `chart_id` makes the ids of the title and description unique on the page (a page may hold several charts);
    `from_zero` puts 0 on the y axis (a running total), else the axis spans the values (small changes show).
    """
    shown = _finite(points)
    if not shown:
        return _no_data(title, "No values to chart yet.")
    plot_width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_height = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    values = [p.value for p in shown] + ([0.0] if from_zero else [])
    ticks = nice_ticks(min(values), max(values))
    y_low, y_high = ticks[0], ticks[-1]

    def y_of(value: float) -> float:
        return MARGIN_TOP + plot_height * (1 - (value - y_low) / (y_high - y_low))

    numeric_x = all(p.x is not None for p in shown)
    if numeric_x:
        xs = [p.x for p in shown]  # type: ignore[misc]
        x_low, x_high = min(xs), max(xs)  # type: ignore[type-var]
        span = (x_high - x_low) or 1.0
        positions = [
            MARGIN_LEFT + plot_width * (((p.x - x_low) / span) if x_high != x_low else 0.5)  # type: ignore[operator]
            for p in shown
        ]
    elif len(shown) == 1:
        positions = [MARGIN_LEFT + plot_width / 2]
    else:
        positions = [MARGIN_LEFT + plot_width * i / (len(shown) - 1) for i in range(len(shown))]

    title_id, desc_id = f"{chart_id}-title", f"{chart_id}-desc"
    svg = [
        f'<svg class="chart-svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{escape(title_id)} {escape(desc_id)}" data-chart="line">',
        f'<title id="{escape(title_id)}">{escape(title)}</title>',
        f'<desc id="{escape(desc_id)}">{escape(description)}</desc>',
    ]
    # Grid lines and y tick labels.
    for tick in ticks:
        y = y_of(tick)
        svg.append(
            f'<line class="chart-grid" x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="chart-tick" x="{MARGIN_LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(format_number(tick))}</text>"
        )
    # Axes.
    bottom = HEIGHT - MARGIN_BOTTOM
    svg.append(
        f'<line class="chart-axis" x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT}" y1="{MARGIN_TOP}" y2="{bottom}"/>'
        f'<line class="chart-axis" x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{bottom}" y2="{bottom}"/>'
    )
    # X labels (thinned when crowded; the first and last always shown).
    every = max(1, math.ceil(len(shown) / MAX_X_LABELS))
    for index, (point, x) in enumerate(zip(shown, positions, strict=True)):
        if index % every == 0 or index == len(shown) - 1:
            # A label at an edge of the plot is anchored inside it, so it is not cut off.
            anchor = "start" if x - MARGIN_LEFT < 30 else "end" if WIDTH - MARGIN_RIGHT - x < 30 else "middle"
            svg.append(
                f'<text class="chart-tick" x="{x:.1f}" y="{bottom + 18}" text-anchor="{anchor}">'
                f"{escape(point.label)}</text>"
            )
    # Axis titles.
    svg.append(
        f'<text class="chart-axis-title" x="{MARGIN_LEFT + plot_width / 2:.1f}" y="{HEIGHT - 12}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
        f'<text class="chart-axis-title" transform="translate(16 {MARGIN_TOP + plot_height / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    # The line, then the points above it.
    if len(shown) > 1:
        path = " ".join(f"{x:.1f},{y_of(p.value):.1f}" for p, x in zip(shown, positions, strict=True))
        svg.append(f'<polyline class="chart-line" points="{path}"/>')
    for point, x in zip(shown, positions, strict=True):
        y = y_of(point.value)
        tip = f"{point.label}: {format_number(point.value)}" + (f" ({point.note})" if point.note else "")
        data = {"label": point.label, "value": repr(float(point.value)), **point.data}
        if point.marked:
            data["marked"] = "true"
            svg.append(
                f'<g class="chart-point chart-point-marked"{_attributes(data)}><title>{escape(tip)}</title>'
                f'<rect x="{x - 6:.1f}" y="{y - 6:.1f}" width="12" height="12" transform="rotate(45 {x:.1f} {y:.1f})"/>'
                "</g>"
            )
        else:
            svg.append(
                f'<g class="chart-point"{_attributes(data)}><title>{escape(tip)}</title>'
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5"/></g>'
            )
    svg.append("</svg>")
    legend = ""
    if any(p.marked for p in shown):
        legend = (
            '<p class="chart-legend"><span class="legend-point" aria-hidden="true"></span> value '
            f'<span class="legend-marked" aria-hidden="true"></span> {escape(marked_label)}</p>'
        )
    rows = "".join(
        f'<tr><th scope="row">{escape(p.label)}</th><td class="num">{escape(format_number(p.value))}</td>'
        f"<td>{escape(_note(p, marked_label))}</td></tr>"
        for p in shown
    )
    table = (
        f'<details class="chart-data"><summary>{escape(title)}: the values as a table</summary>'
        f'<div class="table-scroll" tabindex="0" role="region" aria-label="{escape(title)}: values">'
        f"<table><caption>{escape(title)}</caption>"
        f'<thead><tr><th scope="col">{escape(x_label)}</th><th scope="col">{escape(y_label)}</th>'
        f'<th scope="col">Note</th></tr></thead><tbody>{rows}</tbody></table></div></details>'
    )
    # Every text above went through escape(); the rest are numbers this function formatted.
    return Markup(  # noqa: S704
        f'<figure class="chart" id="{escape(chart_id)}"><figcaption>{escape(title)}</figcaption>'
        f"{''.join(svg)}{legend}{table}</figure>"
    )


BAR_HEIGHT = 22
BAR_GAP = 12
BAR_LABEL_WIDTH = 160
BAR_VALUE_ROOM = 72  # room right of the longest bar for its value label


def bar_chart(chart_id: str, bars: Sequence[Bar], title: str, description: str, value_label: str) -> Markup:
    """Horizontal bars from a zero line (negative values to its left), each labelled with its value, and a table
    alternative. The tone colours a bar, and is said in words too (the table, the bar's tooltip)."""
    shown = [b for b in bars if math.isfinite(b.value)]
    if not shown:
        return _no_data(title, "No values to chart.")
    low = min(0.0, *(b.value for b in shown))
    high = max(0.0, *(b.value for b in shown))
    ticks = nice_ticks(low, high)
    v_low, v_high = ticks[0], ticks[-1]
    left = BAR_LABEL_WIDTH
    plot_width = WIDTH - left - MARGIN_RIGHT - BAR_VALUE_ROOM
    top = MARGIN_TOP
    plot_height = len(shown) * (BAR_HEIGHT + BAR_GAP)
    height = top + plot_height + MARGIN_BOTTOM

    def x_of(value: float) -> float:
        return left + plot_width * (value - v_low) / (v_high - v_low)

    zero = x_of(0.0)
    title_id, desc_id = f"{chart_id}-title", f"{chart_id}-desc"
    svg = [
        f'<svg class="chart-svg" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-labelledby="{escape(title_id)} {escape(desc_id)}" data-chart="bar">',
        f'<title id="{escape(title_id)}">{escape(title)}</title>',
        f'<desc id="{escape(desc_id)}">{escape(description)}</desc>',
    ]
    bottom = top + plot_height
    for tick in ticks:
        x = x_of(tick)
        svg.append(
            f'<line class="chart-grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}"/>'
            f'<text class="chart-tick" x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">'
            f"{escape(format_number(tick))}</text>"
        )
    for index, bar in enumerate(shown):
        y = top + index * (BAR_HEIGHT + BAR_GAP) + BAR_GAP / 2
        start, end = sorted((zero, x_of(bar.value)))
        tip = f"{bar.label}: {format_number(bar.value)}" + (f" ({bar.note})" if bar.note else "")
        data = {"label": bar.label, "value": repr(float(bar.value)), "tone": bar.tone, **bar.data}
        value_x = end + 6 if bar.value >= 0 else start - 6
        anchor = "start" if bar.value >= 0 else "end"
        svg.append(
            f'<g class="chart-bar chart-bar-{escape(bar.tone)}"{_attributes(data)}><title>{escape(tip)}</title>'
            f'<rect x="{start:.1f}" y="{y:.1f}" width="{max(end - start, 1):.1f}" height="{BAR_HEIGHT}"/></g>'
            f'<text class="chart-tick" x="{left - 8}" y="{y + BAR_HEIGHT / 2 + 4:.1f}" text-anchor="end">'
            f"{escape(_shorten(bar.label, 22))}</text>"
            f'<text class="chart-value" x="{value_x:.1f}" y="{y + BAR_HEIGHT / 2 + 4:.1f}" text-anchor="{anchor}">'
            f"{escape(format_number(bar.value))}</text>"
        )
    svg.append(f'<line class="chart-axis" x1="{zero:.1f}" x2="{zero:.1f}" y1="{top}" y2="{bottom}"/>')
    svg.append(
        f'<text class="chart-axis-title" x="{left + plot_width / 2:.1f}" y="{height - 12}" text-anchor="middle">'
        f"{escape(value_label)}</text>"
    )
    svg.append("</svg>")
    rows = "".join(
        f'<tr><th scope="row">{escape(b.label)}</th><td class="num">{escape(format_number(b.value))}</td>'
        f"<td>{escape(b.note or b.tone)}</td></tr>"
        for b in shown
    )
    table = (
        f'<details class="chart-data"><summary>{escape(title)}: the values as a table</summary>'
        f'<div class="table-scroll" tabindex="0" role="region" aria-label="{escape(title)}: values">'
        f"<table><caption>{escape(title)}</caption>"
        f'<thead><tr><th scope="col">Item</th><th scope="col">{escape(value_label)}</th>'
        f'<th scope="col">Note</th></tr></thead><tbody>{rows}</tbody></table></div></details>'
    )
    # Every text above went through escape(); the rest are numbers this function formatted.
    return Markup(  # noqa: S704
        f'<figure class="chart" id="{escape(chart_id)}"><figcaption>{escape(title)}</figcaption>'
        f"{''.join(svg)}{table}</figure>"
    )


def _note(point: ChartPoint, marked_label: str) -> str:
    return ": ".join(part for part in (marked_label if point.marked else "", point.note) if part)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
