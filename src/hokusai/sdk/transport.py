"""HTTP to the service, sync and async over httpx: authentication, retries of idempotent calls (429/502/503/504 and
connection failures, honouring Retry-After), and the server's error bodies turned into the SDK's exceptions.

A request is described once as a `Call`; the two transports only differ in how they wait.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from hokusai import __version__
from hokusai.sdk.errors import AuthenticationError, ConnectionFailed, HokusaiError, RateLimited, error_for
from hokusai.sdk.models import build

RETRY_STATUSES = frozenset({429, 502, 503, 504})
REQUEST_ID_HEADER = "X-Request-ID"
# Waits are announced as warnings: with no logging configured Python prints them on stderr, so a CLI user or a
# script sees why a call takes long instead of a silent hang.
logger = logging.getLogger("hokusai.sdk")


@dataclass(frozen=True)
class Call:
    """One API request and the type its answer is read as (None: the decoded JSON as it is)."""

    method: str
    path: str
    result: Any = None
    params: dict[str, Any] | None = None
    json: Any = None
    idempotent: bool = True  # safe to send again: reads, and writes that carry an Idempotency-Key
    headers: dict[str, str] = field(default_factory=dict)
    pick: str | None = None  # answer with this attribute of the result (`models` of a {"models": [...]} body)


@dataclass
class RetryPolicy:
    max_retries: int = 3
    backoff: float = 0.5  # seconds before the first retry, doubling after each
    max_wait: float = 60.0  # the longest wait, whatever Retry-After says

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        waited = _retry_after(response) if response is not None else None
        if waited is None:
            waited = self.backoff * 2**attempt
        return min(max(waited, 0.0), self.max_wait)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        moment = email.utils.parsedate_to_datetime(value)  # the HTTP-date form
        return moment.timestamp() - time.time() if moment else None


def error_from(response: httpx.Response) -> HokusaiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI's validation errors
        detail = "; ".join(
            f"{'.'.join(str(part) for part in item.get('loc', []))}: {item.get('msg')}" for item in detail
        )
    detail = str(detail or response.reason_phrase or f"HTTP {response.status_code}")
    kind = error_for(response.status_code)
    request_id = response.headers.get(REQUEST_ID_HEADER)
    if kind is RateLimited:
        retry_after = _retry_after(response)
        return RateLimited(
            _rate_limited_detail(response, retry_after), response.status_code, request_id, body, retry_after=retry_after
        )
    return kind(detail, response.status_code, request_id, body)


def _rate_limited_detail(response: httpx.Response, retry_after: float | None) -> str:
    """ "rate limited; retry after 689 s (limit 1000/h)": when to come back and which budget is spent."""
    detail = "rate limited"
    if retry_after is not None:
        detail += f"; retry after {max(0, math.ceil(retry_after))} s"
    limit = response.headers.get("X-RateLimit-Limit")
    window = re.search(r";w=(\d+)", response.headers.get("RateLimit-Policy", ""))
    if limit and window:
        seconds = int(window.group(1))
        per = {3600: "/h", 60: "/min", 86400: "/day", 1: "/s"}.get(seconds, f" per {seconds} s")
        detail += f" (limit {limit}{per})"
    return detail


def without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


class Operations:
    """The operations of a client, written once: `_send` returns the result (sync transport) or an awaitable of it
    (async transport), so a sync client and its async twin share every method."""

    _transport: Transport | AsyncTransport

    def _send(self, call: Call) -> Any:
        return self._transport.run(call)


class _Transport:
    def __init__(self, base_url: str, api_key: str | None, timeout: float, retry: RetryPolicy | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.retry = retry or RetryPolicy()
        self.options = {
            "base_url": self.base_url,
            "timeout": timeout,
            "headers": {"User-Agent": f"hokusai-sdk/{__version__}"}
            | ({"Authorization": f"Bearer {api_key}"} if api_key else {}),
        }

    def _retry_in(self, call: Call, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before sending the call again, or None to stop here. A call that is not idempotent is
        sent again only after a 429, which refused it before anything was done."""
        if attempt >= self.retry.max_retries:
            return None
        if response is None:
            wait = self.retry.delay(attempt, None) if call.idempotent else None
        else:
            retryable = RETRY_STATUSES if call.idempotent else {429}
            if response.status_code not in retryable:
                return None
            asked = _retry_after(response)
            if asked is not None and asked > self.retry.max_wait:
                return None  # the server asks for longer than we would wait: fail now, saying when to come back
            wait = self.retry.delay(attempt, response)
        if wait is not None:
            why = f"HTTP {response.status_code}" if response is not None else "connection failed"
            logger.warning(
                "%s %s: %s; retrying in %.1f s (retry %d of %d)",
                call.method,
                call.path,
                why,
                wait,
                attempt + 1,
                self.retry.max_retries,
            )
        return wait

    def raise_for_status(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            error = error_from(response)
            if isinstance(error, AuthenticationError) and not self.api_key:
                error.detail += (
                    " (no API key: pass api_key=, call hokusai.setup(), set HOKUSAI_API_KEY or `hokusai login`)"
                )
            raise error

    def _answer(self, call: Call, response: httpx.Response) -> Any:
        self.raise_for_status(response)
        data = response.json() if response.content else None
        result = build(call.result, data) if call.result is not None else data
        return getattr(result, call.pick) if call.pick else result


class Transport(_Transport):
    def __init__(self, base_url: str, api_key: str | None, timeout: float = 60.0, retry: RetryPolicy | None = None):
        super().__init__(base_url, api_key, timeout, retry)
        self.client = httpx.Client(**self.options)

    def run(self, call: Call) -> Any:
        attempt = 0
        while True:
            try:
                response = self.client.request(
                    call.method, call.path, params=call.params, json=call.json, headers=call.headers
                )
            except httpx.TransportError as exc:
                if (wait := self._retry_in(call, attempt, None)) is None:
                    raise ConnectionFailed(f"Could not reach {self.base_url}: {exc}") from exc
            else:
                if (wait := self._retry_in(call, attempt, response)) is None or response.status_code < 400:
                    return self._answer(call, response)
            time.sleep(wait)
            attempt += 1

    def close(self) -> None:
        self.client.close()


class AsyncTransport(_Transport):
    def __init__(self, base_url: str, api_key: str | None, timeout: float = 60.0, retry: RetryPolicy | None = None):
        super().__init__(base_url, api_key, timeout, retry)
        self.client = httpx.AsyncClient(**self.options)

    async def run(self, call: Call) -> Any:
        attempt = 0
        while True:
            try:
                response = await self.client.request(
                    call.method, call.path, params=call.params, json=call.json, headers=call.headers
                )
            except httpx.TransportError as exc:
                if (wait := self._retry_in(call, attempt, None)) is None:
                    raise ConnectionFailed(f"Could not reach {self.base_url}: {exc}") from exc
            else:
                if (wait := self._retry_in(call, attempt, response)) is None or response.status_code < 400:
                    return self._answer(call, response)
            await asyncio.sleep(wait)
            attempt += 1

    async def close(self) -> None:
        await self.client.aclose()
