"""The policy: actions need ordered scopes, refusals name the scope, unknown actions fail where they are declared."""

from __future__ import annotations

import pytest

from hokusai.server.auth.caller import Caller
from hokusai.server.auth.dependencies import allow
from hokusai.server.auth.keys import Scope
from hokusai.server.auth.policy import Policy, UnknownAction, gateway_action
from hokusai.server.errors import PermissionDenied


def caller(*scopes: Scope) -> Caller:
    return Caller(id="key-1", name="test", scopes=frozenset(scopes))


def test_actions_need_their_scope_or_a_higher_one():
    policy = Policy()
    assert policy.allows(caller(Scope.READ), "models:read")
    assert not policy.allows(caller(Scope.READ), "models:write")
    assert policy.allows(caller(Scope.WRITE), "models:write")
    assert policy.allows(caller(Scope.ADMIN), "keys:admin") and policy.allows(caller(Scope.ADMIN), "dspy:read")
    assert not policy.allows(caller(Scope.WRITE), "keys:admin")
    assert policy.allows(caller(Scope.WRITE), gateway_action(Scope.WRITE))
    assert not policy.allows(caller(Scope.WRITE), gateway_action(Scope.ADMIN))


def test_a_refusal_names_the_scope_the_action_needs():
    with pytest.raises(PermissionDenied) as refused:
        Policy().authorize(caller(Scope.READ), "models:write", "some-model")
    assert refused.value.detail == "This API key lacks the 'write' scope"


def test_listing_filter_keeps_what_the_caller_may_see():
    items = ["a", "b"]
    assert Policy().visible(caller(Scope.READ), "models:read", items, lambda item: item) == items
    assert Policy().visible(caller(), "models:read", items, lambda item: item) == []


def test_guards_carry_the_action_and_its_scope_and_refuse_unknown_actions():
    guard = allow("models:write")
    assert guard.required_action == "models:write" and guard.required_scope is Scope.WRITE
    with pytest.raises(UnknownAction):
        allow("models:fly")
    assert caller(Scope.READ).key_id == "key-1"
