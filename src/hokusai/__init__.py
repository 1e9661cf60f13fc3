"""Hokusai Registry.

`import hokusai` is the SDK's face and must stay light: it imports httpx and the SDK, nothing server-side (no
MLflow, FastAPI, SQLAlchemy or DSPy).

    from hokusai import setup, ModelRegistry
    setup(api_key="hk_live_...")
    registry = ModelRegistry("http://127.0.0.1:8001/api/mlflow")
    models = registry.list_models()
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hokusai")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

from hokusai.sdk.config import setup  # noqa: E402
from hokusai.sdk.dspy import AsyncDSPyClient, DSPyClient  # noqa: E402
from hokusai.sdk.errors import (  # noqa: E402
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
from hokusai.sdk.registry import AsyncModelRegistry, ModelRegistry  # noqa: E402
from hokusai.sdk.webhooks import WebhookVerificationError, verify_webhook  # noqa: E402

__all__ = [
    "AsyncDSPyClient",
    "AsyncModelRegistry",
    "AuthenticationError",
    "BadRequest",
    "Conflict",
    "ConnectionFailed",
    "DSPyClient",
    "HokusaiError",
    "ModelRegistry",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ServerError",
    "UpstreamError",
    "ValidationError",
    "WebhookVerificationError",
    "__version__",
    "setup",
    "verify_webhook",
]
