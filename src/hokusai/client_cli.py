"""The client commands of `hokusai`: login, models, dspy, webhooks, health. They talk to a running service through
the SDK (httpx only), so they work where only the client is installed.

Exit codes say what failed: 0 ok, 1 other error, 2 usage, 3 authentication or permission, 4 not found,
5 refused input (400/409/422), 6 rate limited, 7 the service or what is behind it failed (5xx), 8 unreachable.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from hokusai.sdk import config
from hokusai.sdk.errors import (
    AuthenticationError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    HokusaiError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    UpstreamError,
    ValidationError,
)

EXIT_CODES: list[tuple[type[HokusaiError], int]] = [
    (AuthenticationError, 3),
    (PermissionDenied, 3),
    (NotFound, 4),
    (BadRequest, 5),
    (Conflict, 5),
    (ValidationError, 5),
    (RateLimited, 6),
    (UpstreamError, 7),
    (ServerError, 7),
    (ConnectionFailed, 8),
]

models_app = typer.Typer(help="Model versions on a running service.", no_args_is_help=True)
dspy_app = typer.Typer(help="DSPy programs on a running service.", no_args_is_help=True)
webhooks_app = typer.Typer(help="Webhook subscriptions to model lifecycle events (an admin key).", no_args_is_help=True)

UrlOption = typer.Option(None, "--url", help="Service URL [HOKUSAI_URL, ~/.hokusai/config, http://127.0.0.1:8001]")
KeyOption = typer.Option(None, "--api-key", help="API key [HOKUSAI_API_KEY, ~/.hokusai/config]")
JsonOption = typer.Option(False, "--json", help="Print JSON for scripts")


@contextmanager
def failures_as_exit_codes() -> Iterator[None]:
    try:
        yield
    except HokusaiError as exc:
        typer.echo(f"error: {exc.detail}" + (f" (request {exc.request_id})" if exc.request_id else ""), err=True)
        code = next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), 1)
        raise typer.Exit(code) from None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def show(value: Any, as_json: bool, table: Callable[[Any], Any] | None = None) -> None:
    if as_json or table is None:
        typer.echo(json.dumps(_plain(value), indent=None if as_json else 2, default=str))
        return
    from rich.console import Console

    Console().print(table(value))


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Any:
    from rich.table import Table

    rendered = Table(title=title)
    for column in columns:
        rendered.add_column(column)
    for row in rows:
        rendered.add_row(*["" if cell is None else str(cell) for cell in row])
    return rendered


def _registry(url: str | None, api_key: str | None) -> Any:
    from hokusai.sdk.registry import ModelRegistry

    return ModelRegistry(url, api_key)


def login(
    url: str | None = UrlOption,
    api_key: str = typer.Option(..., "--api-key", prompt="API key", hide_input=True, help="Your hk_live_/hk_test_ key"),
) -> None:
    """Check the key against the service, then keep URL and key in ~/.hokusai/config (mode 0600).

    The URL is not asked for: --url, else HOKUSAI_URL or the saved one, else the documented default."""
    base = config.resolve(url).url or config.DEFAULT_URL
    with failures_as_exit_codes(), _registry(base, api_key) as registry:
        registry.list_page(max_results=1)
    path = config.write_config(base, api_key)
    typer.echo(f"Logged in to {base}; saved to {path}")


def ui(
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
    page: str = typer.Option("/ui/", "--page", help="Where to land once signed in, e.g. /ui/ or /mlflow/"),
    open_browser: bool = typer.Option(True, "--open/--no-open", help="Open the browser (else print the link)"),
) -> None:
    """Open the dashboard in a browser, signed in with the configured key (through a one-time link: single use,
    valid 60 s; the key itself never goes into the browser)."""
    import webbrowser

    import httpx

    from hokusai.sdk.transport import error_from

    credentials = config.resolve(url, api_key)
    root = credentials.url.removesuffix("/api")  # the sign-in routes are at the service's root
    with failures_as_exit_codes():
        if not credentials.api_key:
            raise AuthenticationError("No API key: pass --api-key or run `hokusai login` first", 401)
        try:
            response = httpx.post(
                f"{root}/login/links",
                json={"next": page},
                headers={"Authorization": f"Bearer {credentials.api_key}"},
                timeout=30,
            )
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"Could not reach {root}: {exc}") from exc
        if response.status_code != 201:
            raise error_from(response)
    link = response.json()["url"]
    if open_browser and webbrowser.open(link):
        typer.echo(f"Opened {root}{page} in your browser (the sign-in link works once, within 60 s).")
    else:
        typer.echo(link)


def health(url: str | None = UrlOption, as_json: bool = JsonOption) -> None:
    """The service's /health (no key needed)."""
    import httpx

    base = config.resolve(url).url
    with failures_as_exit_codes():
        try:
            response = httpx.get(f"{base}/health", timeout=10)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"Could not reach {base}: {exc}") from exc
    body = response.json()
    if as_json:
        typer.echo(json.dumps(body))
    else:
        services = ", ".join(f"{name} {state}" for name, state in body.get("services", {}).items())
        typer.echo(f"{base}: {body.get('status')} ({services})")
    if body.get("status") == "unhealthy" or response.status_code >= 500:
        raise typer.Exit(7)


@models_app.command("list")
def models_list(
    name: str | None = typer.Option(None, "--name", help="Only the versions of this model"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
    as_json: bool = JsonOption,
) -> None:
    """Every model version (all pages)."""
    with failures_as_exit_codes(), _registry(url, api_key) as registry:
        versions = registry.list_models(name)
    show(
        versions,
        as_json,
        lambda rows: _table(
            "Model versions",
            ["name", "version", "stage", "aliases", "status"],
            [[v.name, v.version, v.stage, ", ".join(v.aliases), v.status] for v in rows],
        ),
    )


@models_app.command("show")
def models_show(
    reference: str = typer.Argument(..., help="name:version"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
    as_json: bool = JsonOption,
) -> None:
    """One version's details."""
    name, version = _reference(reference)
    with failures_as_exit_codes(), _registry(url, api_key) as registry:
        detail = registry.get_model(name, version)
    show(
        detail,
        as_json,
        lambda d: _table(
            f"{d.name}:{d.version}",
            ["field", "value"],
            [
                ["stage", d.stage],
                ["aliases", ", ".join(d.aliases)],
                ["status", d.status],
                ["source", d.source],
                ["run_id", d.run_id],
                ["description", d.description],
                *[[f"tag {key}", value] for key, value in sorted(d.tags.items())],
            ],
        ),
    )


@models_app.command("promote")
def models_promote(
    reference: str = typer.Argument(..., help="name:version"),
    stage: str = typer.Option("Production", "--stage", help="Staging, Production, Archived or None"),
    archive_existing: bool = typer.Option(
        True,
        "--archive-existing/--keep-existing",
        help="Archive the versions now in that stage (default), or keep them there too",
    ),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
    as_json: bool = JsonOption,
) -> None:
    """Move a version to a stage (Production by default)."""
    name, version = _reference(reference)
    with failures_as_exit_codes(), _registry(url, api_key) as registry:
        detail = registry.transition(name, version, stage, archive_existing)
    if as_json:
        show(detail, True)
    else:
        typer.echo(f"{detail.name}:{detail.version} is now in {detail.stage}")


@models_app.command("download")
def models_download(
    reference: str = typer.Argument(..., help="name:version"),
    dest: Path = typer.Option(Path("."), "--dest", help="A file, or a directory for the server's file name"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar"),
) -> None:
    """The version's artifacts as a zip, with a progress bar."""
    name, version = _reference(reference)
    with failures_as_exit_codes(), _registry(url, api_key) as registry:
        target = registry.download(name, version, dest, progress=not quiet)
    typer.echo(str(target))


@models_app.command("compare")
def models_compare(
    model1: str = typer.Argument(..., help="name:version or name@alias"),
    model2: str = typer.Argument(..., help="name:version or name@alias"),
    metric: str | None = typer.Option(None, "--metric", help="Recommend by this metric"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
    as_json: bool = JsonOption,
) -> None:
    """Two versions' metrics side by side, their differences and a recommendation."""
    with failures_as_exit_codes(), _registry(url, api_key) as registry:
        comparison = registry.compare(model1, model2, metric)

    def table(c: Any) -> Any:
        keys = sorted(set(c.model1.metrics) | set(c.model2.metrics))
        rows = [[key, c.model1.metrics.get(key), c.model2.metrics.get(key), c.delta.get(key)] for key in keys]
        return _table(c.recommendation, ["metric", model1, model2, "delta"], rows)

    show(comparison, as_json, table)


@dspy_app.command("programs")
def dspy_programs(url: str | None = UrlOption, api_key: str | None = KeyOption, as_json: bool = JsonOption) -> None:
    """Registered (and trusted) DSPy programs."""
    from hokusai.sdk.dspy import DSPyClient

    with failures_as_exit_codes(), DSPyClient(url, api_key) as client:
        programs = client.programs()
    show(
        programs,
        as_json,
        lambda rows: _table(
            "DSPy programs",
            ["program_id", "version", "module", "inputs", "outputs"],
            [
                [
                    p.program_id,
                    p.version,
                    p.module,
                    ", ".join(p.signatures[0].input_fields) if p.signatures else "",
                    ", ".join(p.signatures[0].output_fields) if p.signatures else "",
                ]
                for p in rows
            ],
        ),
    )


@dspy_app.command("run")
def dspy_run(
    program_id: str = typer.Argument(...),
    inputs: list[str] = typer.Option([], "--input", "-i", help="field=value (repeatable); a value may be JSON"),
    mode: str = typer.Option("normal", "--mode", help="normal, dry_run or debug"),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
    as_json: bool = JsonOption,
) -> None:
    """Execute a program once."""
    from hokusai.sdk.dspy import DSPyClient

    values = {}
    for item in inputs:
        field, equals, value = item.partition("=")
        if not equals:
            raise typer.BadParameter(f"{item!r} is not field=value", param_hint="--input")
        try:
            values[field] = json.loads(value)
        except ValueError:
            values[field] = value
    with failures_as_exit_codes(), DSPyClient(url, api_key) as client:
        result = client.execute(program_id, values, mode=mode, timeout=timeout)
    if as_json:
        show(result, True)
        return
    for message in result.metadata.get("prompt") or []:  # dry_run: what the LM would be sent
        typer.echo(f"--- {message.get('role', 'message')} ---\n{message.get('content', '')}")
    for name, value in (result.outputs or {}).items():
        typer.echo(f"{name}: {value}")
    typer.echo(f"({result.execution_id}, {result.execution_time:.2f} s)", err=True)


def _webhooks_table(rows: list[Any]) -> Any:
    return _table(
        "Webhooks",
        ["id", "url", "event types", "models", "enabled", "description"],
        [
            [w.id, w.url, ", ".join(w.event_types), ", ".join(w.model_names or ["(all)"]), w.enabled, w.description]
            for w in rows
        ],
    )


@webhooks_app.command("list")
def webhooks_list(url: str | None = UrlOption, api_key: str | None = KeyOption, as_json: bool = JsonOption) -> None:
    """Every subscription (never its secret)."""
    with failures_as_exit_codes(), _registry(url, api_key) as registry:
        webhooks = registry.list_webhooks()
    show(webhooks, as_json, _webhooks_table)


@webhooks_app.command("create")
def webhooks_create(
    target: str = typer.Argument(..., metavar="RECEIVER_URL", help="Where deliveries are POSTed"),
    event_types: list[str] = typer.Option(
        ..., "--type", help="An event type or pattern (model_version.*, *); repeat for several"
    ),
    model_names: list[str] = typer.Option([], "--model", help="Only this model's events; repeatable; default all"),
    description: str | None = typer.Option(None, "--description"),
    disabled: bool = typer.Option(False, "--disabled", help="Create it paused"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
    as_json: bool = JsonOption,
) -> None:
    """Subscribe a URL; prints the signing secret, shown this once."""
    with failures_as_exit_codes(), _registry(url, api_key) as registry:
        created = registry.create_webhook(target, event_types, model_names or None, not disabled, description)
    if as_json:
        show(created, True)
        return
    typer.echo(f"Created {created.id} -> {created.url} ({', '.join(created.event_types)}). Its secret, shown once:")
    typer.echo(created.secret)


@webhooks_app.command("delete")
def webhooks_delete(
    webhook_id: str = typer.Argument(...), url: str | None = UrlOption, api_key: str | None = KeyOption
) -> None:
    """Remove a subscription (its pending deliveries are not sent)."""
    with failures_as_exit_codes(), _registry(url, api_key) as registry:
        registry.delete_webhook(webhook_id)
    typer.echo(f"Deleted {webhook_id}")


@webhooks_app.command("deliveries")
def webhooks_deliveries(
    webhook_id: str = typer.Argument(...),
    status: str | None = typer.Option(None, "--status", help="pending, delivered or dead"),
    limit: int = typer.Option(50, "--limit", min=1),
    cursor: str | None = typer.Option(None, "--cursor", help="The next_cursor of a previous page"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
    as_json: bool = JsonOption,
) -> None:
    """A webhook's deliveries: status, attempts, response code, latency."""
    with failures_as_exit_codes(), _registry(url, api_key) as registry:
        page = registry.webhook_deliveries(webhook_id, status, limit, cursor)
    if as_json:
        show(page, True)
        return
    show(
        page.deliveries,
        False,
        lambda rows: _table(
            f"Deliveries of {webhook_id}",
            ["id", "event", "type", "status", "attempts", "response", "latency ms", "error"],
            [
                [d.id, d.event_id, d.event_type, d.status, d.attempts]
                + [d.last_status_code, d.last_latency_ms, d.last_error]
                for d in rows
            ],
        ),
    )
    if page.next_cursor:
        typer.echo(f"More: --cursor {page.next_cursor}", err=True)


@webhooks_app.command("redeliver")
def webhooks_redeliver(
    webhook_id: str = typer.Argument(...),
    delivery_id: str = typer.Argument(...),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
    as_json: bool = JsonOption,
) -> None:
    """Send a delivery's event again (a dead-lettered one, or any other)."""
    with failures_as_exit_codes(), _registry(url, api_key) as registry:
        delivery = registry.redeliver(webhook_id, delivery_id)
    if as_json:
        show(delivery, True)
    else:
        typer.echo(f"Queued delivery {delivery.id} of {delivery.event_id or 'the event'} to {webhook_id}")


@webhooks_app.command("test")
def webhooks_test(
    webhook_id: str = typer.Argument(...), url: str | None = UrlOption, api_key: str | None = KeyOption
) -> None:
    """Send a webhook.test event now and show how the receiver answered."""
    with failures_as_exit_codes(), _registry(url, api_key) as registry:
        answer = registry.test_webhook(webhook_id)
    show(answer, True)


def _reference(reference: str) -> tuple[str, str]:
    name, colon, version = reference.rpartition(":")
    if not colon or not name or not version:
        raise typer.BadParameter(f"{reference!r} is not name:version")
    return name, version


def add_client_commands(app: typer.Typer) -> None:
    app.command("login")(login)
    app.command("health")(health)
    app.command("ui")(ui)
    app.add_typer(models_app, name="models")
    app.add_typer(dspy_app, name="dspy")
    app.add_typer(webhooks_app, name="webhooks")
