"""The `hokusai` command: serve the API and manage its database and keys; talk to a running service (client_cli).

Server modules are imported inside the commands, so the CLI starts (and `--help` works) with the client
dependencies alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import time
from collections.abc import AsyncIterator, Coroutine
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import typer

from hokusai.client_cli import add_client_commands
from hokusai.events_cli import events_app

if TYPE_CHECKING:
    from hokusai.server.config import Settings

SERVER_MODULES = ("fastapi", "sqlalchemy", "alembic", "uvicorn", "mlflow")


def _require_server_install() -> None:
    """The server commands need the `server` extra; on a client-only install say so instead of a traceback."""
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        typer.echo(
            f"error: this command runs the server side, which is not installed here (missing: {', '.join(missing)}); "
            "install it with: pip install 'hokusai[server]'",
            err=True,
        )
        raise typer.Exit(2)


app = typer.Typer(
    help="Hokusai Registry: model registry, MLflow gateway and DSPy execution API.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# The server command groups check for the server install before any of their commands imports server modules.
keys_app = typer.Typer(
    help="Create, list and revoke API keys (operates on the database directly).",
    no_args_is_help=True,
    callback=_require_server_install,
)
db_app = typer.Typer(help="The service database.", no_args_is_help=True, callback=_require_server_install)
contributions_app = typer.Typer(
    help="Data contributions recorded for contributor impact.", no_args_is_help=True, callback=_require_server_install
)
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
app.add_typer(contributions_app, name="contributions")
app.add_typer(events_app, name="events")  # tail follows Redis with the server's settings, else the HTTP log
add_client_commands(app)


def _settings(**overrides: Any) -> Settings:
    _require_server_install()
    from hokusai.server.config import ConfigurationError, load_settings

    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigurationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Interface to listen on [HOKUSAI_HOST, default 127.0.0.1]"),
    port: int | None = typer.Option(None, help="Port to listen on [HOKUSAI_PORT, default 8001]"),
    workers: int | None = typer.Option(
        None, min=1, max=64, help="API worker processes sharing the port [HOKUSAI_WORKERS, default 1]"
    ),
    proxy_headers: bool | None = typer.Option(
        None,
        "--proxy-headers/--no-proxy-headers",
        help="Take the client address from X-Forwarded-For when the connection comes from --forwarded-allow-ips "
        "[HOKUSAI_PROXY_HEADERS, default off]",
    ),
    forwarded_allow_ips: str | None = typer.Option(
        None,
        help="Comma-separated addresses or networks of the trusted proxies, or '*' for any "
        "[HOKUSAI_FORWARDED_ALLOW_IPS, default 127.0.0.1]",
    ),
) -> None:
    """Serve the API (and, unless HOKUSAI_MLFLOW_URL is set, an embedded MLflow server)."""
    settings = _settings(
        host=host, port=port, workers=workers, proxy_headers=proxy_headers, forwarded_allow_ips=forwarded_allow_ips
    )

    from hokusai.server.logs import configure_logging
    from hokusai.server.serving import serve as serve_until_stopped

    if not settings.migrate_on_start:  # refused here in one line rather than as a traceback from the lifespan
        from hokusai.server.config import ConfigurationError
        from hokusai.server.db import require_migrated

        try:
            require_migrated(settings.database_dsn)
        except ConfigurationError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    configure_logging(settings.log_level)
    status = serve_until_stopped(settings)
    if status:
        raise typer.Exit(status)


def _with_store(work: Any) -> Any:
    """Migrate the server's database, then run `work(store)` (a coroutine function) and return its result."""
    settings = _existing_database_settings()
    from hokusai.server.auth.store import ApiKeyStore
    from hokusai.server.db import Database, run_migrations

    run_migrations(settings.database_dsn)

    async def run() -> Any:
        database = Database(settings.async_database_dsn)
        try:
            return await work(ApiKeyStore(database))
        finally:
            await database.dispose()

    return _run(run())


def _with_audited_store(command: str, work: Any, targets: Any = None) -> Any:
    """`_with_store`, recording the command in the audit log as the actor `cli:<os user>`."""
    settings = _existing_database_settings()
    from hokusai.server.audit.store import record_command
    from hokusai.server.auth.store import ApiKeyStore
    from hokusai.server.db import Database, run_migrations

    run_migrations(settings.database_dsn)

    async def run() -> Any:
        database = Database(settings.async_database_dsn)
        try:
            return await record_command(database, command, work(ApiKeyStore(database)), targets)
        finally:
            await database.dispose()

    return _run(run())


def _existing_database_settings() -> Settings:
    """Settings whose database a server has already created and migrated. Commands that act on the server's data
    refuse otherwise: making a new database here would give keys that the running server never sees."""
    settings = _settings()
    from hokusai.server.db import is_migrated

    if not is_migrated(settings.database_dsn):
        where = settings.home.resolve() / "hokusai.db" if settings.database_url is None else "HOKUSAI_DATABASE_URL"
        typer.echo(
            f"error: no Hokusai database at {where}; run `hokusai serve` (or `hokusai db upgrade`) first, "
            "or set HOKUSAI_HOME to the server's home",
            err=True,
        )
        raise typer.Exit(2)
    return settings


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    from hokusai.server.errors import HokusaiError

    try:
        return asyncio.run(coroutine)
    except HokusaiError as exc:
        raise _fail(exc.detail) from None


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., "--name", help="Who or what the key is for"),
    scopes: str = typer.Option("read", "--scopes", help="Comma-separated: read, write, admin"),
    rate_limit_per_hour: int | None = typer.Option(None, "--rate-limit-per-hour", min=1),
    expires_in_days: int | None = typer.Option(None, "--expires-in-days", min=1),
    test: bool = typer.Option(False, "--test", help="Make an hk_test_ key instead of hk_live_"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Create a key and print it once."""
    from hokusai.server.auth.keys import Scope
    from hokusai.server.auth.schemas import ApiKeyView

    try:
        scope_set = {Scope(part.strip()) for part in scopes.split(",") if part.strip()}
    except ValueError:
        raise _fail(f"unknown scope in {scopes!r}; use read, write, admin") from None
    expires_in = timedelta(days=expires_in_days) if expires_in_days else None
    created = _with_audited_store(
        "keys create",
        lambda store: store.create(name, scope_set, rate_limit_per_hour, expires_in, "test" if test else "live"),
        lambda created: {"key_id": created.info.id},
    )
    view = ApiKeyView.of(created.info).model_dump(mode="json")
    if as_json:
        typer.echo(json.dumps({**view, "key": created.key}))
        return
    typer.echo(f"Created {view['id']} ({view['name']}, scopes {','.join(view['scopes'])}). The key, shown once:")
    typer.echo(created.key)


@keys_app.command("list")
def keys_list(as_json: bool = typer.Option(False, "--json", help="Print a JSON array")) -> None:
    """List keys (never their secrets)."""
    from hokusai.server.auth.schemas import ApiKeyView

    views = [ApiKeyView.of(info).model_dump(mode="json") for info in _with_store(lambda store: store.list())]
    if as_json:
        typer.echo(json.dumps(views))
        return
    for view in views:
        state = "revoked" if view["revoked_at"] else "active"
        typer.echo(
            f"{view['id']}  {view['prefix']}...  {view['name']}  [{','.join(view['scopes'])}]  {state}"
            f"  expires {view['expires_at'] or 'never'}  last used {view['last_used_at'] or 'never'}"
        )


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (key_...), as `keys list` shows")) -> None:
    """Revoke a key; running servers stop accepting it within the auth cache TTL."""
    info = _with_audited_store("keys revoke", lambda store: store.revoke(key_id), lambda _: {"key_id": key_id})
    typer.echo(f"Revoked {info.id} ({info.name})")


@app.command("audit")
def audit(
    key_id: str | None = typer.Option(None, "--key-id", help="Only this key's requests"),
    since: str | None = typer.Option(None, "--since", help="ISO time (UTC when no zone), e.g. 2026-11-29T12:00"),
    limit: int = typer.Option(50, "--limit", min=1, max=500),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array"),
) -> None:
    """The audit log, newest first: who made which write, when (read from the server's database)."""
    from datetime import datetime

    settings = _existing_database_settings()
    from hokusai.server.audit.schemas import AuditRecord
    from hokusai.server.audit.store import AuditFilter, AuditStore
    from hokusai.server.db import Database, run_migrations

    try:
        since_time = datetime.fromisoformat(since) if since else None
    except ValueError:
        raise _fail(f"--since {since!r} is not an ISO time") from None
    run_migrations(settings.database_dsn)

    async def run() -> Any:
        database = Database(settings.async_database_dsn)
        try:
            return await AuditStore(database).list(AuditFilter(key_id=key_id, since=since_time), limit)
        finally:
            await database.dispose()

    entries, _ = _run(run())
    records = [AuditRecord.of(entry).model_dump(mode="json") for entry in entries]
    if as_json:
        typer.echo(json.dumps(records))
        return
    for record in records:
        targets = " ".join(f"{name}={value}" for name, value in record["targets"].items())
        typer.echo(
            f"{record['at']}  {record['actor']} ({record['key_id'] or '-'}, {record['address'] or '-'})  "
            f"{record['method']} {record['route']} {targets}  {record['status']}".rstrip()
        )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations (the server also does this when it starts)."""
    settings = _settings()
    from hokusai.server.db import run_migrations

    run_migrations(settings.database_dsn)
    typer.echo("Database is up to date")


@contributions_app.command("rebuild")
def contributions_rebuild(as_json: bool = typer.Option(False, "--json", help="Print one JSON object")) -> None:
    """Record anew the contributions of every model version in MLflow (from its contributor tags).

    Versions registered through the service are recorded as they are made; this backfills versions made straight
    in MLflow (or through the gateway), and recomputes every improvement score. With no HOKUSAI_MLFLOW_URL it
    starts the embedded MLflow of HOKUSAI_HOME for the duration. A record that is new or changed is announced
    (contribution.recorded, model_version.improved) as the actor cli:<os user>; one that is unchanged is not.
    """
    settings = _existing_database_settings()
    from hokusai.server.analytics.service import ModelAnalytics
    from hokusai.server.audit.store import cli_actor, record_command
    from hokusai.server.db import run_migrations
    from hokusai.server.events.outbox import Actor, EventOutbox

    run_migrations(settings.database_dsn)

    async def run() -> Any:
        async with _database_and_mlflow(settings, external_wait=None) as (database, upstream):
            analytics = ModelAnalytics.build(settings, upstream, database, EventOutbox(database))
            rebuild = analytics.impact.rebuild(Actor("cli", cli_actor()))
            return await record_command(database, "contributions rebuild", rebuild)

    report = _run(run())
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(report)))
        return
    typer.echo(
        f"Read {report.versions_seen} versions; {report.versions_with_contributors} name contributors; "
        f"{report.contributions} contributions recorded"
    )


@contextlib.asynccontextmanager
async def _database_and_mlflow(settings: Settings, external_wait: float | None) -> AsyncIterator[tuple[Any, Any]]:
    """The service database and an upstream client to its MLflow, for a server command: the embedded MLflow of
    HOME is started for the duration when no HOKUSAI_MLFLOW_URL is set. `external_wait`: seconds an external MLflow
    gets to answer before the command exits 2 (None: not checked; its first call says it)."""
    from hokusai.server.db import Database
    from hokusai.server.errors import ServiceUnavailable
    from hokusai.server.mlflow.embedded import EmbeddedMlflow
    from hokusai.server.mlflow.upstream import MlflowUpstream
    from hokusai.server.runtime import build_breaker, upstream_authorization

    embedded = EmbeddedMlflow(settings.home) if settings.embedded_mlflow else None
    if embedded is not None:
        await embedded.start()
    database = Database(settings.async_database_dsn)
    upstream = MlflowUpstream(
        embedded.url if embedded else str(settings.mlflow_url),
        settings.mlflow_timeout,
        breaker=build_breaker(settings),
        authorization=upstream_authorization(settings),
        keepalive=settings.reuse_mlflow_connections,
    )
    try:
        wait = 120 if embedded is not None else external_wait
        if wait is not None:
            try:
                await _wait_for_mlflow(upstream, timeout=wait)
            except ServiceUnavailable as exc:
                where = f"the embedded MLflow did not start (see {embedded.log_path})" if embedded else exc.detail
                typer.echo(f"error: MLflow is not reachable: {where}", err=True)
                raise typer.Exit(2) from None
        yield database, upstream
    finally:
        await upstream.aclose()
        await database.dispose()
        if embedded is not None:
            await embedded.stop()


async def _wait_for_mlflow(upstream: Any, timeout: float) -> None:
    from hokusai.server.errors import ServiceUnavailable

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await upstream.ping(timeout=2)
        except ServiceUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


DOCTOR_LINES = {
    "mismatch": "mismatch  {name}: database {database_id}, MLflow tag {mlflow_tag}",
    "no_model": "no model  {name}: database {database_id}; no registered model of that name in MLflow",
    "no_row": "no row    {name}: MLflow tag {mlflow_tag}; the database has no id for it",
}


@app.command()
def doctor(
    repair: bool = typer.Option(False, "--repair", help="Set each differing MLflow tag to the database's id"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Check that each model's id in the database matches its registered model's hokusai_model_id tag in MLflow.

    Exits 0 when they agree (or every mismatch was repaired), 1 when mismatches remain, 2 when the database or
    MLflow cannot be reached. With no HOKUSAI_MLFLOW_URL it starts the embedded MLflow of HOKUSAI_HOME for the
    duration, as `contributions rebuild` does.
    """
    settings = _existing_database_settings()
    from hokusai.server.mlflow.registry_client import RegistryClient
    from hokusai.server.registry.registration import check_model_ids

    async def run() -> Any:
        # An external MLflow gets a few seconds (it may be restarting); an embedded one, its start.
        async with _database_and_mlflow(settings, external_wait=3) as (database, upstream):
            return await check_model_ids(database, RegistryClient.over(upstream), repair=repair)

    report = _run(run())
    if as_json:
        typer.echo(json.dumps({**dataclasses.asdict(report), "unrepaired_mismatches": report.unrepaired_mismatches}))
    else:
        for finding in report.findings:
            shown = {key: "none" if value is None else value for key, value in dataclasses.asdict(finding).items()}
            line = DOCTOR_LINES[finding.kind].format(**shown)
            typer.echo(line + (" (repaired)" if finding.repaired else ""))
        counts = {kind: sum(1 for f in report.findings if f.kind == kind) for kind in DOCTOR_LINES}
        typer.echo(
            f"Checked {report.rows} model ids against {report.registered_models} registered models: "
            f"{counts['mismatch']} mismatched ({counts['mismatch'] - report.unrepaired_mismatches} repaired), "
            f"{counts['no_model']} without a registered model, {counts['no_row']} tagged without a row"
        )
    if report.unrepaired_mismatches:
        typer.echo("Run `hokusai doctor --repair` to set those tags to the database's ids", err=True)
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the installed version."""
    from hokusai import __version__

    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
