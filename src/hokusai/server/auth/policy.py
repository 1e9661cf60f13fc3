"""Policy: the one answer to "may this caller do this action (to this resource)?".

Routes (through their guards), services (each operation of a batch, list filtering) and the MLflow gateway all
ask it. Today an action needs one of the ordered key scopes (read < write < admin); per-model rights would be
decided here, from the resource, without touching the callers of `authorize`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from hokusai.server.auth.caller import Caller
from hokusai.server.auth.keys import Scope, grants
from hokusai.server.errors import PermissionDenied

Item = TypeVar("Item")

# Action -> the scope it needs. Actions are "<domain>:<verb>"; the gateway's are "mlflow:<scope>" (its scope
# table decides which scope an MLflow route needs).
ACTIONS: dict[str, Scope] = {
    "models:read": Scope.READ,
    "models:write": Scope.WRITE,
    "dspy:read": Scope.READ,
    "dspy:write": Scope.WRITE,
    "dspy:admin": Scope.ADMIN,
    "keys:admin": Scope.ADMIN,
    "health:admin": Scope.ADMIN,  # resetting the MLflow circuit breaker
    "audit:read": Scope.ADMIN,  # the audit log names every key and address: admins only
    "events:read": Scope.READ,
    "webhooks:admin": Scope.ADMIN,  # subscriptions carry secrets and send data out of the service
    **{f"mlflow:{scope.value}": scope for scope in Scope},
}


class UnknownAction(ValueError):
    """A programming error: an action no entry of the table names."""


def scope_for(action: str) -> Scope:
    """The scope an action needs (by the table, for documents such as the OpenAPI one)."""
    try:
        return ACTIONS[action]
    except KeyError:
        raise UnknownAction(f"No policy for the action {action!r}") from None


def gateway_action(scope: Scope) -> str:
    """The action of an MLflow call, from the scope the gateway's table gives its route."""
    return f"mlflow:{scope.value}"


class Policy:
    def __init__(self, actions: dict[str, Scope] | None = None) -> None:
        self._actions = dict(actions if actions is not None else ACTIONS)

    def scope_for(self, action: str) -> Scope:
        try:
            return self._actions[action]
        except KeyError:
            raise UnknownAction(f"No policy for the action {action!r}") from None

    def allows(self, caller: Caller, action: str, resource: str | None = None) -> bool:
        """Whether `caller` may do `action` (to `resource`, e.g. a model name: not consulted yet)."""
        return grants(caller.scopes, self.scope_for(action))

    def authorize(self, caller: Caller, action: str, resource: str | None = None) -> None:
        """Nothing, or PermissionDenied (403) naming the scope the action needs."""
        if not self.allows(caller, action, resource):
            raise PermissionDenied(f"This API key lacks the '{self.scope_for(action).value}' scope")

    def visible(
        self, caller: Caller, action: str, items: Iterable[Item], resource_of: Callable[[Item], str]
    ) -> list[Item]:
        """The items of a listing the caller may see (the hook for per-resource rights; today: all of them)."""
        return [item for item in items if self.allows(caller, action, resource_of(item))]
