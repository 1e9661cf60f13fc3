"""What do webhooks cost a registration, and how soon does a change reach a subscriber?

One MLflow and one `hokusai serve` process (SQLite, or PostgreSQL with --database-url). Five local receivers, each
subscribed to every event. Registrations (POST /models/register of a logged model) are timed in rounds that
alternate the five webhooks disabled (no delivery is made) and enabled, so drift on a shared machine falls on both
sides alike. For every registration made with the webhooks enabled, the time from the 201 to the arrival of its
model_version.created delivery at each receiver is the delivery latency.
Printed: registration p50/mean with 0 and with 5 webhooks and their ratio (target: under 1.05), delivery p50/p99.
"""

from __future__ import annotations

import argparse
import http.server
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, stop_group  # noqa: E402
from gateway import start_gateway, start_mlflow  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402

RECEIVERS = 5
ROUNDS = 6
REGISTRATIONS_PER_PHASE = 15


class Receiver:
    """Answers 204 and notes when each webhook-id first arrived (perf_counter of this process)."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.arrivals.setdefault(self.headers.get("webhook-id", ""), time.perf_counter())
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def logged_model(mlflow_url: str) -> str:
    with httpx.Client(base_url=mlflow_url + "/api/2.0/mlflow", timeout=30) as mlflow:
        created = mlflow.post("/logged-models", json={"experiment_id": "0", "name": "bench-events"})
        created.raise_for_status()
        return created.json()["model"]["info"]["model_id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="PostgreSQL URL for the service (default: SQLite)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--per-phase", type=int, default=REGISTRATIONS_PER_PHASE)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        mlflow_process, mlflow_url = start_mlflow(home / "mlflow")
        key = generate_api_key()
        extra = {"HOKUSAI_WEBHOOK_ALLOW_PRIVATE": "true", "HOKUSAI_RATE_LIMIT_REGISTRATION": "100000/minute"}
        if args.database_url:
            extra["HOKUSAI_DATABASE_URL"] = args.database_url
        service_process, url = start_gateway(home / "service", mlflow_url, key, **extra)
        try:
            run(url, key, logged_model(mlflow_url), args.rounds, args.per_phase)
        finally:
            stop_group(service_process)
            stop_group(mlflow_process)


def run(url: str, key: str, model_id: str, rounds: int, per_phase: int) -> None:
    receivers = [Receiver() for _ in range(RECEIVERS)]
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    hooks = []
    for receiver in receivers:
        made = client.post("/api/v1/webhooks", json={"url": receiver.url, "event_types": ["*"], "enabled": False})
        made.raise_for_status()
        hooks.append(made.json()["id"])
    name = "bench-events-" + secrets.token_hex(4)

    def register() -> tuple[float, float, float, str]:
        started = time.perf_counter()
        answer = client.post(
            "/models/register",
            json={"model_data": f"models:/{model_id}", "model_name": name, "model_type": "classification"},
        )
        answered = time.perf_counter()
        answer.raise_for_status()
        return answered - started, started, answered, answer.json()["version"]

    def set_enabled(enabled: bool) -> None:
        for hook in hooks:
            client.patch(f"/api/v1/webhooks/{hook}", json={"enabled": enabled}).raise_for_status()

    for _ in range(5):
        register()  # warm: the model exists, caches and connections are made
    latency: dict[bool, list[float]] = {False: [], True: []}
    acknowledged: dict[str, tuple[float, float]] = {}  # version -> (its 201 arrived, it was sent); webhooks on
    for index in range(rounds):
        for enabled in (False, True) if index % 2 == 0 else (True, False):
            set_enabled(enabled)
            for _ in range(per_phase):
                seconds, started, answered, version = register()
                latency[enabled].append(seconds)
                if enabled:
                    acknowledged[version] = (answered, started)
    set_enabled(True)

    created = {}
    cursor = None
    while True:
        params = {
            "model": name,
            "type": "model_version.created",
            "limit": 500,
            **({"cursor": cursor} if cursor else {}),
        }
        page = client.get("/api/v1/events", params=params).json()
        created.update({event["subject"]["version"]: event["id"] for event in page["events"]})
        cursor = page["next_cursor"]
        if not cursor:
            break
    expected = [(created[version], times) for version, times in acknowledged.items() if version in created]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
        event_id in receiver.arrivals for receiver in receivers for event_id, _ in expected
    ):
        time.sleep(0.2)
    delivery = [  # from the 201's arrival (negative: delivered before the answer reached the client)
        receiver.arrivals[event_id] - answered
        for receiver in receivers
        for event_id, (answered, _) in expected
        if event_id in receiver.arrivals
    ]
    from_start = [  # from the moment the registration was sent
        receiver.arrivals[event_id] - started
        for receiver in receivers
        for event_id, (_, started) in expected
        if event_id in receiver.arrivals
    ]
    missing = len(expected) * len(receivers) - len(delivery)

    off, on = latency[False], latency[True]
    print(json.dumps({"registrations_per_side": len(off), "receivers": RECEIVERS, "rounds": rounds}))
    print(
        f"registration p50  0 webhooks {median(off) * 1000:7.1f} ms   5 webhooks {median(on) * 1000:7.1f} ms"
        f"   ratio {median(on) / median(off):.3f}  (target < 1.05)"
    )
    print(
        f"registration mean 0 webhooks {statistics.fmean(off) * 1000:7.1f} ms   5 webhooks "
        f"{statistics.fmean(on) * 1000:7.1f} ms   ratio {statistics.fmean(on) / statistics.fmean(off):.3f}"
    )
    if delivery:
        print(
            f"registration sent -> delivered ({len(delivery)} deliveries, {missing} missing): "
            f"p50 {percentile(from_start, 0.5) * 1000:.1f} ms  p99 {percentile(from_start, 0.99) * 1000:.1f} ms"
        )
        print(
            f"201 received -> delivered: p50 {percentile(delivery, 0.5) * 1000:.1f} ms  "
            f"p99 {percentile(delivery, 0.99) * 1000:.1f} ms  max {max(delivery) * 1000:.1f} ms"
        )
    else:
        print(f"no delivery arrived ({missing} missing)")


if __name__ == "__main__":
    main()
