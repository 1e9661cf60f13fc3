"""The DSPy tests' language model: the shipped toy server (hokusai.devtools.echo_lm), whose model name picks the
behaviour (instant, slow-<ms>, error, garbage, unformatted), counting what it served per model so tests can assert
concurrency and abandoned calls without timing them."""

from __future__ import annotations

import io
import json
import threading
from collections import Counter

from hokusai.devtools.echo_lm import EchoLanguageModel, answer_for

__all__ = ["FakeLanguageModel", "answer_for"]


class FakeLanguageModel(EchoLanguageModel):
    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.started: Counter[str] = Counter()  # requests received, by model name
        self.finished: Counter[str] = Counter()  # requests answered (or given up on by the client), by model name
        self.most_in_flight: Counter[str] = Counter()  # the most requests at once, by model name
        lock = threading.Lock()
        fake = self
        echo_handler = self.server.RequestHandlerClass

        class CountingHandler(echo_handler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                model = _model_of(body)
                with lock:
                    fake.started[model] += 1
                    in_flight = fake.started[model] - fake.finished[model]
                    fake.most_in_flight[model] = max(fake.most_in_flight[model], in_flight)
                connection, self.rfile = self.rfile, io.BytesIO(body)  # the echo handler reads the body again
                try:
                    super().do_POST()
                finally:
                    self.rfile = connection
                    with lock:
                        fake.finished[model] += 1

        self.server.RequestHandlerClass = CountingHandler


def _model_of(body: bytes) -> str:
    try:
        return str(json.loads(body or b"{}").get("model", "")).rsplit("/", 1)[-1]
    except ValueError:
        return ""
