"""What MLflow cannot take, checked before it is asked: version numbers, model names, page tokens, filter values.

MLflow answers some inputs with a 500 (a non-ASCII page token, a number its SQL driver cannot bind, a string
longer than its column on PostgreSQL); that is a bug for the caller to see as a 4xx, and it must not look like
MLflow failing. These checks are pure: the callers choose the error (a version that cannot exist is a 404, a bad
page token a 400, a name that cannot be registered a 422).
"""

from __future__ import annotations

import base64
import binascii
import json
import unicodedata

# model_versions.version is an SQL Integer in MLflow's schema: 32 bits on PostgreSQL and MySQL.
MAX_VERSION = 2**31 - 1
MAX_NAME_LENGTH = 256  # registered_models.name is String(256)
MAX_SOURCE_LENGTH = 500  # model_versions.source is String(500)
MAX_DESCRIPTION_LENGTH = 5000  # model_versions.description is String(5000)
MAX_TAG_KEY_LENGTH = 250  # mlflow.utils.validation.MAX_MODEL_REGISTRY_TAG_KEY_LENGTH
MAX_TAG_VALUE_LENGTH = 5000  # registered-model tag values are String(5000); version tags are kept to the same
MAX_TAGS_PER_REQUEST = 100  # each tag is one MLflow call (mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH)
MAX_ALIAS_LENGTH = 255  # mlflow.utils.validation.MAX_REGISTERED_MODEL_ALIAS_LENGTH
MAX_PAGE_TOKEN_LENGTH = 512  # MLflow's own tokens are ~30 characters
MAX_SQL_INTEGER = 2**63 - 1  # what a 64-bit SQL integer (OFFSET, LIMIT) can hold
# Characters a registered name may not contain: MLflow refuses '/' and ':'; quotes and backslashes break its
# filter strings (a value cannot escape the quote around it, and lists of values fail to parse with a backslash).
UNREGISTRABLE_CHARACTERS = frozenset("/:'\"\\")


# What `GET /models/?include=` may add to each entry (each costs MLflow calls the plain list does not make).
LIST_EXTRAS = frozenset({"aliases"})


def list_extras(include: list[str]) -> set[str]:
    """`include=aliases`, `include=a,b` or the parameter repeated, as one set of names (blanks ignored)."""
    return {part.strip() for value in include for part in value.split(",") if part.strip()}


def is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' (which int() refuses) and '٣' (which it reads as 3)."""
    return text.isascii() and text.isdigit()


def canonical_version(text: str) -> str | None:
    """`"007"` -> `"7"`; None when the text names no version MLflow can hold (not a positive 32-bit integer)."""
    digits = text.lstrip("0")
    if not is_number(text) or not digits or len(digits) > len(str(MAX_VERSION)) or int(digits) > MAX_VERSION:
        return None
    return digits


def holdable_name(name: str) -> bool:
    """A name MLflow can hold and look up: bounded, without NUL (which PostgreSQL text cannot store)."""
    return 0 < len(name) <= MAX_NAME_LENGTH and "\x00" not in name


def name_problem(name: str) -> str | None:
    """Why a name cannot be given to a new registered model, or None when it can.

    Stricter than MLflow, so that every model made through the service can be listed, filtered and addressed.
    """
    if not name.strip() or name.strip() != name:
        return "model names cannot be empty or have surrounding spaces"
    if len(name) > MAX_NAME_LENGTH:
        return f"model names are at most {MAX_NAME_LENGTH} characters"
    if any(character in UNREGISTRABLE_CHARACTERS for character in name):
        return "model names cannot contain '/', ':', quotes or backslashes"
    if any(unicodedata.category(character) in ("Cc", "Cs") for character in name):
        return "model names cannot contain control characters"
    return None


def page_token_problem(token: str) -> str | None:
    """Why a page token cannot be one MLflow made, or None.

    MLflow's tokens are base64 of `{"offset": N}` (SearchUtils.create_page_token); its parser answers a 500 to a
    non-ASCII token, to JSON that is not an object, and to an offset its database cannot bind.
    """
    if len(token) > MAX_PAGE_TOKEN_LENGTH or not token.isascii():
        return "not a page token this service gave out"
    try:
        parsed = json.loads(base64.b64decode(token, validate=True))
    except (binascii.Error, ValueError):
        return "not a page token this service gave out"
    offset = parsed.get("offset") if isinstance(parsed, dict) else None
    if isinstance(offset, str) and is_number(offset) and len(offset) <= 19:
        offset = int(offset)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 < offset <= MAX_SQL_INTEGER:
        return "not a page token this service gave out"
    return None


def filter_literal(value: str) -> str | None:
    """`value` as a string literal for an MLflow search filter (`name = <literal>`), or None when none can hold it.

    MLflow's filter parser strips the enclosing quotes and unescapes nothing: the value is enclosed in a quote
    character it does not contain; a value with both kinds has no literal.
    """
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    return None


def list_literal(value: str) -> str | None:
    """Like `filter_literal`, for an item of `name IN (...)`: MLflow fails to parse a list holding a backslash, a
    newline or a NUL, so such values (and any control character) get None; callers look them up one by one."""
    if "\\" in value or any(unicodedata.category(character) in ("Cc", "Cs") for character in value):
        return None
    return filter_literal(value)
