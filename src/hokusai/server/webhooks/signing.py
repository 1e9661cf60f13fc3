"""Standard Webhooks signatures (https://www.standardwebhooks.com), so any existing verifier library works.

A secret is `whsec_<base64 of 32 random bytes>`. Each delivery carries three headers:

    webhook-id         the event id (evt_...): the same on every retry and redelivery, so receivers deduplicate by it
    webhook-timestamp  unix seconds of this attempt (verifiers refuse one more than five minutes away from their clock)
    webhook-signature  v1,<base64 HMAC-SHA256(key=the secret's decoded bytes, msg="{id}.{timestamp}.{body}")>

The body is signed byte for byte as it is sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time

SECRET_PREFIX = "whsec_"  # noqa: S105 (the prefix of every secret, not a secret)
SECRET_BYTES = 32  # the specification asks for 24 to 64 random bytes
SIGNATURE_VERSION = "v1"
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_...` secret (its base64 part, decoded)."""
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("A webhook secret is whsec_ followed by base64") from None


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value of one attempt: `v1,<base64 HMAC-SHA256>`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signed_headers(secret: str, message_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt; `timestamp` defaults to now."""
    moment = int(time.time()) if timestamp is None else timestamp
    return {
        ID_HEADER: message_id,
        TIMESTAMP_HEADER: str(moment),
        SIGNATURE_HEADER: sign(secret, message_id, moment, body),
    }
