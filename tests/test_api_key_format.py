"""The key format: recognisable offline, typo-proof, and hashed before it is kept."""

import hashlib
import string

import pytest

from hokusai.server.auth.keys import (
    KEY_PATTERN,
    Scope,
    checksum,
    display_prefix,
    generate_api_key,
    grants,
    hash_api_key,
    is_well_formed,
)


def test_generated_keys_have_prefix_random_part_and_checksum():
    live, test = generate_api_key("live"), generate_api_key("test")
    assert live.startswith("hk_live_") and test.startswith("hk_test_")
    for key in (live, test):
        assert KEY_PATTERN.fullmatch(key)
        body = key.split("_", 2)[2]
        assert len(body) == 32 + 6
        assert set(body) <= set(string.ascii_letters + string.digits)
        assert is_well_formed(key)
    assert len({generate_api_key() for _ in range(200)}) == 200


def test_every_single_character_typo_is_caught_offline():
    key = generate_api_key()
    alphabet = string.ascii_letters + string.digits
    for position in range(len("hk_live_"), len(key)):
        for replacement in alphabet:
            if replacement != key[position]:
                typo = key[:position] + replacement + key[position + 1 :]
                assert not is_well_formed(typo), (position, replacement)


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "hk_live_",
        "sk_live_" + "a" * 38,
        "hk_prod_" + "a" * 38,
        "hk_live_" + "a" * 37,
        "hk_live_" + "a" * 39,
        "hk_live_" + "a" * 37 + "!",
        "Bearer hk_live_" + "a" * 38,
    ],
)
def test_malformed_candidates_are_refused(candidate):
    assert not is_well_formed(candidate)


def test_checksum_is_crc_of_the_body_and_prefix_shows_little():
    key = generate_api_key()
    assert key.endswith(checksum(key[:-6]))
    assert display_prefix(key) == key[:12]
    assert hash_api_key(key) == hashlib.sha256(key.encode()).hexdigest()


def test_scopes_are_ordered():
    assert grants({Scope.ADMIN}, Scope.READ) and grants({Scope.ADMIN}, Scope.WRITE)
    assert grants({Scope.WRITE}, Scope.READ) and not grants({Scope.WRITE}, Scope.ADMIN)
    assert grants({Scope.READ}, Scope.READ) and not grants({Scope.READ}, Scope.WRITE)
    assert not grants(set(), Scope.READ)
