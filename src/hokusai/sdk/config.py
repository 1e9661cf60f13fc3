"""Where the SDK finds its URL and API key: arguments, then `setup()`, then HOKUSAI_URL / HOKUSAI_API_KEY, then
~/.hokusai/config (written by `hokusai login`, mode 0600)."""

from __future__ import annotations

import configparser
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8001"
SECTION = "default"


@dataclass
class Credentials:
    url: str | None = None
    api_key: str | None = None


@dataclass
class _Configured(Credentials):
    # setup(configure_mlflow=True) was called: the stock mlflow client follows the URL of every registry client made
    # afterwards, so `mlflow.start_run()` and `ModelRegistry(url)` always talk to the same service.
    mlflow_follows_registry: bool = False


_configured = _Configured()


def config_path() -> Path:
    return Path(os.environ.get("HOKUSAI_CONFIG", Path.home() / ".hokusai" / "config"))


def read_config() -> Credentials:
    parser = configparser.ConfigParser()
    try:
        parser.read(config_path(), encoding="utf-8")
    except configparser.Error:
        return Credentials()
    if not parser.has_section(SECTION):
        return Credentials()
    return Credentials(parser.get(SECTION, "url", fallback=None), parser.get(SECTION, "api_key", fallback=None))


def write_config(url: str, api_key: str) -> Path:
    """Saved readable by its owner only: it holds a key."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    parser = configparser.ConfigParser()
    parser[SECTION] = {"url": url, "api_key": api_key}
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        parser.write(out)
    path.chmod(0o600)
    return path


def api_base(url: str) -> str:
    """The service's API base from what the caller gave: the reference passes the MLflow URL
    (`.../api/mlflow` -> `.../api`, `.../mlflow` -> `...`)."""
    url = url.rstrip("/")
    return url.removesuffix("/mlflow")


def gateway_url(base: str) -> str:
    return base.rstrip("/") + "/mlflow"


def known_url(url: str | None = None) -> str | None:
    """The service URL the caller gave somewhere (argument, setup(), HOKUSAI_URL, ~/.hokusai/config), or None."""
    found = url or _configured.url or os.environ.get("HOKUSAI_URL") or read_config().url
    return api_base(found) if found else None


def resolve(url: str | None = None, api_key: str | None = None) -> Credentials:
    saved = read_config()
    return Credentials(
        url=known_url(url) or DEFAULT_URL,
        api_key=api_key or _configured.api_key or os.environ.get("HOKUSAI_API_KEY") or saved.api_key,
    )


def point_mlflow_at(base: str, api_key: str) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = gateway_url(base)
    os.environ["MLFLOW_TRACKING_TOKEN"] = api_key


def registry_client_made(credentials: Credentials) -> None:
    """Called by every registry client: after setup(configure_mlflow=True), mlflow follows the client's URL."""
    if _configured.mlflow_follows_registry and credentials.url and credentials.api_key:
        point_mlflow_at(credentials.url, credentials.api_key)


def setup(api_key: str | None = None, url: str | None = None, configure_mlflow: bool = True) -> Credentials:
    """Remember the key (and URL) for every client made afterwards. With `configure_mlflow`, also point the stock
    mlflow client at the service's gateway (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN), so `mlflow.start_run()`
    works right after; a ModelRegistry made later with another URL moves mlflow to that URL too.

    Without any URL (no `url=`, HOKUSAI_URL or `hokusai login`), mlflow is not pointed anywhere yet: it follows the
    first ModelRegistry made, and a warning says so (guessing localhost sent remote users' runs to their own machine).
    """
    if api_key is not None:
        _configured.api_key = api_key
    if url is not None:
        _configured.url = api_base(url)
    resolved = resolve()
    if configure_mlflow:
        _configured.mlflow_follows_registry = True
        base = known_url()
        if base is not None and resolved.api_key:
            point_mlflow_at(base, resolved.api_key)
        elif base is None:
            warnings.warn(
                "hokusai.setup(): no service URL given (url=, HOKUSAI_URL or `hokusai login`); the mlflow client will "
                "be pointed at the URL of the first ModelRegistry you create",
                stacklevel=2,
            )
    return resolved
