"""Registry of the ORM modules, so Alembic and tests see every table."""


def import_all_models() -> None:
    from hokusai.server.analytics import models as _analytics_models  # noqa: F401
    from hokusai.server.audit import models as _audit_models  # noqa: F401
    from hokusai.server.auth import models as _auth_models  # noqa: F401
    from hokusai.server.dspy import models as _dspy_models  # noqa: F401
    from hokusai.server.events import models as _events_models  # noqa: F401
    from hokusai.server.registry import models as _registry_models  # noqa: F401
    from hokusai.server.webhooks import models as _webhooks_models  # noqa: F401
