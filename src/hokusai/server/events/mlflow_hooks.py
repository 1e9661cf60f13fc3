"""MLflow's own webhooks, subscribed so that a change made in MLflow directly is observed at once.

MLflow (3.3+, SQL backends) calls a URL on registered_model.created, model_version.created, model_version_tag.set
and .deleted, model_version_alias.created and .deleted, signed with a shared secret. It sends each call once, from a
thread pool, and has no event for stage changes, descriptions or deletions: so a call here is only a hint that
names a model (`RegistryChanges.hint`), and the reconciler still finds everything else. Needs, on the MLflow
server, MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true when this service is on a private network (the embedded MLflow gets it)
and a fixed MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY (else MLflow forgets the secret when it restarts).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import logging
import os
import secrets
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from hokusai.server.config import Settings
from hokusai.server.errors import AuthenticationError, HokusaiError, InvalidRequest, NotFound
from hokusai.server.events.changes import RegistryChanges
from hokusai.server.mlflow.registry_client import MlflowApi
from hokusai.server.mlflow.upstream import MlflowUpstream

logger = logging.getLogger(__name__)

SUBSCRIPTION_NAME = "hokusai-events"
SUBSCRIBED_EVENTS = (
    ("REGISTERED_MODEL", "CREATED"),
    ("MODEL_VERSION", "CREATED"),
    ("MODEL_VERSION_TAG", "SET"),
    ("MODEL_VERSION_TAG", "DELETED"),
    ("MODEL_VERSION_ALIAS", "CREATED"),
    ("MODEL_VERSION_ALIAS", "DELETED"),
)
SIGNATURE_HEADER = "x-mlflow-signature"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
DELIVERY_HEADER = "x-mlflow-delivery-id"
TOLERANCE_SECONDS = 300
MAX_HINT_BYTES = 256 * 1024
SUBSCRIBE_RETRY_SECONDS = 5.0
QUIET_SUBSCRIBE_ATTEMPTS = 3


def secret_file_value(path: Path) -> str:
    """The secret kept in HOKUSAI_HOME (made once, mode 0600; the first of several processes to start makes it)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process made it a moment ago and may still be writing
            if value := path.read_text().strip():
                return value
            time.sleep(0.02)
        raise
    value = secrets.token_urlsafe(32)
    with os.fdopen(descriptor, "w") as file:
        file.write(value)
    return value


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's: v1,<base64 HMAC-SHA256 of "<delivery id>.<timestamp>.<body>" keyed with the secret as UTF-8>."""
    signed = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


class MlflowHooks:
    def __init__(self, settings: Settings, upstream: MlflowUpstream, changes: RegistryChanges) -> None:
        self._url = settings.mlflow_webhook_callback
        self._configured_secret = settings.mlflow_webhook_secret
        self._secret_path = settings.home / "mlflow-webhook-secret"
        self._secret: str | None = None
        self._api = MlflowApi(upstream)
        self._changes = changes
        self._task: asyncio.Task | None = None
        self.subscribed = False

    @property
    def enabled(self) -> bool:
        return self._url is not None

    async def start(self) -> None:
        if self._url is None:
            return
        if self._configured_secret is not None:
            self._secret = self._configured_secret.get_secret_value()
        else:
            self._secret = await asyncio.to_thread(secret_file_value, self._secret_path)
        self._task = asyncio.create_task(self._subscribe_until_done(), name="mlflow-webhook-subscription")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def _subscribe_until_done(self) -> None:
        """In the background: MLflow may still be starting, or down; changes are reconciled meanwhile anyway."""
        for attempt in itertools.count(1):
            try:
                await self.subscribe()
                return
            except HokusaiError as exc:
                # The embedded MLflow is still starting when the service is: a warning only if it stays away.
                level = logging.INFO if attempt <= QUIET_SUBSCRIBE_ATTEMPTS else logging.WARNING
                logger.log(level, "Subscribing to MLflow's webhooks failed (%s); retrying", exc.detail)
            await asyncio.sleep(SUBSCRIBE_RETRY_SECONDS)

    async def subscribe(self) -> None:
        """One subscription named SUBSCRIPTION_NAME, pointing here with our secret (MLflow never shows a secret
        back, so ours is written again at each start; a second one made by a racing process is removed)."""
        assert self._url is not None and self._secret is not None
        ours = [hook for hook in await self._list() if hook.get("name") == SUBSCRIPTION_NAME]
        wanted = {
            "url": self._url,
            "events": [{"entity": entity, "action": action} for entity, action in SUBSCRIBED_EVENTS],
            "secret": self._secret,
            "status": "ACTIVE",
        }
        if ours:
            await self._api("PATCH", f"/webhooks/{ours[0]['webhook_id']}", json=wanted)
            for extra in ours[1:]:
                await self._api(
                    "DELETE", f"/webhooks/{extra['webhook_id']}", tolerated=frozenset({"RESOURCE_DOES_NOT_EXIST"})
                )
        else:
            await self._api("POST", "/webhooks", json={"name": SUBSCRIPTION_NAME, **wanted})
        self.subscribed = True
        logger.info("Subscribed to MLflow's webhooks at %s", self._url)

    async def _list(self) -> list[dict[str, Any]]:
        hooks: list[dict[str, Any]] = []
        token = None
        while True:
            params = {"max_results": "1000", **({"page_token": token} if token else {})}
            page = await self._api("GET", "/webhooks", params=params)
            hooks.extend(page.get("webhooks", []))
            token = page.get("next_page_token")
            if not token:
                return hooks

    def receive(self, body: bytes, headers: dict[str, str]) -> str | None:
        """A call from MLflow, verified: the model it names is observed shortly; that name (None: no model)."""
        if self._secret is None:
            raise NotFound("MLflow webhooks are not subscribed (set HOKUSAI_MLFLOW_WEBHOOK_URL)")
        delivery, timestamp = headers.get(DELIVERY_HEADER, ""), headers.get(TIMESTAMP_HEADER, "")
        given = headers.get(SIGNATURE_HEADER, "")
        if not delivery or not timestamp.isdigit() or not given:
            raise AuthenticationError("Missing MLflow webhook signature headers")
        if abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
            raise AuthenticationError("MLflow webhook timestamp outside the tolerance")
        if not hmac.compare_digest(signature(self._secret, delivery, timestamp, body), given):
            raise AuthenticationError("Invalid MLflow webhook signature")
        try:
            data = json.loads(body).get("data") or {}
        except (ValueError, AttributeError):
            raise InvalidRequest("MLflow webhook body must be a JSON object") from None
        name = data.get("name") if isinstance(data, dict) else None
        if isinstance(name, str) and name:
            self._changes.hint(name)
            return name
        return None
