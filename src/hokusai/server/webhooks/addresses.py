"""Where a webhook may send: http(s) URLs without credentials, to public addresses only (unless
HOKUSAI_WEBHOOK_ALLOW_PRIVATE).

Checked twice. When a webhook is saved, its host is resolved and every address must be public, so an admin learns at
once that a URL cannot work. When a delivery connects, the dispatcher's resolver drops every non-public address the
name resolves to *then*: a name that resolved to a public address when it was saved and to 127.0.0.1 later (DNS
rebinding) still cannot reach the service's own network. Redirects are not followed, so a 3xx cannot lead there
either.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from hokusai.server.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ALLOW_PRIVATE_HINT = "set HOKUSAI_WEBHOOK_ALLOW_PRIVATE=true to allow private addresses"


def parse_webhook_url(raw: str) -> URL:
    """The URL, or InvalidRequest saying what is wrong with it (scheme, host, credentials)."""
    if any(character.isspace() or ord(character) < 32 for character in raw):
        raise InvalidRequest("Webhook URL must not contain spaces or control characters")
    try:
        url = URL(raw)
        port = url.port
    except (ValueError, TypeError):
        raise InvalidRequest("Webhook URL is not a valid URL") from None
    if url.scheme not in ("http", "https"):
        raise InvalidRequest("Webhook URL must start with http:// or https://")
    if not url.host:
        raise InvalidRequest("Webhook URL must name a host")
    if url.user is not None or url.password is not None:
        # They would be sent on every delivery and shown by every GET; the signature authenticates the sender.
        raise InvalidRequest("Webhook URL must not carry credentials (user:password@); verify the signature instead")
    if port is None or not 0 < port < 65536:
        raise InvalidRequest("Webhook URL has an invalid port")
    return url


def literal_address(host: str) -> IPAddress | None:
    """The address when `host` is an IP literal (no name to resolve), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def described(kind: str) -> str:
    """The kind with its article: "a loopback address", "an unspecified address"."""
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address"


def non_public_kind(address: IPAddress) -> str | None:
    """Why an address is not a public one ("loopback", "private", ...), or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:  # ::ffff:127.0.0.1 and 2002:7f00:1:: reach the IPv4 address inside
            return non_public_kind(embedded)
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:  # e.g. 100.64.0.0/10, the carrier-grade NAT range
        return "non-public"
    return None


async def check_webhook_destination(url: URL, allow_private: bool, timeout: float) -> None:
    """InvalidRequest unless every address the URL's host resolves to now is public (nothing to check when private
    addresses are allowed). Resolution runs in a worker thread (the event loop's getaddrinfo), bounded by `timeout`."""
    if allow_private:
        return
    host = url.raw_host or ""
    literal = literal_address(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        try:
            async with asyncio.timeout(timeout):
                infos = await asyncio.get_running_loop().getaddrinfo(host, url.port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError, UnicodeError):  # UnicodeError: a name IDNA cannot encode
            raise InvalidRequest(f"Webhook URL host {host[:100]!r} could not be resolved") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    for address in addresses:
        if (kind := non_public_kind(address)) is not None:
            shown = f"{host[:100]} resolves to {address}" if literal is None else str(address)
            raise InvalidRequest(
                f"Webhook URL refused: {shown}, {described(kind)}; webhooks go to public addresses only "
                f"({ALLOW_PRIVATE_HINT})"
            )


class PublicAddressResolver(AbstractResolver):
    """aiohttp's threaded resolver, keeping only public addresses: the connection can only be made to those.

    aiohttp does not ask a resolver about an IP literal; the dispatcher checks those itself before connecting."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        resolved = await self._inner.resolve(host, port, family)
        public = [entry for entry in resolved if non_public_kind(ipaddress.ip_address(_bare(entry["host"]))) is None]
        if not public:
            refused = ", ".join(sorted({_bare(entry["host"]) for entry in resolved}))
            # An OSError (with an errno, so aiohttp shows its text): reported as a connection error, the attempt fails.
            raise OSError(
                errno.EACCES, f"{host} resolves only to non-public addresses ({refused}); {ALLOW_PRIVATE_HINT}"
            )
        return public

    async def close(self) -> None:
        await self._inner.close()


def _bare(host: str) -> str:
    """An address without its IPv6 zone (fe80::1%eth0)."""
    return host.split("%", 1)[0]
