"""uvicorn's httptools protocol with a header read timeout, which uvicorn lacks (it has only a keep-alive timeout).

Without it a client that opens a connection and sends a partial request, a byte now and then, holds the
connection forever (a slowloris held 2,000). Here each request's headers must be complete within
`header_timeout` seconds of its first byte (of the connection's opening, for the first request); past that a
partial request is answered 408 and an idle connection closed. Body reads are bounded in the ASGI layer instead
(request_bounds.BoundedBody), where the route is known. An answer sent before its request body was read closes
the connection, lingering so that the client reads the answer rather than a reset.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_TIMEOUT_BODY = json.dumps({"detail": "Request headers not received in time"}).encode()
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n"
    b"connection: close\r\n"
    b"\r\n" + _TIMEOUT_BODY
)


# Lingering close (as nginx's lingering_close): after an answer sent before the request body was read, the client
# is usually still sending. Closing at once would make the kernel answer the unread bytes with a reset, which can
# destroy the answer before the client reads it (an early 401 or 413 would surface as "connection reset"). So the
# write side is shut (FIN after the answer) and what still arrives is dropped, for a moment and a bounded amount.
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 64 * 1024 * 1024


class _LingeringTransport:
    """The connection's transport as uvicorn's request cycle sees it: `close()` lingers while a body is unread."""

    def __init__(self, transport: asyncio.Transport, protocol: HeaderTimeoutProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self._protocol.body_unread():
            self._protocol.linger()
        else:
            self._transport.close()


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._request_begun = False
        self.lingering = False
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_budget = LINGER_MAX_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._raw_transport = transport
        self.transport = _LingeringTransport(transport, self)  # type: ignore[assignment]
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # the rest of a body nobody will read
            self._linger_budget -= len(data)
            if self._linger_budget <= 0:
                self._raw_transport.close()
            return
        super().data_received(data)

    def body_unread(self) -> bool:
        return not self.lingering and self.cycle is not None and self.cycle.more_body

    def linger(self) -> None:
        self.lingering = True
        self._cancel_header_timer()
        if self._raw_transport.can_write_eof():
            self._raw_transport.write_eof()
        self._raw_transport.resume_reading()  # uvicorn pauses reading while a body waits for the app
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self._raw_transport.close)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True
        if self._header_timer is None:  # the first request keeps the deadline counted from the connection's opening
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._request_begun = False
        super().on_headers_complete()
        cycle = self.cycle
        send = cycle.send

        async def send_closing_early_answers(message: Any) -> None:
            # An answer that starts before its request's body finished arriving (an early 401/413, a 404 to a POST)
            # says `connection: close` and ends the connection with a lingering close: the rest of the body is not
            # drained (uvicorn would read and discard it as long as it came), and no client reuses the connection.
            if message["type"] == "http.response.start" and cycle.more_body:
                cycle.keep_alive = False
            await send(message)

        cycle.send = send_closing_early_answers  # run_asgi looks it up when the request task starts

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request's answer is still being written: the stalled next request waits for it.
            self._arm_header_timer()
            return
        if self._request_begun:
            self.transport.write(REQUEST_TIMEOUT_RESPONSE)
        # An idle new connection is closed without an answer: a browser's preconnect is not an error.
        self.transport.close()


def header_timeout_protocol(header_timeout: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to give uvicorn (`http=`), with this header timeout."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": header_timeout})
