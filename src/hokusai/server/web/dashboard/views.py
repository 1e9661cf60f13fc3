"""What each dashboard page shows, built from the same services the JSON routes use (no HTTP calls to ourselves).

Each function returns a plain view model (dataclasses of strings and numbers, charts already rendered): the
templates only lay them out. Domain errors pass through unchanged (`ModelNotFound` is a 404 page, a bad address a
400 page), so the pages and the API say the same things.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar
from urllib.parse import quote

from markupsafe import Markup

from hokusai.server.analytics.contributors import checksum_address
from hokusai.server.analytics.schemas import ContributorImpact, ImprovementStep, VersionLineage
from hokusai.server.analytics.service import ModelAnalytics
from hokusai.server.analytics.versions import MetricDirection
from hokusai.server.config import Settings
from hokusai.server.dspy.service import DspyService
from hokusai.server.errors import HokusaiError, NotFound
from hokusai.server.health.service import HealthSources, overall_status, run_checks
from hokusai.server.registry.schemas import ModelVersionSummary
from hokusai.server.registry.service import RegistryService
from hokusai.server.timestamps import as_utc, from_millis, iso
from hokusai.server.web.dashboard.charts import Bar, ChartPoint, Tone, bar_chart, format_number, line_chart

MLFLOW_UI = "/mlflow/"
VERSIONS_PER_CALL = 1000  # MLflow's page size for model-version searches
# The models page reads at most 10,000 versions (and says so when there are more): what one page load may hold in
# memory and ask of MLflow stays bounded whatever the registry's size, with many readers at once.
MAX_VERSION_PAGES = 10
LINEAGE_CONCURRENCY = 8  # versions whose run is looked up at the same time on a model's page
KEY_METRICS = 5  # metric columns on a model's page: the benchmark metric first, then the latest version's
CONTRIBUTIONS_CHARTED = 1000  # a contributor's newest contributions read for the page and its chart
Item = TypeVar("Item")


class ModelNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"Model not found: {name}")


class ContributorNotFound(NotFound):
    def __init__(self, address: str) -> None:
        super().__init__(f"No contributions recorded for {address}")


# --- links ---------------------------------------------------------------------------------------------------


def model_url(name: str) -> str:
    return f"/ui/models/{quote(name, safe='')}"


def contributor_url(address: str) -> str:
    return f"/ui/contributors/{quote(address, safe='')}"


def mlflow_model_url(name: str, version: str | None = None) -> str:
    base = f"{MLFLOW_UI}#/models/{quote(name, safe='')}"
    return f"{base}/versions/{quote(version, safe='')}" if version else base


def mlflow_run_url(experiment_id: str, run_id: str, tab: str | None = None) -> str:
    url = f"{MLFLOW_UI}#/experiments/{quote(experiment_id, safe='')}/runs/{quote(run_id, safe='')}"
    return f"{url}/{tab}" if tab else url


def short_address(address: str) -> str:
    return f"{address[:6]}\u2026{address[-4:]}" if len(address) > 12 else address


def number(value: float | None) -> str:
    """A metric as the pages show it ("—" when there is none)."""
    return "\u2014" if value is None or not math.isfinite(value) else format_number(value)


def moment(value: str | None) -> str:
    """An ISO 8601 UTC moment, shortened to the minute for tables ("—" when unknown)."""
    if not value:
        return "\u2014"
    return value.replace("T", " ").removesuffix("Z")[:16] + " UTC"


async def bounded(items: Iterable[Item], call: Callable[[Item], Awaitable], limit: int) -> list:
    """`call(item)` for every item, at most `limit` at a time, results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(item: Item):
        async with gate:
            return await call(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


async def every_version(registry: RegistryService, name: str | None) -> tuple[list[ModelVersionSummary], bool]:
    """Every version (of one model, or of all), read through the registry service's cached listing; whether the
    listing stopped at MAX_VERSION_PAGES pages."""
    found: list[ModelVersionSummary] = []
    token: str | None = None
    for _ in range(MAX_VERSION_PAGES):
        page = await registry.list_versions(name, VERSIONS_PER_CALL, token, include_aliases=True)
        found.extend(page.models)
        token = page.next_page_token
        if not token:
            return found, False
    return found, True


def production_of(versions: list[ModelVersionSummary]) -> ModelVersionSummary | None:
    """The version in Production (the newest, if MLflow holds several there), else the one aliased `production`."""
    staged = [v for v in versions if v.stage == "Production"]
    if staged:
        return max(staged, key=lambda v: int(v.version))
    return next((v for v in versions if "production" in v.aliases), None)


# --- models --------------------------------------------------------------------------------------------------


class Paged:
    """A page of a longer listing: where the pager's previous and next links start (None: no such page)."""

    total: int
    offset: int
    limit: int

    @property
    def previous_offset(self) -> int | None:
        return max(0, self.offset - self.limit) if self.offset > 0 else None

    @property
    def next_offset(self) -> int | None:
        return self.offset + self.limit if self.offset + self.limit < self.total else None


@dataclass(frozen=True)
class ModelRow:
    name: str
    url: str
    mlflow_url: str
    versions: int
    latest_version: str
    latest_stage: str
    latest_created: str
    production_version: str | None
    production_how: str  # "stage Production", "alias production" or ""
    aliases: list[str]


@dataclass(frozen=True)
class ModelsPage(Paged):
    query: str
    rows: list[ModelRow]
    total: int  # models matching the query
    offset: int
    limit: int
    truncated: bool  # more versions exist than were read


async def models_page(registry: RegistryService, query: str, offset: int, limit: int) -> ModelsPage:
    versions, truncated = await every_version(registry, None)
    by_model: dict[str, list[ModelVersionSummary]] = {}
    for version in versions:
        by_model.setdefault(version.name, []).append(version)
    needle = query.strip().casefold()
    names = sorted((n for n in by_model if needle in n.casefold()), key=str.casefold)
    rows = []
    for name in names[offset : offset + limit]:
        model_versions = by_model[name]
        latest = max(model_versions, key=lambda v: int(v.version))
        production = production_of(model_versions)
        how = ""
        if production is not None:
            how = "stage Production" if production.stage == "Production" else "alias production"
        rows.append(
            ModelRow(
                name=name,
                url=model_url(name),
                mlflow_url=mlflow_model_url(name),
                versions=len(model_versions),
                latest_version=latest.version,
                latest_stage=latest.stage,
                latest_created=moment(iso(from_millis(latest.created_at))),
                production_version=production.version if production else None,
                production_how=how,
                aliases=sorted({f"{alias} \u2192 v{v.version}" for v in model_versions for alias in v.aliases}),
            )
        )
    return ModelsPage(query, rows, len(names), offset, limit, truncated)


# --- one model -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContributorShareView:
    address: str
    short: str
    url: str
    weight: float


@dataclass(frozen=True)
class VersionRow:
    version: str
    stage: str
    status: str
    aliases: list[str]
    created: str
    metrics: list[str]  # in the order of ModelPage.metric_names ("—" for none)
    benchmark_value: float | None
    improvement: float | None
    parent: str | None
    contributors: list[ContributorShareView]
    run_id: str | None
    run_url: str | None
    artifacts_url: str | None
    mlflow_url: str


@dataclass(frozen=True)
class ModelContributor:
    address: str
    short: str
    url: str
    versions: list[str]
    improvement_score: float  # the direction-aware improvement of their versions, times their weight


@dataclass(frozen=True)
class ModelPage:
    name: str
    url: str
    model_id: str | None
    mlflow_url: str
    compare_url: str | None
    benchmark_metric: str | None
    metric_names: list[str]
    rows: list[VersionRow]  # newest first
    version_numbers: list[str]  # every version, newest first (the forms' choices)
    production_version: str | None
    contributors: list[ModelContributor]
    chart: Markup
    chart_values: list[tuple[str, float]]  # (version, benchmark value), what the chart plots


def _share_views(step: ImprovementStep) -> list[ContributorShareView]:
    return [
        ContributorShareView(share.address, short_address(share.address), contributor_url(share.address), share.weight)
        for share in step.contributors
    ]


def _key_metrics(benchmark: str | None, steps: list[ImprovementStep]) -> list[str]:
    names: list[str] = [benchmark] if benchmark else []
    for step in reversed(steps):  # the newest version's metrics, then older ones', until there are enough
        for metric in sorted(step.metrics):
            if metric not in names:
                names.append(metric)
        if len(names) >= KEY_METRICS:
            break
    return names[:KEY_METRICS]


async def model_page(registry: RegistryService, analytics: ModelAnalytics, name: str) -> ModelPage:
    versions, _ = await every_version(registry, name)
    if not versions:
        raise ModelNotFound(name)
    history = await analytics.lineage.improvement_history(name)
    steps = history.lineage  # oldest first
    by_version = {v.version: v for v in versions}

    async def lineage_of(version: str) -> VersionLineage | None:
        try:
            return await analytics.lineage.version_lineage(name, version)
        except NotFound:  # deleted since it was listed
            return None

    newest_first = sorted(by_version, key=int, reverse=True)
    lineages = dict(zip(newest_first, await bounded(newest_first, lineage_of, LINEAGE_CONCURRENCY), strict=True))
    benchmark = next((s.benchmark_metric for s in reversed(steps) if s.benchmark_metric), None)
    metric_names = _key_metrics(benchmark, steps)

    rows: list[VersionRow] = []
    points: list[ChartPoint] = []
    contributors: dict[str, dict] = {}
    for step in steps:
        summary = by_version.get(step.version)
        if summary is None:
            continue
        metric = step.benchmark_metric
        value = step.metrics.get(metric) if metric else None
        shares = _share_views(step)
        lineage = lineages.get(step.version)
        run_id = lineage.run_id if lineage else None
        experiment = lineage.experiments[0] if lineage and lineage.experiments else None
        rows.append(
            VersionRow(
                version=step.version,
                stage=summary.stage,
                status=summary.status,
                aliases=summary.aliases,
                created=moment(step.created_at),
                metrics=[number(step.metrics.get(m)) for m in metric_names],
                benchmark_value=value,
                improvement=step.improvement,
                parent=step.parent,
                contributors=shares,
                run_id=run_id,
                run_url=mlflow_run_url(experiment, run_id) if experiment and run_id else None,
                artifacts_url=mlflow_run_url(experiment, run_id, "artifacts") if experiment and run_id else None,
                mlflow_url=mlflow_model_url(name, step.version),
            )
        )
        for share in shares:
            entry = contributors.setdefault(share.address, {"share": share, "versions": [], "score": 0.0})
            entry["versions"].append(step.version)
            entry["score"] += (step.improvement or 0.0) * share.weight
        if value is not None and math.isfinite(value):
            note = ", ".join(f"{s.short} ({s.weight:g})" for s in shares)
            points.append(
                ChartPoint(
                    label=f"v{step.version}",
                    value=value,
                    marked=bool(shares),
                    note=f"contributed by {note}" if shares else "",
                    data={
                        "version": step.version,
                        "contributors": " ".join(s.address for s in shares),
                    },
                )
            )
    rows.reverse()
    metric_label = benchmark or "benchmark metric"
    chart = line_chart(
        "improvement-chart",
        points,
        title=f"{metric_label} across versions of {name}",
        description=(
            f"The benchmark metric {metric_label} of each version of {name}, oldest to newest; "
            f"versions with data contributions are drawn as diamonds."
        ),
        x_label="Version",
        y_label=metric_label,
        marked_label="contribution",
    )
    production = production_of(versions)
    version_numbers = [row.version for row in rows]
    compare_url = None
    if len(version_numbers) >= 2:
        compare_url = f"{model_url(name)}/compare?a={version_numbers[1]}&b={version_numbers[0]}"
    return ModelPage(
        name=name,
        url=model_url(name),
        model_id=history.model_id if history.model_id != name else None,
        mlflow_url=mlflow_model_url(name),
        compare_url=compare_url,
        benchmark_metric=benchmark,
        metric_names=metric_names,
        rows=rows,
        version_numbers=version_numbers,
        production_version=production.version if production else None,
        contributors=sorted(
            (
                ModelContributor(
                    address=address,
                    short=entry["share"].short,
                    url=entry["share"].url,
                    versions=entry["versions"],
                    improvement_score=entry["score"],
                )
                for address, entry in contributors.items()
            ),
            key=lambda c: (-c.improvement_score, c.address),
        ),
        chart=chart,
        chart_values=[(p.data["version"], p.value) for p in points],
    )


# --- compare -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    a: str
    b: str
    delta: str
    verdict: str  # "better", "worse", "equal" (for b against a) or "" when a side has no value
    lower_is_better: bool
    benchmark: bool


@dataclass(frozen=True)
class ComparePage:
    name: str
    url: str
    a: str
    b: str
    version_numbers: list[str]
    rows: list[MetricComparison]
    recommendation: str
    metric: str | None
    better: str | None  # the better version's number, None when equivalent or not comparable
    chart: Markup


def _verdict(improvement: float) -> Tone:
    return "better" if improvement > 0 else "worse" if improvement < 0 else "neutral"


async def compare_page(
    registry: RegistryService,
    analytics: ModelAnalytics,
    settings: Settings,
    name: str,
    a: str | None,
    b: str | None,
) -> ComparePage:
    versions, _ = await every_version(registry, name)
    if not versions:
        raise ModelNotFound(name)
    numbers = sorted((v.version for v in versions), key=int, reverse=True)
    b = b or numbers[0]
    a = a or (numbers[1] if len(numbers) > 1 else numbers[0])
    comparison = await analytics.comparisons.compare(f"{name}:{a}", f"{name}:{b}")
    a, b = comparison.model1.version, comparison.model2.version  # as MLflow writes them (`007` -> `7`)
    direction = MetricDirection(settings.lower_is_better)  # the rule the comparison service follows
    first, second = comparison.model1.metrics, comparison.model2.metrics
    rows: list[MetricComparison] = []
    bars: list[Bar] = []
    for metric in sorted(first.keys() | second.keys()):
        lower = direction.lower_is_better(metric)
        before, after = first.get(metric), second.get(metric)
        verdict = ""
        delta = "\u2014"
        if before is not None and after is not None:
            gain = direction.improvement(metric, before, after)
            verdict = {"better": "better", "worse": "worse", "neutral": "equal"}[_verdict(gain)]
            delta = format_number(after - before)
            if before != 0 and math.isfinite(gain):
                relative = gain / abs(before) * 100
                bars.append(
                    Bar(
                        label=metric,
                        value=relative,
                        tone=_verdict(gain),
                        note=f"v{b} {verdict} than v{a} ({'lower' if lower else 'higher'} is better)",
                        data={"metric": metric, "a": repr(before), "b": repr(after)},
                    )
                )
        rows.append(
            MetricComparison(
                metric=metric,
                a=number(before),
                b=number(after),
                delta=delta,
                verdict=verdict,
                lower_is_better=lower,
                benchmark=metric == comparison.metric,
            )
        )
    chart = bar_chart(
        "compare-chart",
        bars,
        title=f"Improvement of version {b} over version {a} (%)",
        description=(
            f"For each metric both versions of {name} recorded: how much better (positive) or worse (negative) "
            f"version {b} is than version {a}, relative to version {a}'s value, in percent."
        ),
        value_label="Improvement over the first version (%)",
    )
    better = {"model1": a, "model2": b}.get(comparison.better or "")
    return ComparePage(
        name=name,
        url=model_url(name),
        a=a,
        b=b,
        version_numbers=numbers,
        rows=rows,
        recommendation=comparison.recommendation,
        metric=comparison.metric,
        better=better,
        chart=chart,
    )


# --- contributors ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaderboardRow:
    rank: int
    address: str
    url: str
    total_improvement_score: float
    total_contributions: int
    total_models_improved: int
    models_improved: list[tuple[str, str]]  # (name, dashboard url)
    first_contribution: str
    last_contribution: str


@dataclass(frozen=True)
class LeaderboardPage(Paged):
    rows: list[LeaderboardRow]
    total: int
    offset: int
    limit: int


async def leaderboard_page(analytics: ModelAnalytics, limit: int, offset: int) -> LeaderboardPage:
    board = await analytics.impact.leaderboard(limit, offset)
    return LeaderboardPage(
        rows=[
            LeaderboardRow(
                rank=row.rank,
                address=row.address,
                url=contributor_url(row.address),
                total_improvement_score=row.total_improvement_score,
                total_contributions=row.total_contributions,
                total_models_improved=row.total_models_improved,
                models_improved=[(model, model_url(model)) for model in row.models_improved],
                first_contribution=moment(row.first_contribution),
                last_contribution=moment(row.last_contribution),
            )
            for row in board.contributors
        ],
        total=board.total,
        offset=board.offset,
        limit=board.limit,
    )


@dataclass(frozen=True)
class ContributionRow:
    model_name: str
    model_url: str
    version: str
    version_url: str
    weight: float
    benchmark_metric: str | None
    benchmark_value: str
    parent: str | None
    parent_value: str
    improvement_score: float
    contributed_at: str


@dataclass(frozen=True)
class ContributorPage:
    impact: ContributorImpact
    rows: list[ContributionRow]  # newest first
    shown: int
    chart: Markup


async def contributor_page(analytics: ModelAnalytics, address: str) -> ContributorPage:
    address = checksum_address(address)  # a malformed address is a 400 page, as for the impact endpoint
    impact = await analytics.impact.impact(address, CONTRIBUTIONS_CHARTED, 0)
    if impact.total_contributions == 0:
        raise ContributorNotFound(address)
    rows = [
        ContributionRow(
            model_name=c.model_name,
            model_url=model_url(c.model_name),
            version=c.version,
            version_url=mlflow_model_url(c.model_name, c.version),
            weight=c.weight,
            benchmark_metric=c.benchmark_metric,
            benchmark_value=number(c.benchmark_value),
            parent=c.parent,
            parent_value=number(c.parent_value),
            improvement_score=c.improvement_score,
            contributed_at=moment(c.contributed_at),
        )
        for c in impact.contributions
    ]
    # Cumulative impact over time, oldest first; as the total, a regression counts as no impact (never negative).
    points: list[ChartPoint] = []
    running = 0.0
    for c in sorted(impact.contributions, key=lambda c: c.contributed_at):
        running += max(c.improvement_score, 0.0)
        when = as_utc(datetime.fromisoformat(c.contributed_at.replace("Z", "+00:00")))
        points.append(
            ChartPoint(
                label=when.strftime("%Y-%m-%d"),
                value=running,
                x=when.timestamp(),
                marked=c.improvement_score > 0,
                note=f"{c.model_name} v{c.version}: {format_number(c.improvement_score)}",
                data={"model": c.model_name, "version": c.version, "score": repr(c.improvement_score)},
            )
        )
    partial = " (the newest contributions only)" if impact.total_contributions > len(impact.contributions) else ""
    chart = line_chart(
        "impact-chart",
        points,
        title=f"Cumulative improvement score of {short_address(address)} over time{partial}",
        description=(
            f"The running total of the improvement scores of {address}'s contributions, by the date of each "
            f"contribution; contributions that improved their model are drawn as diamonds."
        ),
        x_label="Date of contribution",
        y_label="Cumulative improvement score",
        marked_label="improved its model",
        from_zero=True,
    )
    return ContributorPage(impact=impact, rows=rows, shown=len(rows), chart=chart)


# --- DSPy ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgramRow:
    program_id: str
    name: str
    version: str
    module: str
    source: str
    signatures: list[str]
    language_model: str | None
    executions: int
    success_rate: str
    average_seconds: str
    p95_seconds: str
    updated: str


@dataclass(frozen=True)
class DspyPage:
    programs: list[ProgramRow]
    total_executions: int
    success_rate: str
    average_seconds: str
    p95_seconds: str
    language_model: str | None
    cache_enabled: bool
    # Executions of programs no longer registered (their records outlive them).
    other_programs: list[tuple[str, int]] = field(default_factory=list)


def _percent(value: float | None) -> str:
    return "\u2014" if value is None else f"{value * 100:.1f}%"


def _seconds(value: float | None) -> str:
    return "\u2014" if value is None else f"{value:.3f} s"


async def dspy_page(dspy: DspyService) -> DspyPage:
    programs, stats = await asyncio.gather(dspy.list_programs(), dspy.stats())
    per_program = stats.statistics.per_program
    rows = []
    for program in programs:
        own = per_program.get(program.program_id)
        rows.append(
            ProgramRow(
                program_id=program.program_id,
                name=program.name,
                version=program.version,
                module=program.module,
                source=program.source,
                signatures=[s.signature for s in program.signatures],
                language_model=program.lm.model if program.lm else None,
                executions=own.total_executions if own else 0,
                success_rate=_percent(own.success_rate if own else None),
                average_seconds=_seconds(own.average_execution_time if own else None),
                p95_seconds=_seconds(own.p95_execution_time if own else None),
                updated=moment(program.updated_at),
            )
        )
    listed = {program.program_id for program in programs}
    overall = stats.statistics
    return DspyPage(
        programs=rows,
        total_executions=overall.total_executions,
        success_rate=_percent(overall.success_rate),
        average_seconds=_seconds(overall.average_execution_time),
        p95_seconds=_seconds(overall.p95_execution_time),
        language_model=stats.language_model,
        cache_enabled=stats.cache_enabled,
        other_programs=sorted(
            (program_id, s.total_executions) for program_id, s in per_program.items() if program_id not in listed
        ),
    )


# --- health ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckRow:
    name: str
    status: str
    critical: bool
    response_time: str
    error: str | None


@dataclass(frozen=True)
class HealthPage:
    overall: str
    checks: list[CheckRow]
    version: str
    uptime: str
    mlflow_server: str
    mlflow_embedded: bool
    breaker_state: str
    breaker_failures: int
    breaker_times_opened: int
    breaker_last_failure: str
    breaker_seconds_until_probe: str
    redis_breaker: dict[str, str] | None
    environment: str


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m {secs}s"


async def health_page(sources: HealthSources) -> HealthPage:
    results = await run_checks(sources)
    breaker = sources.mlflow.breaker.snapshot()
    redis_breaker = None
    if sources.redis_breaker is not None:
        snapshot = sources.redis_breaker.snapshot()
        redis_breaker = {
            "State": str(snapshot.state),
            "Consecutive failures": str(snapshot.consecutive_failures),
            "Times opened": str(snapshot.times_opened),
            "Calls skipped while open": str(snapshot.skipped_calls),
            "Seconds until retry": f"{snapshot.seconds_until_retry:g}" if snapshot.seconds_until_retry else "\u2014",
        }
    return HealthPage(
        overall=overall_status(results),
        checks=[
            CheckRow(
                name=r.name.replace("_", " "),
                status=r.status,
                critical=r.critical,
                response_time=f"{r.response_time_ms:g} ms" if r.response_time_ms is not None else "\u2014",
                error=r.error,
            )
            for r in results
        ],
        version=sources.build.version,
        uptime=_duration(sources.uptime_seconds),
        mlflow_server=sources.mlflow.base_url,
        mlflow_embedded=sources.embedded_mlflow,
        breaker_state=breaker.state.value,
        breaker_failures=breaker.failure_count,
        breaker_times_opened=breaker.times_opened,
        breaker_last_failure=iso(breaker.last_failure_time) if breaker.last_failure_time else "\u2014",
        breaker_seconds_until_probe=(f"{breaker.seconds_until_probe:g}" if breaker.seconds_until_probe else "\u2014"),
        redis_breaker=redis_breaker,
        environment=sources.settings.environment,
    )


def problem_text(exc: HokusaiError) -> str:
    return exc.detail
