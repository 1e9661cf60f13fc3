"""What do single-flight cache fills save when cached registry answers expire under load?

One MLflow with 400 model versions (40 models x 10). Two service processes on it, alike but for
HOKUSAI_CACHE_SINGLE_FLIGHT (on / off), each with a 1 s registry cache, behind a pass-through that counts the
MLflow calls each makes. 32 concurrent clients read GET /models/?max_results=100 (and, in a second phase, spread
over 5 one-model lists) for a few seconds, alternating on/off in rounds. Printed: MLflow calls per second of load,
p50/mean/p99 latency and requests/s of each side, medians over the rounds, and the ratios.
With --redis URL, each side is two processes on one Redis (their own prefix), the load split between them.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, stop_group  # noqa: E402
from gateway import start_gateway, start_mlflow  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402

MODELS, VERSIONS = 40, 10
CONCURRENCY = 32
LOAD_SECONDS = 4.0
ROUNDS = 3


class CountingPassThrough:
    """Forwards to MLflow and counts the calls that arrive (one per side, so each side's calls are its own)."""

    def __init__(self, mlflow_url: str) -> None:
        self.calls = 0
        lock = threading.Lock()
        counter = self
        client = httpx.Client(base_url=mlflow_url, timeout=60, limits=httpx.Limits(max_connections=200))

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with lock:
                    counter.calls += 1
                headers = {k: v for k, v in self.headers.items() if k.lower() == "content-type"}
                answer = client.request(self.command, self.path, content=body, headers=headers)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 256
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


async def fill_registry(mlflow_url: str) -> None:
    async with aiohttp.ClientSession(mlflow_url) as session:
        async with session.post("/api/2.0/mlflow/runs/create", json={"experiment_id": "0"}) as answer:
            run = (await answer.json())["run"]["info"]
        for index in range(MODELS):  # one at a time: MLflow's SQLite store refuses concurrent version numbering
            name = f"expiry-model-{index:03d}"
            async with session.post("/api/2.0/mlflow/registered-models/create", json={"name": name}) as answer:
                await answer.read()
            for _ in range(VERSIONS):
                body = {"name": name, "source": f"{run['artifact_uri']}/model", "run_id": run["run_id"]}
                async with session.post("/api/2.0/mlflow/model-versions/create", json=body) as answer:
                    answer.raise_for_status()


async def load(base_urls: list[str], paths: list[str], headers: dict[str, str]) -> tuple[list[float], float]:
    """Latencies of every request made by CONCURRENCY clients over LOAD_SECONDS, and the seconds it took."""
    latencies: list[float] = []
    deadline = time.perf_counter() + LOAD_SECONDS

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        base = base_urls[index % len(base_urls)]
        turn = index
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.get(base + paths[turn % len(paths)], headers=headers) as answer:
                await answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"{answer.url} answered {answer.status}")
            latencies.append(time.perf_counter() - started)
            turn += 1

    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(CONCURRENCY)))
        return latencies, time.perf_counter() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", help="Redis URL: two processes per side on it (single flight across them)")
    options = parser.parse_args()
    key = generate_api_key()
    auth = {"Authorization": f"Bearer {key}"}
    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = Path(scratch)
        (scratch_path / "mlflow").mkdir()
        mlflow_process, mlflow_url = start_mlflow(scratch_path / "mlflow")
        processes = [mlflow_process]
        try:
            asyncio.run(fill_registry(mlflow_url))
            sides: dict[str, tuple[CountingPassThrough, list[str]]] = {}
            per_side = 2 if options.redis else 1
            for side, single_flight in (("on", "true"), ("off", "false")):
                upstream = CountingPassThrough(mlflow_url)
                extra = {"HOKUSAI_REDIS_URL": options.redis, "HOKUSAI_REDIS_PREFIX": f"bench-{secrets.token_hex(4)}:"}
                urls = []
                for index in range(per_side):
                    home = scratch_path / f"{side}-{index}"
                    home.mkdir()
                    process, url = start_gateway(
                        home,
                        upstream.url,
                        key,
                        HOKUSAI_MLFLOW_KEEPALIVE="true",
                        HOKUSAI_RATE_LIMIT_DEFAULT_PER_HOUR="100000000",
                        HOKUSAI_REGISTRY_CACHE_TTL="1",
                        HOKUSAI_CACHE_SINGLE_FLIGHT=single_flight,
                        **(extra if options.redis else {}),
                    )
                    processes.append(process)
                    urls.append(url)
                sides[side] = (upstream, urls)
            workloads = {
                "list 100": ["/models/?max_results=100"],
                "5 one-model lists": [f"/models/?name=expiry-model-{m:03d}" for m in range(5)],
            }
            for workload, paths in workloads.items():
                p50: dict[str, list[float]] = {side: [] for side in sides}
                mean: dict[str, list[float]] = {side: [] for side in sides}
                p99: dict[str, list[float]] = {side: [] for side in sides}
                rates: dict[str, list[float]] = {side: [] for side in sides}
                calls: dict[str, list[float]] = {side: [] for side in sides}
                for _ in range(ROUNDS):
                    for side, (upstream, urls) in sides.items():
                        before = upstream.calls
                        latencies, seconds = asyncio.run(load(urls, paths, auth))
                        calls[side].append((upstream.calls - before) / seconds)
                        p50[side].append(percentile(latencies, 0.5) * 1000)
                        mean[side].append(sum(latencies) / len(latencies) * 1000)
                        p99[side].append(percentile(latencies, 0.99) * 1000)
                        rates[side].append(len(latencies) / seconds)
                on, off = (
                    {
                        k: median(v[s])
                        for k, v in (("calls", calls), ("p50", p50), ("mean", mean), ("p99", p99), ("rate", rates))
                    }
                    for s in ("on", "off")
                )
                print(
                    f"{workload} ({per_side} process(es) per side, {CONCURRENCY} clients, 1 s cache):"
                    f" MLflow calls/s {on['calls']:.1f} vs {off['calls']:.1f} = {off['calls'] / on['calls']:.1f}x"
                    f" fewer; p99 {on['p99']:.0f} ms vs {off['p99']:.0f} ms; p50 {on['p50']:.0f} ms vs"
                    f" {off['p50']:.0f} ms; mean {on['mean']:.0f} ms vs {off['mean']:.0f} ms;"
                    f" {on['rate']:.0f} vs {off['rate']:.0f} requests/s (single flight on vs off)"
                )
        finally:
            for process in reversed(processes):
                stop_group(process)


if __name__ == "__main__":
    main()
