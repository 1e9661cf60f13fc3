"""The API key format.

`hk_live_` or `hk_test_`, then 32 random base62 characters, then a 6-character base62 CRC32 of everything
before it. Like GitHub's and Stripe's tokens, a scanner can recognise a real key offline (prefix plus
checksum), and a typo is refused without a database read. Only the SHA-256 of a key is stored: with 190 bits of
randomness a plain hash cannot be reversed by guessing, so no server secret is needed and the CLI can manage
keys with nothing but the database URL.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import zlib
from enum import StrEnum
from typing import Literal

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
RANDOM_LENGTH = 32
CHECKSUM_LENGTH = 6
DISPLAY_PREFIX_LENGTH = 12  # "hk_live_" plus four random characters: enough to tell keys apart, useless to guess
KEY_PATTERN = re.compile(rf"^hk_(live|test)_[0-9A-Za-z]{{{RANDOM_LENGTH + CHECKSUM_LENGTH}}}$")

KeyKind = Literal["live", "test"]


class Scope(StrEnum):
    """Scopes are ordered: a key holding a scope holds every lower one."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _SCOPE_ORDER.index(self)


_SCOPE_ORDER = [Scope.READ, Scope.WRITE, Scope.ADMIN]


def grants(held: frozenset[Scope] | set[Scope], needed: Scope) -> bool:
    return any(scope.rank >= needed.rank for scope in held)


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, remainder = divmod(number, 62)
        digits.append(BASE62[remainder])
    return "".join(reversed(digits))


def checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def generate_api_key(kind: KeyKind = "live") -> str:
    body = f"hk_{kind}_" + "".join(secrets.choice(BASE62) for _ in range(RANDOM_LENGTH))
    return body + checksum(body)


def is_well_formed(candidate: str) -> bool:
    """Prefix, alphabet, length and checksum: everything that can be checked without the database."""
    if not KEY_PATTERN.fullmatch(candidate):
        return False
    body, check = candidate[:-CHECKSUM_LENGTH], candidate[-CHECKSUM_LENGTH:]
    return secrets.compare_digest(checksum(body), check)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LENGTH]
