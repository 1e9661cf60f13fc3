"""Hokusai Registry.

`import hokusai` must stay light: it is the SDK's face and imports nothing server-side.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hokusai")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
