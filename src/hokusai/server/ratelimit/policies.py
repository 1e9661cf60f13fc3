"""Which limits apply to a request: pure functions over settings, keys and route templates."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from limits import RateLimitItem, RateLimitItemPerHour, parse

API_PREFIX = "/api"
# Served under both `/...` and `/api/...`: one counter whichever prefix a request came through.
DUAL_PREFIX_ROOTS = ("/models", "/mlflow")


@dataclass(frozen=True)
class Policy:
    """A named limit and the counter it is kept in."""

    name: str
    item: RateLimitItem
    counter: str

    @property
    def window_seconds(self) -> int:
        return self.item.get_expiry()


def parse_limit(text: str) -> RateLimitItem:
    """`20/minute`, `100 per hour` ... (the `limits` notation); ValueError when malformed."""
    item = parse(text)
    if item.amount < 1:
        raise ValueError(f"a limit must allow at least one request: {text!r}")
    return item


@lru_cache(maxsize=4096)  # asked on every request; templates (and methods) are few
def route_id(method: str, template: str) -> str:
    """`POST /models/register` for both `/models/register` and `/api/models/register`."""
    for root in DUAL_PREFIX_ROOTS:
        if template.startswith(API_PREFIX + root + "/") or template == API_PREFIX + root:
            template = template[len(API_PREFIX) :]
            break
    return f"{method.upper()} {template}"


@lru_cache(maxsize=1024)
def hourly_limit(amount: int) -> RateLimitItem:
    return RateLimitItemPerHour(amount)


GATEWAY_ROUTE_PREFIX = " /mlflow/"


def key_policies(
    key_id: str,
    key_limit_per_hour: int | None,
    default_per_hour: int,
    route: str | None,
    route_limits: dict[str, RateLimitItem],
    gateway_per_hour: int | None = None,
) -> list[Policy]:
    """The key's hourly budget (its own override or the default), plus the route's policy if it has one.

    With `gateway_per_hour`, MLflow gateway calls of a key without its own limit are counted in a budget of their
    own (a training run makes hundreds of tracking calls); a key's own limit always covers all its traffic."""
    policies = []
    if route is not None and route in route_limits:
        policies.append(Policy("route", route_limits[route], f"route:{key_id}:{route}"))
    if key_limit_per_hour is None and gateway_per_hour is not None and route and GATEWAY_ROUTE_PREFIX in route:
        policies.append(Policy("gateway", hourly_limit(gateway_per_hour), f"gateway:{key_id}"))
        return policies
    hourly = hourly_limit(key_limit_per_hour or default_per_hour)
    policies.append(Policy("key", hourly, f"key:{key_id}"))
    return policies


# Route templates as the registry routes declare them (without the /api prefix).
REGISTRATION_ROUTES = ("POST /models/register",)
LINEAGE_ROUTES = ("GET /models/{model_name}/{version}/lineage", "GET /models/{model_id}/lineage")
# The leaderboard groups every contribution: it shares the impact's limit (each route has its own counter).
IMPACT_ROUTES = ("GET /models/contributors/{address}/impact", "GET /models/contributors")


def route_limits(registration: str, lineage: str, impact: str, extra: dict[str, str]) -> dict[str, RateLimitItem]:
    """The named policies of the API reference, plus any configured `METHOD /template` -> limit."""
    table: dict[str, RateLimitItem] = {}
    for routes, limit in ((REGISTRATION_ROUTES, registration), (LINEAGE_ROUTES, lineage), (IMPACT_ROUTES, impact)):
        for route in routes:
            table[route] = parse_limit(limit)
    for route, limit in extra.items():
        method, _, template = route.strip().partition(" ")
        table[route_id(method, template.strip())] = parse_limit(limit)
    return table
