"""Version, build date and git commit of the running code."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from hokusai import __version__
from hokusai.server.config import Settings

UNKNOWN = "unknown"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BuildInfo:
    version: str
    build_date: str
    git_commit: str


def read_build_info(settings: Settings) -> BuildInfo:
    """Settings (set by a build, e.g. HOKUSAI_GIT_COMMIT) win; a source checkout answers from git. Blocking."""
    return BuildInfo(
        version=__version__,
        git_commit=settings.git_commit or _from_source_checkout("rev-parse", "--short=12", "HEAD") or UNKNOWN,
        build_date=settings.build_date or _from_source_checkout("log", "-1", "--format=%cs") or UNKNOWN,
    )


def _from_source_checkout(*git_args: str) -> str | None:
    """Ask git, but only if this package is the `src/hokusai` of a git work tree (an editable install)."""
    try:
        top = _git("rev-parse", "--show-toplevel")
        if top is None or Path(top).resolve() / "src" / "hokusai" != _PACKAGE_DIR:
            return None
        return _git(*git_args)
    except OSError:  # no git on this machine
        return None


def _git(*args: str) -> str | None:
    result = subprocess.run(  # noqa: S603 - fixed arguments, no shell
        ["git", "-C", str(_PACKAGE_DIR), *args],  # noqa: S607
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return result.stdout.strip() or None if result.returncode == 0 else None
