"""Where the SDK finds its URL and API key: arguments, then `setup()`, then HOKUSAI_URL / HOKUSAI_API_KEY, then
~/.hokusai/config (written by `hokusai login`, mode 0600)."""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8001"
SECTION = "default"


@dataclass
class Credentials:
    url: str | None = None
    api_key: str | None = None


_configured = Credentials()


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


def resolve(url: str | None = None, api_key: str | None = None) -> Credentials:
    saved = read_config()
    return Credentials(
        url=api_base(url or _configured.url or os.environ.get("HOKUSAI_URL") or saved.url or DEFAULT_URL),
        api_key=api_key or _configured.api_key or os.environ.get("HOKUSAI_API_KEY") or saved.api_key,
    )


def setup(api_key: str | None = None, url: str | None = None, configure_mlflow: bool = True) -> Credentials:
    """Remember the key (and URL) for every client made afterwards. With `configure_mlflow`, also point the stock
    mlflow client at the service's gateway (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN), so `mlflow.start_run()`
    works right after."""
    if api_key is not None:
        _configured.api_key = api_key
    if url is not None:
        _configured.url = api_base(url)
    resolved = resolve()
    if configure_mlflow and resolved.api_key:
        os.environ["MLFLOW_TRACKING_URI"] = gateway_url(resolved.url or DEFAULT_URL)
        os.environ["MLFLOW_TRACKING_TOKEN"] = resolved.api_key
    return resolved
