"""verify_webhook: check that a webhook delivery comes from the service, then read it.

Deliveries follow the Standard Webhooks specification (https://www.standardwebhooks.com): the headers
`webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature`, which holds one or more space-separated
`v1,<base64 HMAC-SHA256>` signatures of `<webhook-id>.<webhook-timestamp>.<body>`, keyed with the base64-decoded
part of the subscription's `whsec_...` secret. Any verifier of that specification works as well; this one needs
nothing beyond the standard library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

SECRET_PREFIX = "whsec_"  # noqa: S105 (the format of a secret, not one)
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300  # the specification's suggestion: five minutes either way
REQUIRED_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


class WebhookVerificationError(Exception):
    """The delivery is not signed by the holder of the secret, is too old (or from the future), or is malformed:
    answer it with a 4xx and do not act on it."""


def verify_webhook(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> dict[str, Any]:
    """The delivery's JSON body, once its signature and timestamp are checked; raises WebhookVerificationError.

    `body`: the raw request body, exactly as received (parse it only after verifying). `headers`: the request's
    headers (any mapping; names are matched without regard to case). `secret`: the webhook's `whsec_...` secret,
    shown once when it was created. `now`: Unix seconds (for tests; default the current time).

        event = verify_webhook(request.body, request.headers, secret)   # {"type": ..., "data": {...}}
    """
    raw = body.encode() if isinstance(body, str) else bytes(body)
    found = {name.lower(): value for name, value in headers.items()}
    message_id, timestamp, signatures = (found.get(name, "") for name in REQUIRED_HEADERS)
    missing = [name for name in REQUIRED_HEADERS if not found.get(name)]
    if missing:
        raise WebhookVerificationError(f"missing header(s): {', '.join(missing)}")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {timestamp!r} is not Unix seconds") from None
    current = time.time() if now is None else now
    if sent_at < current - tolerance_seconds:
        raise WebhookVerificationError(f"too old: signed {current - sent_at:.0f}s ago (tolerance {tolerance_seconds}s)")
    if sent_at > current + tolerance_seconds:
        raise WebhookVerificationError(
            f"timestamp {sent_at - current:.0f}s in the future (tolerance {tolerance_seconds}s)"
        )

    signed = f"{message_id}.{timestamp}.".encode() + raw
    expected = base64.b64encode(hmac.new(_signing_key(secret), signed, hashlib.sha256).digest())
    for candidate in signatures.split(" "):
        version, comma, signature = candidate.partition(",")
        # Every candidate is compared in constant time; only v1 (HMAC-SHA256) signatures count.
        if comma and version == SIGNATURE_VERSION and hmac.compare_digest(signature.encode(), expected):
            break
    else:
        raise WebhookVerificationError("no valid signature: the body, its headers or the secret differ")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise WebhookVerificationError(f"the signed body is not JSON: {exc}") from None


def _signing_key(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:  # padding restored: some services show their secrets unpadded
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookVerificationError("the secret is not whsec_<base64>, as the service showed it") from None
    if not key:
        raise WebhookVerificationError("the secret is empty")
    return key
