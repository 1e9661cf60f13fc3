"""A webhook receiver for the tests: endpoints at /<path>, each verifying every delivery with the independent
`standardwebhooks` package (what a subscriber's own verifier library would do)."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from standardwebhooks import Webhook as StandardWebhook
from standardwebhooks import WebhookVerificationError

PATIENCE = 120.0  # seconds a hanging receiver holds a request at most


@dataclass
class Arrival:
    path: str
    headers: dict[str, str]
    body: bytes
    payload: dict[str, Any]  # the verified body
    status: int  # what the receiver answered

    @property
    def event_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def seq(self) -> int:
        return self.payload["data"]["seq"]

    @property
    def model(self) -> str | None:
        return self.payload["data"]["subject"]["model_name"]


Responder = Callable[[Arrival, int], int]  # (the arrival, how many times its event reached this path) -> status


class Receiver:
    """Webhook endpoints at /<path>, each with its webhook's secret. Every request is verified with the
    `standardwebhooks` package; one that does not verify is kept in `forged` and answered 400."""

    def __init__(self) -> None:
        receiver = self
        self.secrets: dict[str, str] = {}
        self.arrivals: list[Arrival] = []
        self.forged: list[str] = []
        self.respond: Responder = lambda arrival, nth: 200
        self.delay = 0.0  # seconds each answer takes
        self.gate = threading.Event()  # cleared: requests wait (a receiver that hangs) until it is set again
        self.gate.set()
        self.waiting = 0
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # the answer's headers and body go out at once, not 40 ms apart

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {name.lower(): value for name, value in self.headers.items()}
                path = self.path.lstrip("/")
                status = receiver._receive(path, headers, body)
                if not receiver.gate.is_set():
                    with receiver._lock:
                        receiver.waiting += 1
                    receiver.gate.wait(PATIENCE)
                answer = b"" if status in (204, 304) else b"ok"  # a 204 has no body
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender is gone (a killed dispatcher)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _receive(self, path: str, headers: dict[str, str], body: bytes) -> int:
        secret = self.secrets.get(path)
        try:
            if secret is None:
                raise WebhookVerificationError(f"no secret for /{path}")
            payload = StandardWebhook(secret).verify(body, headers)
        except WebhookVerificationError as exc:
            with self._lock:
                self.forged.append(f"/{path}: {exc}")
            return 400
        arrival = Arrival(path, headers, body, payload, 0)
        with self._lock:
            nth = 1 + sum(1 for a in self.arrivals if a.path == path and a.event_id == arrival.event_id)
            arrival.status = self.respond(arrival, nth)
            self.arrivals.append(arrival)
        time.sleep(self.delay)
        return arrival.status

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    def at(self, path: str) -> list[Arrival]:
        with self._lock:
            return [arrival for arrival in self.arrivals if arrival.path == path]

    def delivered(self, path: str) -> list[Arrival]:
        return [arrival for arrival in self.at(path) if 200 <= arrival.status < 300]

    def stop(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
