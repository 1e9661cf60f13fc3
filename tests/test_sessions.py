"""Browser sign-in over HTTP against the real service: the login page, the session cookie, cross-site refusals,
sign-out, revocation, one-time login links and redirects of unauthenticated page loads; and the session store on
SQLite and PostgreSQL (expiry, the key's expiry, single use of a link when two processes redeem it at once)."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta

import httpx
import pytest

from hokusai.server.auth.keys import Scope
from hokusai.server.auth.sessions import BrowserSessions, LoginLinkInvalid
from hokusai.server.auth.store import ApiKeyStore
from hokusai.server.db import Database
from hokusai.server.errors import SessionExpired
from hokusai.server.web.browser import local_path
from hokusai.server.web.csrf import csrf_token_for
from tests.support import eventually, run_cli, service_environment

COOKIE = "hokusai_session"
BROWSER_PAGE = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}
EXPERIMENTS = "/mlflow/api/2.0/mlflow/experiments/search?max_results=1"


def create_key(service, scopes: list[str], **body) -> dict:
    with service.client(service.admin_key) as admin:
        answer = admin.post("/api/v1/keys", json={"name": f"browser {scopes}", "scopes": scopes, **body})
    assert answer.status_code == 201, answer.text
    return answer.json()


def browser(service) -> httpx.Client:
    """A client that behaves like a browser about cookies and redirects (followed only when a test asks)."""
    return httpx.Client(base_url=service.base_url, timeout=30)


def sign_in(client: httpx.Client, key: str, next_path: str = "/ui/") -> httpx.Response:
    answer = client.post("/login", data={"api_key": key, "next": next_path}, headers={"Origin": str(client.base_url)})
    assert answer.status_code == 303, answer.text
    return answer


def same_origin(client: httpx.Client) -> dict[str, str]:
    return {"Origin": str(client.base_url).rstrip("/"), "Sec-Fetch-Site": "same-origin"}


def test_login_page_is_an_accessible_form(service):
    with browser(service) as client:
        page = client.get("/login", params={"next": "/mlflow/"})
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<label for="api_key">' in page.text and 'id="api_key"' in page.text
    assert 'value="/mlflow/"' in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_sign_in_sets_an_opaque_http_only_cookie_that_works_for_routes_and_the_gateway(service):
    key = create_key(service, ["read"])["key"]
    with browser(service) as client:
        answer = sign_in(client, key, "/models?limit=1")
        assert answer.headers["location"] == "/models?limit=1"
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower() and "Path=/" in cookie
        assert "Secure" not in cookie  # plain http in a test environment
        token = client.cookies[COOKIE]
        assert key not in cookie and len(token) >= 40
        assert client.get("/models", params={"limit": 1}).status_code == 200
        assert client.get(EXPERIMENTS).status_code == 200
        # A read key's session may not write, through the gateway or the API.
        refused = client.post(
            "/mlflow/api/2.0/mlflow/experiments/create", json={"name": "x"}, headers=same_origin(client)
        )
        assert refused.status_code == 403 and "write" in refused.json()["detail"]


def test_a_bad_key_shows_the_form_again_with_the_error(service):
    with browser(service) as client:
        answer = client.post("/login", data={"api_key": "hk_live_not_a_key", "next": "/ui/"})
        assert answer.status_code == 401
        assert 'role="alert"' in answer.text
        assert COOKIE not in client.cookies
        assert client.post("/login", data={"api_key": " ", "next": "/ui/"}).status_code == 400


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:x"])
def test_next_never_leads_to_another_site(service, target):
    key = create_key(service, ["read"])["key"]
    with browser(service) as client:
        assert sign_in(client, key, target).headers["location"] == "/ui/"


def test_sign_ins_count_against_the_keys_budget(service):
    """A key cannot open sessions without bound: each sign-in is a request of the key."""
    key = create_key(service, ["read"], rate_limit_per_hour=2)["key"]
    for _ in range(2):
        with browser(service) as client:
            sign_in(client, key)
    with browser(service) as client:
        refused = client.post("/login", data={"api_key": key, "next": "/ui/"}, headers={"Origin": service.base_url})
        assert refused.status_code == 429 and 'role="alert"' in refused.text
        assert "retry-after" in refused.headers
        assert COOKIE not in client.cookies


def test_cross_site_writes_with_the_cookie_are_refused_and_same_origin_ones_pass(service):
    key = create_key(service, ["write"])["key"]
    create = "/mlflow/api/2.0/mlflow/experiments/create"
    with browser(service) as client:
        sign_in(client, key)
        token = client.cookies[COOKIE]
        refusals = [
            {"Origin": "https://evil.example"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site", "Origin": str(client.base_url).rstrip("/")},
            {},  # no browser metadata and no CSRF token
            {"X-CSRF-Token": "0" * 64},
        ]
        for headers in refusals:
            answer = client.post(create, json={"name": "cross-site"}, headers=headers)
            assert answer.status_code == 403, (headers, answer.text)
            assert "Cross-site request refused" in answer.json()["detail"]
        made = client.post(create, json={"name": f"same-origin-{token[:8]}"}, headers=same_origin(client))
        assert made.status_code == 200, made.text
        tokened = client.post(
            create, json={"name": f"tokened-{token[:8]}"}, headers={"X-CSRF-Token": csrf_token_for(token)}
        )
        assert tokened.status_code == 200, tokened.text
        # Reads are not concerned, whatever the headers say.
        assert client.get(EXPERIMENTS, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_header_key_clients_are_unaffected_by_cross_site_checks(service):
    key = create_key(service, ["write"])["key"]
    with service.client(key) as client:
        answer = client.post(
            "/mlflow/api/2.0/mlflow/experiments/create",
            json={"name": "header-key-cross-site"},
            headers={"Origin": "https://elsewhere.example", "Sec-Fetch-Site": "cross-site"},
        )
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("path", ["/mlflow/", "/mlflow/static-files/static/js/main.js", "/models", "/ui/"])
def test_unauthenticated_page_loads_go_to_sign_in_and_api_calls_get_json(service, path):
    with browser(service) as client:
        page = client.get(path, headers=BROWSER_PAGE)
        assert page.status_code == 303, page.text
        assert page.headers["location"] == f"/login?next={path}"
        api = client.get(path, headers={"Accept": "application/json"})
        assert api.status_code == 401 and api.json()["detail"] == "API key required"


def test_run_links_printed_by_mlflow_land_on_the_page_after_sign_in(service):
    """`mlflow` prints <tracking uri>/#/experiments/1/runs/<id>: the fragment is kept by the browser across the
    redirect; the login page's script puts it in `next` (checked in the browser tests), and `next` may hold it."""
    with browser(service) as client:
        redirect = client.get("/mlflow", headers=BROWSER_PAGE)
        assert redirect.status_code in (302, 307) and redirect.headers["location"] == "/mlflow/"
        assert client.get("/mlflow/", headers=BROWSER_PAGE).headers["location"] == "/login?next=/mlflow/"
        key = create_key(service, ["read"])["key"]
        landed = sign_in(client, key, "/mlflow/#/experiments/0/runs/abc")
        assert landed.headers["location"] == "/mlflow/#/experiments/0/runs/abc"
        assert client.get("/mlflow/").status_code == 200


def test_sign_out_ends_the_session_and_needs_the_csrf_token(service):
    key = create_key(service, ["read"])["key"]
    with browser(service) as client:
        sign_in(client, key)
        token = client.cookies[COOKIE]
        refused = client.post("/logout", data={"csrf_token": "wrong"})
        assert refused.status_code == 403
        assert client.get(EXPERIMENTS).status_code == 200
        out = client.post("/logout", data={"csrf_token": csrf_token_for(token)}, headers=same_origin(client))
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert COOKIE not in client.cookies
    with httpx.Client(base_url=service.base_url, cookies={COOKIE: token}) as stale:
        answer = stale.get(EXPERIMENTS)
        assert answer.status_code == 401
        assert answer.json()["detail"].startswith("Session expired or signed out")
        assert f'{COOKIE}=""' in answer.headers["set-cookie"]  # the browser is told to drop it


def test_a_revoked_key_ends_its_sessions(service):
    created = create_key(service, ["read"])
    with browser(service) as client:
        sign_in(client, created["key"])
        assert client.get(EXPERIMENTS).status_code == 200
        with service.client(service.admin_key) as admin:
            assert admin.delete(f"/api/v1/keys/{created['id']}").status_code in (200, 204)

        async def refused() -> bool:
            return client.get(EXPERIMENTS).status_code == 401

        asyncio.run(eventually(refused, "the revoked key's session is refused", patience=30))


def test_static_assets_of_the_mlflow_ui_are_not_rate_counted(service):
    key = create_key(service, ["read"], rate_limit_per_hour=4)["key"]  # the sign-in counts one
    with browser(service) as client:
        sign_in(client, key)
        page = client.get("/mlflow/")
        assert page.status_code == 200
        assets = re.findall(r'(?:src|href)="(static-files/[^"]+)"', page.text)
        assert assets, page.text[:500]
        for _ in range(3):
            for asset in assets[:4]:
                assert client.get(f"/mlflow/{asset}").status_code == 200
        assert "x-ratelimit-remaining" not in page.headers
        # API calls are counted: after the sign-in, the fourth in the hour is refused.
        statuses = [client.get(EXPERIMENTS).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]


def test_one_time_login_link_works_once(service):
    key = create_key(service, ["read"])["key"]
    with service.client(key) as cli:
        minted = cli.post("/login/links", json={"next": "/mlflow/"})
    assert minted.status_code == 201, minted.text
    url = minted.json()["url"]
    assert url.startswith(f"{service.base_url}/login/link/")
    with httpx.Client(timeout=30) as first:
        used = first.get(url)
        assert used.status_code == 303 and used.headers["location"] == "/mlflow/"
        assert first.get(f"{service.base_url}{EXPERIMENTS}").status_code == 200
    with httpx.Client(timeout=30) as second:
        again = second.get(url)
        assert again.status_code == 401
        assert "already used" in again.text
        assert COOKIE not in second.cookies
    with httpx.Client(base_url=service.base_url) as anonymous:
        assert anonymous.post("/login/links").status_code == 401


def test_local_path_keeps_only_paths_of_this_site():
    assert local_path("/mlflow/#/experiments/1") == "/mlflow/#/experiments/1"
    for bad in (None, "", "x", "//a.example", "/\\a", "http://a", "/a\nb"):
        assert local_path(bad) == "/ui/"


# The store, on both databases.


@pytest.mark.anyio
async def test_sessions_end_at_their_ttl_at_the_key_expiry_and_on_close(database: Database):
    keys = ApiKeyStore(database)
    key = (await keys.create("s", {Scope.READ}, None, None)).info
    short_key = (await keys.create("short", {Scope.READ}, None, timedelta(seconds=1))).info
    sessions = BrowserSessions(database, ttl=3600, cache_ttl=0)
    opened = await sessions.open(key, "127.0.0.1")
    assert (await sessions.key_of(opened.token)).id == key.id
    bounded = await sessions.open(short_key, None)
    assert bounded.expires_at == short_key.expires_at  # never outlives its key
    await sessions.close(opened.token)
    with pytest.raises(SessionExpired):
        await sessions.key_of(opened.token)
    brief = BrowserSessions(database, ttl=0.2, cache_ttl=60)
    soon = await brief.open(key, None)
    assert (await brief.key_of(soon.token)).id == key.id
    await asyncio.sleep(0.3)
    with pytest.raises(SessionExpired):
        await brief.key_of(soon.token)  # even from the cache
    with pytest.raises(SessionExpired):
        await sessions.key_of("not-a-session")


@pytest.mark.anyio
async def test_revocation_is_seen_through_the_cache_of_this_process(database: Database):
    keys = ApiKeyStore(database)
    key = (await keys.create("r", {Scope.READ}, None, None)).info
    sessions = BrowserSessions(database, ttl=3600, cache_ttl=3600)
    opened = await sessions.open(key, None)
    await sessions.key_of(opened.token)
    await keys.revoke(key.id)
    sessions.forget_key(key.id)
    with pytest.raises(SessionExpired):
        await sessions.key_of(opened.token)


@pytest.mark.anyio
async def test_a_login_link_is_redeemed_once_even_by_concurrent_processes(database: Database):
    keys = ApiKeyStore(database)
    key = (await keys.create("l", {Scope.READ}, None, None)).info
    processes = [BrowserSessions(database, ttl=3600, cache_ttl=0) for _ in range(4)]
    link = await processes[0].mint_link(key.id, "/ui/models")
    outcomes = await asyncio.gather(
        *(process.redeem_link(link.token, None) for process in processes), return_exceptions=True
    )
    won = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    assert len(won) == 1 and won[0].next_path == "/ui/models"
    assert all(isinstance(outcome, LoginLinkInvalid) for outcome in outcomes if outcome is not won[0])
    expired = await BrowserSessions(database, ttl=3600, cache_ttl=0, link_seconds=0).mint_link(key.id, "/ui/")
    with pytest.raises(LoginLinkInvalid):
        await processes[0].redeem_link(expired.token, None)


def test_hokusai_ui_prints_a_link_that_signs_in_once(service):
    key = create_key(service, ["read"])["key"]
    env = service_environment(HOME=str(service.home))
    done = run_cli("ui", "--no-open", "--url", service.base_url, "--api-key", key, "--page", "/mlflow/", env=env)
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip().splitlines()[-1]
    assert link.startswith(f"{service.base_url}/login/link/")
    with httpx.Client(timeout=30) as browser_client:
        used = browser_client.get(link)
        assert used.status_code == 303 and used.headers["location"] == "/mlflow/"
        assert browser_client.get(link).status_code == 401
    logs = service.logs()
    assert "/login/link/[REDACTED]" in logs and link.rsplit("/", 1)[1] not in logs  # the one-time token is masked
    refused = run_cli("ui", "--no-open", "--url", service.base_url, "--api-key", "hk_live_bad", env=env)
    assert refused.returncode == 3, refused.stderr
    assert "error:" in refused.stderr


@pytest.mark.parametrize(
    ("scheme", "environment", "secure"),
    [("http", "development", False), ("https", "development", True), ("http", "production", True)],
)
def test_the_cookie_is_secure_behind_https_and_in_production(scheme, environment, secure):
    from datetime import UTC, datetime

    from starlette.requests import Request

    from hokusai.server.auth.sessions import NewSession
    from hokusai.server.web.signin import signed_in

    request = Request({"type": "http", "scheme": scheme, "method": "POST", "path": "/login", "headers": []})
    opened = NewSession("token", None, datetime.now(UTC) + timedelta(hours=1))  # type: ignore[arg-type]
    cookie = signed_in(request, opened, environment, "/ui/").headers["set-cookie"]
    assert ("Secure" in cookie) is secure
    assert "Max-Age=3" in cookie  # about an hour (3599 or 3600 s)
