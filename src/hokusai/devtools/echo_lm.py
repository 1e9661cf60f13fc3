"""A toy OpenAI-compatible chat-completions server (on loopback by default): try DSPy programs without a paid model.

A toy, never used by the service itself: it understands nothing. It answers in DSPy's ChatAdapter format: the
output fields the prompt asks for (`[[ ## name ## ]]` markers in the
last user message), each with a value derived from the first input value, so tests can check what came back.
The model name chooses the behaviour, so one server serves every case at once:
  - `instant`, anything else: answer at once;
  - `slow-<ms>`: answer after that many milliseconds;
  - `error`: HTTP 500; `garbage`: a body that is not JSON; `unformatted`: text without the field markers;
  - `nan`: float fields answered `nan` (which DSPy parses as a float JSON cannot carry).

    python -m hokusai.devtools.echo_lm [--port 8765] [--host 0.0.0.0, in a container others call]
    HOKUSAI_DSPY_LM=openai/echo HOKUSAI_DSPY_API_BASE=http://127.0.0.1:8765/v1 hokusai serve

The DSPy tests and benchmark use it too (tests/fake_lm.py).
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import sys
import threading
import time

FIELD = re.compile(r"\[\[ ## (\w+) ## \]\]")
TYPED_FIELD = re.compile(r"`(\w+)` \(([^)]*)\)")
SAMPLE_VALUES = {"int": "42", "float": "0.5", "bool": "True"}


def answer_for(messages: list[dict], samples: dict[str, str] = SAMPLE_VALUES) -> str:
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    if not isinstance(user, str):
        user = " ".join(part.get("text", "") for part in user)
    asked, _, _ = user.rpartition("Respond with the corresponding output fields")
    inputs = dict(re.findall(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?:\n\n|$)", asked, flags=re.S))
    first_value = next(iter(inputs.values()), "nothing").strip()
    wanted = [name for name in FIELD.findall(user.rpartition("Respond with the corresponding output fields")[2])]
    types = dict(TYPED_FIELD.findall(system))
    parts = []
    for name in wanted:
        if name == "completed":
            continue
        declared = types.get(name, "str")
        literal = re.search(r"Literal\[['\"]?([^'\",\]]+)", declared)
        value = literal.group(1) if literal else samples.get(declared, f"{name} for {first_value}")
        parts.append(f"[[ ## {name} ## ]]\n{value}")
    parts.append("[[ ## completed ## ]]")
    return "\n\n".join(parts)


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 256  # the default 5 refuses connections when a batch opens 16 at once
    daemon_threads = True


class EchoLanguageModel:
    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms per answer.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                server.requests += 1
                model = str(request.get("model", "")).rsplit("/", 1)[-1]
                if model.startswith("slow-"):
                    time.sleep(int(model.removeprefix("slow-")) / 1000)
                if model == "error":
                    return self._send(500, json.dumps({"error": {"message": "the model fell over"}}).encode())
                if model == "garbage":
                    return self._send(200, b"<html>this is not json")
                messages = request.get("messages", [])
                samples = {**SAMPLE_VALUES, "float": "nan"} if model == "nan" else SAMPLE_VALUES
                content = "I would rather not say." if model == "unformatted" else answer_for(messages, samples)
                prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
                body = {
                    "id": f"chatcmpl-{server.requests}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": request.get("model"),
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": len(content.split()),
                        "total_tokens": prompt_tokens + len(content.split()),
                    },
                }
                self._send(200, json.dumps(body).encode())

            def _send(self, status: int, payload: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args) -> None:
                pass

        self.requests = 0
        self.server = _Server((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


DEFAULT_PORT = 8765


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="A toy OpenAI-compatible LM for trying DSPy programs.")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="Interface to listen on (default 127.0.0.1; 0.0.0.0 in a container, e.g. deploy/compose.yaml's `lm`)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"0 picks a free port (default {DEFAULT_PORT})")
    arguments = parser.parse_args(argv)
    server = EchoLanguageModel(arguments.port, arguments.host)
    print(f"echo LM at {server.base_url} (a toy: it echoes, it does not think)", flush=True)
    print(f"  HOKUSAI_DSPY_LM=openai/echo HOKUSAI_DSPY_API_BASE={server.base_url} hokusai serve", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
