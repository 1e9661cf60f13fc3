"""Settings: one typed object, read from HOKUSAI_* environment variables.

Code receives a `Settings`; nothing else in the server reads `os.environ`.
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import AnyHttpUrl, Field, RedisDsn, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hokusai.server.ratelimit.policies import parse_limit

ENV_PREFIX = "HOKUSAI_"
_SECRET_FIELDS = {"bootstrap_admin_key", "mlflow_token", "mlflow_password", "dspy_api_key"}


def discover_home(start: Path) -> Path:
    """The nearest `.hokusai` with a database in `start` or above (as git finds `.git`), so `hokusai keys ...` run
    from a subdirectory acts on the server's HOME; else `./.hokusai`, which `hokusai serve` creates."""
    for directory in (start, *start.parents):
        candidate = directory / ".hokusai"
        if (candidate / "hokusai.db").is_file():
            return candidate if directory != start else Path(".hokusai")
    return Path(".hokusai")


class ConfigurationError(Exception):
    """A setting has a value the service cannot start with; the message is one line naming the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    home: Path = Field(
        default_factory=lambda: discover_home(Path.cwd()),
        description="Where the embedded database, MLflow store and admin key live; default: the nearest .hokusai "
        "holding a database in this directory or above, else ./.hokusai",
    )
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=1, le=65535)
    environment: Literal["development", "test", "staging", "production"] = "development"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="Largest request body of the service's own routes (413 beyond); the MLflow gateway streams "
        "uploads of any size",
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a client has to send a request's headers before the connection is closed"
    )
    body_read_timeout: float = Field(
        30.0, gt=0, description="Seconds a request body may stall between two chunks before 408 (gateway uploads too)"
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="Open connections plus running requests beyond which new requests get 503; unset: no bound",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="API worker processes of `hokusai serve`, each with its own model worker pool, caches and, "
        "without Redis, its own rate limit counts",
    )
    proxy_headers: bool = Field(
        False,
        description="Take the client address (rate limits, failed-authentication lockout, logs) and scheme from "
        "X-Forwarded-For/-Proto, when the connection comes from an address in forwarded_allow_ips",
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1",
        description="Comma-separated addresses or networks of the proxies trusted for X-Forwarded-* (with "
        "proxy_headers), or * for any",
    )

    database_url: str | None = Field(
        None, description="sqlite:/// or postgresql+psycopg:// URL; default: SQLite in HOME"
    )
    redis_url: RedisDsn | None = None
    redis_timeout: float = Field(
        0.1, gt=0, description="Seconds one Redis call may wait to connect or for a reply (a stalled Redis costs this)"
    )
    redis_failure_threshold: int = Field(
        3, ge=1, description="Consecutive Redis failures after which Redis is skipped for a while"
    )
    redis_retry_after: float = Field(
        5.0, gt=0, description="Seconds Redis is skipped after those failures, before one call tries it again"
    )
    redis_prefix: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Start of every key the service writes to Redis; default: hokusai:<12 hex of the database URL>: "
        "so services on different databases can share one Redis",
    )

    mlflow_url: AnyHttpUrl | None = Field(None, description="External MLflow server; unset starts an embedded one")
    mlflow_port: int = Field(0, ge=0, le=65535, description="Loopback port of the embedded MLflow; 0 picks a free one")
    mlflow_timeout: float = Field(30.0, gt=0, description="Seconds for one call to MLflow")
    mlflow_token: SecretStr | None = Field(None, description="Bearer token sent to an MLflow that has its own auth")
    mlflow_username: str | None = Field(None, description="Basic-auth user for an MLflow that has its own auth")
    mlflow_password: SecretStr | None = None
    mlflow_keepalive: bool | None = Field(
        None, description="Reuse upstream connections; unset: yes for the embedded MLflow, no for an external one"
    )
    embedded_mlflow_url: str | None = Field(
        None,
        description="Set by `hokusai serve --workers N` for its API workers, not by users: the embedded MLflow that "
        "the serve process started and supervises, which the workers use instead of starting their own",
    )

    breaker_failure_threshold: int = Field(5, ge=1, description="Consecutive MLflow failures that open the breaker")
    breaker_recovery_timeout: float = Field(10.0, gt=0, description="Seconds open before the first probe")
    breaker_max_recovery_timeout: float = Field(300.0, gt=0, description="Cap of the doubling recovery timeout")
    breaker_half_open_max_calls: int = Field(1, ge=1, description="Probes allowed at once while half-open")
    breaker_success_threshold: int = Field(2, ge=1, description="Successful probes that close the breaker")

    rate_limit_default_per_hour: int = Field(1000, ge=1, description="Requests per key per hour, unless the key says")
    rate_limit_gateway_per_hour: int | None = Field(
        None,
        ge=1,
        le=2**31 - 1,
        description="A separate hourly budget for MLflow gateway calls of keys without their own limit; "
        "unset: gateway calls spend the key's one budget (the API reference's 1000/h per key)",
    )
    rate_limit_registration: str = Field("20/minute", description="Per key, POST /models/register")
    rate_limit_lineage: str = Field("100/minute", description="Per key, the two lineage routes")
    rate_limit_impact: str = Field("100/minute", description="Per key, contributor impact and the leaderboard")
    rate_limit_routes: dict[str, str] = Field(
        default_factory=dict,
        description='More route policies, JSON: {"GET /models/{model_name}/{version}": "60/minute"}',
    )
    rate_limit_auth_failures: str = Field("60/minute", description="Failed authentications per client address")
    rate_limit_fail_open: bool = Field(True, description="Serve without limits (true) or answer 503 when Redis is down")

    registry_cache_ttl: float = Field(
        2.0,
        ge=0,
        description="Seconds list/get answers are cached; how late a write made straight to MLflow shows",
    )
    cache_single_flight: bool = Field(
        True,
        description="When a cached list/get answer is missing or expired, one request per key asks MLflow and the "
        "others wait for its answer (with Redis: one per key across every process); false: each asks MLflow",
    )
    idempotency_pending_seconds: float = Field(
        300.0,
        gt=0,
        description="Seconds a request with an Idempotency-Key holds the key unanswered (409 to retries) before a "
        "retry may take it over, as left by a process that died; longer than any registration takes",
    )

    datasets_dir: Path | None = Field(
        None, description="Files POST /models/evaluate may read (CSV, Parquet, JSON lines); default HOME/datasets"
    )
    evaluation_sync_max_bytes: int = Field(
        5_000_000, ge=0, description="Datasets up to this size are evaluated in the request; larger ones answer 202"
    )
    evaluation_experiment: str = Field("hokusai-evaluations", min_length=1, description="Where evaluation runs go")
    evaluation_lease_seconds: float = Field(
        60.0,
        gt=0,
        description="Seconds a process's claim on a queued or running evaluation lasts without renewal (renewed every "
        "third of it); after that, another process runs the evaluation again or marks it failed",
    )
    model_cache_max_bytes: int = Field(
        5_000_000_000, ge=0, description="Disk kept for fetched model files (HOME/model-cache); least recently used go"
    )
    prediction_max_rows: int = Field(10_000, ge=1, description="Rows one predict call may send")
    model_workers: int = Field(
        2, ge=1, description="Worker processes that load and run model code (one model version each at a time)"
    )
    model_worker_memory_bytes: int = Field(
        4 * 1024**3, ge=256 * 1024**2, description="Address-space limit of each model worker (RLIMIT_AS)"
    )
    model_call_timeout: float = Field(
        60.0, gt=0, description="Seconds one predict (or evaluation) call may take in a worker before it is killed"
    )
    model_load_timeout: float = Field(
        300.0, gt=0, description="Seconds a worker may take to start and load a model before it is killed"
    )
    model_worker_user: str = Field(
        "nobody", description='User model workers run as when the service runs as root ("": the service\'s own)'
    )
    model_worker_network: bool = Field(
        False,
        description="Let model code reach the network; else (as root) workers run in an empty network namespace",
    )
    model_spare_workers: int = Field(
        1,
        ge=0,
        le=16,
        description="Model workers kept started ahead (MLflow and common flavours imported), so a version's first "
        "call only loads it; started once a process serves models. 0: a worker starts within the call",
    )
    model_prefetch: bool = Field(
        True,
        description="Fetch a version's files in the background when it is registered or enters Production (one "
        "at a time, none larger than HOKUSAI_MODEL_CACHE_MAX_BYTES)",
    )
    production_metrics_window: float = Field(
        3600.0, gt=0, description="Seconds of prediction records behind production_metrics"
    )
    lower_is_better_metrics: str = Field(
        "loss,error,mse,rmse,mae,log_loss,logloss,latency,perplexity,wer,cer",
        description="Comma-separated name parts of metrics where lower is better (any other: higher is better)",
    )
    compare_tolerance: float = Field(
        0.001, ge=0, description="Relative difference within which compare calls two versions equivalent"
    )

    dspy_lm: str | None = Field(None, description="LiteLLM model name of the default LM, e.g. openai/my-model")
    dspy_api_base: AnyHttpUrl | None = Field(
        None, description="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1"
    )
    dspy_api_key: SecretStr | None = None
    dspy_temperature: float | None = Field(None, ge=0, le=2)
    dspy_max_tokens: int | None = Field(None, ge=1)
    dspy_num_retries: int = Field(2, ge=0, le=10, description="Retries of a failed LM call (DSPy/LiteLLM backoff)")
    dspy_timeout: float = Field(60.0, gt=0, description="Seconds an execution may take unless the request says")
    dspy_max_timeout: float = Field(300.0, gt=0, description="Cap of the `timeout` a request may ask for")
    dspy_cache: bool = Field(True, description="DSPy's in-memory response cache (same prompt, same answer)")
    dspy_lm_cache_size: int = Field(
        32, ge=1, description="Language model clients kept (one per distinct LM setting); least recently used go first"
    )
    dspy_batch_concurrency: int = Field(16, ge=1, le=256, description="Items of one batch run at once")
    dspy_max_batch_items: int = Field(1000, ge=1, description="Items one batch request may hold")
    dspy_record_content: bool = Field(
        False, description="Keep execution inputs and outputs in the records (else only their sizes)"
    )
    dspy_program_cache_ttl: float = Field(
        2.0,
        ge=0,
        description="Seconds a program declaration is reused; how late a change made by another process shows",
    )
    dspy_trusted_programs: dict[str, str] = Field(
        default_factory=dict, description='Operator-trusted Python programs, JSON: {"program_id": "module:attribute"}'
    )
    dspy_allow_pickled: bool = Field(
        False, description="Allow programs loaded from pickles (mlflow.dspy models): loading one runs its code"
    )

    bootstrap_admin_key: SecretStr | None = None
    migrate_on_start: bool = Field(
        True,
        description="Bring the database schema to the latest version at start (under a lock, so several processes "
        "may start at once); false: refuse to start unless `hokusai db upgrade` was run",
    )
    auth_cache_ttl: float = Field(5.0, ge=0, description="Seconds a validated key is trusted without a database read")
    session_ttl: float = Field(
        8 * 3600.0,
        gt=0,
        le=30 * 24 * 3600.0,
        description="Seconds a browser session lasts once signed in (it ends sooner if its key is revoked or expires)",
    )
    audit_retention_days: int = Field(90, ge=1, description="Days the audit log keeps a row (deleted hourly after)")
    improvement_threshold: float = Field(
        0.01,
        ge=0,
        description="How much a version must beat its parent for model_version.improved: an absolute difference "
        "for a metric whose both values lie in [0, 1] (0.01 = one percentage point), else relative to the parent",
    )
    events_reconcile_seconds: float = Field(
        30.0,
        gt=0,
        description="How often MLflow's registry is compared with the event snapshot (changes made in "
        "MLflow directly that no MLflow webhook announced; one process at a time)",
    )
    events_poll_seconds: float = Field(
        1.0, gt=0, le=60, description="How often a process looks for events and deliveries other processes wrote"
    )
    events_stream_maxlen: int = Field(
        100_000, ge=100, description="Approximate length the Redis stream of events is trimmed to (MAXLEN ~)"
    )
    webhook_allow_private: bool = Field(
        False, description="Allow webhook URLs that resolve to private, loopback or link-local addresses"
    )
    webhook_retry_schedule: str = Field(
        "5,300,1800,7200,18000,36000,36000",
        description="Seconds before each retry of a failed delivery (comma-separated, each with ±20% jitter); "
        "after the last, the delivery is dead-lettered",
    )
    webhook_timeout: float = Field(10.0, gt=0, le=60, description="Seconds a receiver has to answer one delivery")
    webhook_concurrency: int = Field(8, ge=1, le=256, description="Deliveries in flight at once, per process")
    webhook_lease_seconds: float = Field(
        60.0, gt=0, description="How long a claimed delivery is held by its process before another may retry it"
    )
    mlflow_webhook_url: AnyHttpUrl | None = Field(
        None,
        description="The URL at which MLflow reaches this service's receiver (…/api/v1/events/mlflow): set, the "
        "service subscribes to MLflow's own webhooks, so changes made in MLflow directly are seen at once",
    )
    mlflow_webhook_secret: SecretStr | None = Field(
        None, description="Secret MLflow signs its webhooks with (default: one kept in HOKUSAI_HOME)"
    )
    health_check_timeout: float = Field(2.0, gt=0)
    health_cache_ttl: float = Field(
        1.0, ge=0, le=60, description="Seconds a health check result is reused; one check runs at a time either way"
    )

    git_commit: str | None = None
    build_date: str | None = None

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme.split("+", 1)[0] not in {"sqlite", "postgresql", "postgres"}:
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return value

    @property
    def database_dsn(self) -> str:
        """Synchronous SQLAlchemy URL (Alembic, CLI)."""
        if self.database_url is None:
            return f"sqlite:///{(self.home / 'hokusai.db').resolve()}"
        scheme, rest = self.database_url.split("://", 1)
        if scheme.startswith("sqlite"):
            return f"sqlite://{rest}"
        # psycopg 3 serves both the sync and the async engine under one dialect name.
        return f"postgresql+psycopg://{rest}"

    @property
    def async_database_dsn(self) -> str:
        dsn = self.database_dsn
        if dsn.startswith("sqlite://"):
            return "sqlite+aiosqlite://" + dsn.removeprefix("sqlite://")
        return dsn

    @property
    def database_kind(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.database_dsn.startswith("sqlite") else "postgresql"

    @field_validator("rate_limit_registration", "rate_limit_lineage", "rate_limit_impact", "rate_limit_auth_failures")
    @classmethod
    def _limit_notation(cls, value: str) -> str:
        parse_limit(value)
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _retry_schedule(cls, value: str) -> str:
        try:
            delays = [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError("must be seconds separated by commas, e.g. 5,300,1800") from None
        if not delays or any(delay < 0 or delay != delay for delay in delays):
            raise ValueError("must list at least one delay, none negative")
        return value

    @property
    def webhook_retry_delays(self) -> tuple[float, ...]:
        """Seconds before retry 1, 2, ...: a delivery is attempted len + 1 times before it is dead-lettered."""
        return tuple(float(part) for part in self.webhook_retry_schedule.split(",") if part.strip())

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _trusted_proxies(cls, value: str) -> str:
        """As uvicorn reads it, but refused here when malformed: uvicorn would take a typo for a literal host name
        that never matches, and the proxy's X-Forwarded-For would be ignored without a word."""
        entries = [entry.strip() for entry in value.split(",")]
        if entries == ["*"]:
            return "*"
        for entry in entries:
            parse = ipaddress.ip_network if "/" in entry else ipaddress.ip_address
            try:
                parse(entry)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or network (a.b.c.d, a.b.c.0/24); use * alone to trust any"
                ) from None
        return ",".join(entries)

    @field_validator("rate_limit_routes")
    @classmethod
    def _route_limits(cls, value: dict[str, str]) -> dict[str, str]:
        for route, limit in value.items():
            method, _, template = route.strip().partition(" ")
            if not method.isalpha() or not template.startswith("/"):
                raise ValueError(f"route {route!r} must look like 'GET /models/{{model_name}}'")
            parse_limit(limit)
        return value

    @model_validator(mode="after")
    def _one_kind_of_upstream_auth(self) -> Settings:
        if self.mlflow_token and (self.mlflow_username or self.mlflow_password):
            raise ValueError("mlflow_token: set either a token or a username/password for MLflow, not both")
        if bool(self.mlflow_username) != bool(self.mlflow_password):
            raise ValueError("mlflow_username: MLflow basic auth needs both a username and a password")
        return self

    @model_validator(mode="after")
    def _production_profile(self) -> Settings:
        if self.environment != "production":
            return self
        missing = []
        if self.database_kind == "sqlite":
            missing.append("HOKUSAI_DATABASE_URL (a PostgreSQL URL, not SQLite)")
        if self.redis_url is None:
            missing.append("HOKUSAI_REDIS_URL (rate limits, cache and model locks shared by every process)")
        if self.mlflow_url is None:
            missing.append("HOKUSAI_MLFLOW_URL (an external MLflow, not the embedded one)")
        if missing:
            raise ValueError(f"environment: production needs {'; '.join(missing)}")
        return self

    @property
    def redis_key_prefix(self) -> str:
        """HOKUSAI_REDIS_PREFIX, else one derived from the database (its URL without the password), so two services
        sharing a Redis share its keys only when they share their database."""
        if self.redis_prefix is not None:
            return self.redis_prefix
        from sqlalchemy.engine import make_url

        url = make_url(self.database_dsn).render_as_string(hide_password=True)  # the password as "***"
        return f"hokusai:{hashlib.sha256(url.encode()).hexdigest()[:12]}:"

    @property
    def embedded_mlflow(self) -> bool:
        return self.mlflow_url is None

    @property
    def mlflow_webhook_callback(self) -> str | None:
        """Where MLflow's webhooks reach this service: as configured, or, with the embedded MLflow (same host), this
        service's own port on loopback."""
        if self.mlflow_webhook_url is not None:
            return str(self.mlflow_webhook_url)
        if self.embedded_mlflow:
            return f"http://127.0.0.1:{self.port}/api/v1/events/mlflow"
        return None

    @property
    def reuse_mlflow_connections(self) -> bool:
        """An external `mlflow server` runs 4 uvicorn workers by default, where every reused keep-alive connection
        waits ~40 ms on delayed ACKs (bench/gateway.py: 60 ms vs 19 ms per call). The embedded one does not."""
        return self.mlflow_keepalive if self.mlflow_keepalive is not None else self.embedded_mlflow

    @property
    def datasets_root(self) -> Path:
        return (self.datasets_dir or self.home / "datasets").resolve()

    @property
    def lower_is_better(self) -> frozenset[str]:
        return frozenset(part.strip().lower() for part in self.lower_is_better_metrics.split(",") if part.strip())

    @property
    def admin_key_path(self) -> Path:
        return self.home / "admin-key"


def load_settings(**overrides: object) -> Settings:
    """Read the environment; a bad value raises ConfigurationError naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["loc"]:
            field, message = str(first["loc"][0]), first["msg"]
            shown = "" if field in _SECRET_FIELDS else f" (got {first.get('input')!r})"
        else:  # a check across fields names its field first: "mlflow_token: ..."
            field, _, message = str(first["msg"]).removeprefix("Value error, ").partition(": ")
            shown = ""
        raise ConfigurationError(f"{ENV_PREFIX}{field.upper()}: {message}{shown}") from None
