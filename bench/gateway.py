"""What does the gateway cost over talking to MLflow directly, and over MLflow's own authentication?

One MLflow server (one uvicorn worker), one `hokusai serve` in front of it. Alternating in one run, same upstream:
  1. a burst of small REST calls (experiments/search) on keep-alive connections: direct, through the gateway, and
     against MLflow's own authentication (`mlflow server --app-name basic-auth`, one worker, the same backend
     store, a read-only user's credentials: with its credential cache on, and as shipped, without it), beside an
     open `mlflow server` run by the same command (what basic-auth adds to it);
  2. artifact upload and download (streamed PUT/GET of 100 MB),
  3. the stock mlflow client's workflow (tests/mlflow_workflow.py, in this process),
then the gateway's peak RSS. Finally the keep-alive question: against MLflow with 4 uvicorn workers, gateways with
reused upstream connections vs a new connection per call (HOKUSAI_MLFLOW_KEEPALIVE=false).
Targets: small-call latency ratio <= 1.05 (and below MLflow's basic-auth), artifact throughput ratio >= 0.90,
flat memory.

`--only small` runs the first section alone. HOKUSAI_BENCH_BASELINE_SRC=<a src/ tree> adds a second gateway run
from that tree (another version of the code) to the small calls, against the same MLflow: before and after in one
run. MLflow's basic-auth app needs Flask-WTF (`pip install 'mlflow[auth]'`); without it that peer is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from _common import HOKUSAI_SERVE, clean_env, median, mlflow_server_command, spawn, stop_group, wait_for  # noqa: E402

from hokusai.server.auth.keys import generate_api_key  # noqa: E402
from hokusai.server.mlflow.embedded import embedded_mlflow_command, free_loopback_port  # noqa: E402

SMALL_CALLS = 400
# MLflow's basic-auth as shipped checks the password hash (PBKDF2) on every call: about a second each here, so fewer.
UNCACHED_AUTH_CALLS = 15
BASELINE_SRC_VARIABLE = "HOKUSAI_BENCH_BASELINE_SRC"
WORKFLOW_ROUNDS = 3
ARTIFACT_MB = 100
ARTIFACT_ROUNDS = 5


def start_mlflow(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_loopback_port()
    process = spawn(embedded_mlflow_command(home, "127.0.0.1", port))
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/health")
    return process, url


def start_gateway(
    home: Path, mlflow_url: str, key: str, source: str | None = None, **extra: str
) -> tuple[subprocess.Popen, str]:
    """`source`: run the service from this src/ tree instead of the installed one (a baseline version)."""
    port = free_loopback_port()
    if source is not None:
        extra["PYTHONPATH"] = source
    env = clean_env(
        HOKUSAI_HOME=str(home),
        HOKUSAI_PORT=str(port),
        HOKUSAI_MLFLOW_URL=mlflow_url,
        HOKUSAI_BOOTSTRAP_ADMIN_KEY=key,
        HOKUSAI_LOG_LEVEL="WARNING",
        **extra,
    )
    process = spawn(HOKUSAI_SERVE, env)
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/ready")
    return process, url


def start_stock_mlflow(
    store_home: Path, server_home: Path, basic_auth: bool, auth_cache_seconds: int = 0
) -> tuple[subprocess.Popen, str, tuple[str, str] | None]:
    """`mlflow server` as its docs run it, one uvicorn worker, no access log (like the embedded one), on the same
    backend store as the embedded MLflow. With `basic_auth`: MLflow's own authentication, and the credentials of a
    user created for the bench (read permission, the default)."""
    port = free_loopback_port()
    options = ["--uvicorn-opts", "--no-access-log"]
    env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    admin = ("admin", secrets.token_urlsafe(16) + "-A1!")
    if basic_auth:
        config = server_home / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{server_home / 'basic_auth.db'}\n"
            f"admin_username = {admin[0]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {auth_cache_seconds}\n"
        )
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(config),
            MLFLOW_AUTH_ADMIN_PASSWORD=admin[1],
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        )
        options += ["--app-name", "basic-auth"]
    process = spawn(mlflow_server_command(store_home, port, 1, *options), env, cwd=server_home)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health")
        if not basic_auth:
            return process, url, None
        user = ("bench-reader", secrets.token_urlsafe(16) + "-R1!")
        httpx.post(
            f"{url}/api/2.0/mlflow/users/create",
            json={"username": user[0], "password": user[1]},
            auth=admin,
            timeout=120,
        ).raise_for_status()
        return process, url, user
    except BaseException:
        stop_group(process)
        raise


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def small_calls(
    clients: dict[str, httpx.Client], paths: dict[str, str], rounds: int, warmup: int = 20
) -> dict[str, list[float]]:
    def one(name: str) -> None:
        clients[name].get(paths[name], params={"max_results": 10}).raise_for_status()

    for name in clients:
        for _ in range(warmup):
            one(name)
    timings: dict[str, list[float]] = {name: [] for name in clients}
    names = list(clients)
    order = random.Random(17)
    for _ in range(rounds):
        # A new order each round: a fixed one measurably favours some places (two identical gateways differed by
        # 0.3-0.5 ms, 1.06x), as much as the differences measured here.
        order.shuffle(names)
        for name in names:
            timings[name].append(timed(lambda name=name: one(name)))
    return timings


def artifact_throughput(clients: dict[str, httpx.Client], prefixes: dict[str, str], source: Path) -> dict:
    size_mb = source.stat().st_size / 2**20
    results: dict[str, dict[str, list[float]]] = {name: {"up": [], "down": []} for name in clients}

    def file_chunks():
        with open(source, "rb") as handle:
            yield from iter(lambda: handle.read(2**20), b"")

    for _ in range(ARTIFACT_ROUNDS):
        for name, client in clients.items():
            path = f"{prefixes[name]}/api/2.0/mlflow-artifacts/artifacts/bench/{uuid.uuid4().hex}/blob.bin"
            seconds = timed(
                lambda client=client, path=path: client.put(
                    path, content=file_chunks(), headers={"Content-Length": str(source.stat().st_size)}
                ).raise_for_status()
            )
            results[name]["up"].append(size_mb / seconds)

            def download(client=client, path=path) -> None:
                with client.stream("GET", path) as response:
                    response.raise_for_status()
                    for _ in response.iter_raw(2**20):
                        pass

            results[name]["down"].append(size_mb / timed(download))
    return results


def run_workflows(direct_url: str, gateway_url: str, key: str) -> dict[str, list[float]]:
    import logging
    import warnings

    import mlflow
    from tests.mlflow_workflow import main as workflow

    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    timings: dict[str, list[float]] = {"direct": [], "gateway": []}
    targets = {"direct": direct_url, "gateway": f"{gateway_url}/mlflow"}
    for round_index in range(WORKFLOW_ROUNDS + 1):
        for name, uri in targets.items():
            os.environ["MLFLOW_TRACKING_TOKEN"] = key
            mlflow.set_tracking_uri(uri)
            experiment = f"bench-{name}-{uuid.uuid4().hex[:8]}"
            seconds = timed(lambda experiment=experiment: workflow(experiment))
            if round_index:  # the first round warms imports and caches
                timings[name].append(seconds)
    return timings


def keepalive_penalty(home: Path, key: str) -> dict[str, float]:
    """MLflow as `mlflow server` runs it by default (4 uvicorn workers; uvicorn's h11 protocol, as in a plain
    `pip install mlflow` without httptools), behind two gateways: keep-alive on and off. POST runs/search."""
    port = free_loopback_port()
    process = spawn(
        mlflow_server_command(home, port, 4, "--uvicorn-opts", "--http h11 --loop asyncio"),
        clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )
    gateways = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/health")
        (home / "on").mkdir()
        (home / "off").mkdir()
        on_process, on_url = start_gateway(home / "on", url, key, HOKUSAI_MLFLOW_KEEPALIVE="true")
        gateways.append(on_process)
        off_process, off_url = start_gateway(home / "off", url, key)  # the default for an external MLflow
        gateways.append(off_process)
        headers = {"Authorization": f"Bearer {key}"}
        clients = {
            "direct, keep-alive": httpx.Client(base_url=url),
            "direct, new connection per call": httpx.Client(
                base_url=url, limits=httpx.Limits(max_keepalive_connections=0)
            ),
            "gateway, HOKUSAI_MLFLOW_KEEPALIVE=true": httpx.Client(base_url=on_url, headers=headers),
            "gateway, default (no upstream keep-alive)": httpx.Client(base_url=off_url, headers=headers),
        }
        paths = {name: "/mlflow" if name.startswith("gateway") else "" for name in clients}
        body = {"experiment_ids": ["0"], "max_results": 1}
        # Back-to-back calls on one client, as the mlflow client makes them: interleaving clients would let the
        # 40 ms delayed-ACK timer expire between two calls on a connection and hide the penalty.
        timings: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(2):
            for name, client in clients.items():
                for call_index in range(40):
                    seconds = timed(
                        lambda client=client, name=name: client.post(
                            f"{paths[name]}/api/2.0/mlflow/runs/search", json=body
                        ).raise_for_status()
                    )
                    if call_index >= 5:
                        timings[name].append(seconds)
        return {name: median(values) for name, values in timings.items()}
    finally:
        for gateway in gateways:
            stop_group(gateway)
        stop_group(process)


def ratio_line(name: str, ms: float, reference_ms: float, reference: str) -> str:
    return f"  {name}: {ms:.2f} ms median; {ms / reference_ms:.2f}x {reference} ({ms - reference_ms:+.2f} ms)"


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def small_call_section(
    scratch_path: Path, mlflow_url: str, gateways: dict[str, tuple[str, int]], key: str
) -> list[str]:
    """Direct, gateway(s) and MLflow's own authentication, alternating call by call; returns the report lines.
    `gateways`: name -> (url, pid) of "gateway" and, optionally, "gateway, baseline"."""
    headers = {"Authorization": f"Bearer {key}"}
    servers: list[subprocess.Popen] = []
    clients = {"direct": httpx.Client(base_url=mlflow_url, timeout=120)}
    paths = {"direct": ""}
    for name, (url, _) in gateways.items():
        clients[name] = httpx.Client(base_url=url, headers=headers, timeout=120)
        paths[name] = "/mlflow"
    with_auth = importlib.util.find_spec("flask_wtf") is not None
    uncached_auth = None
    try:
        if with_auth:
            for name, basic_auth, cache in (("mlflow server, open", False, 0), ("basic-auth, cache 60 s", True, 60)):
                home = scratch_path / name.replace(" ", "_").replace(",", "")
                home.mkdir()
                process, url, user = start_stock_mlflow(scratch_path / "mlflow", home, basic_auth, cache)
                servers.append(process)
                clients[name] = httpx.Client(base_url=url, auth=user, timeout=120)
                paths[name] = ""
            home = scratch_path / "basic_auth_uncached"
            home.mkdir()
            process, url, user = start_stock_mlflow(scratch_path / "mlflow", home, basic_auth=True)
            servers.append(process)
            uncached_auth = httpx.Client(base_url=url, auth=user, timeout=120)
        search = {name: f"{prefix}/api/2.0/mlflow/experiments/search" for name, prefix in paths.items()}
        cpu_before = {name: cpu_seconds(pid) for name, (_, pid) in gateways.items()}
        small = small_calls(clients, search, SMALL_CALLS)
        # CPU per call of each gateway process: steadier than latency on a shared machine (warm-up calls included).
        cpu_ms = {
            name: (cpu_seconds(pid) - cpu_before[name]) * 1000 / (SMALL_CALLS + 20)
            for name, (_, pid) in gateways.items()
        }
        uncached: dict[str, list[float]] = {}
        if uncached_auth is not None:
            trio = {"direct": clients["direct"], "gateway": clients["gateway"], "basic-auth, as shipped": uncached_auth}
            trio_paths = {name: search.get(name, "/api/2.0/mlflow/experiments/search") for name in trio}
            uncached = small_calls(trio, trio_paths, UNCACHED_AUTH_CALLS, warmup=2)
    finally:
        for server in servers:
            stop_group(server)

    medians = {name: median(values) * 1000 for name, values in small.items()}
    direct_ms, gateway_ms = medians["direct"], medians["gateway"]
    lines = [f"small REST calls ({SMALL_CALLS} rounds alternating experiments/search, keep-alive):"]
    lines.append(f"  direct: {direct_ms:.2f} ms median")
    lines.append(
        ratio_line("gateway", gateway_ms, direct_ms, "direct") + f" (target <= 1.05); {cpu_ms['gateway']:.2f} ms CPU"
    )
    if "gateway, baseline" in medians:
        baseline_ms = medians["gateway, baseline"]
        lines.append(
            ratio_line("gateway, baseline", baseline_ms, direct_ms, "direct")
            + f"; {cpu_ms['gateway, baseline']:.2f} ms CPU"
        )
        lines.append(
            f"  gateway / baseline gateway: {gateway_ms / baseline_ms:.2f} in latency,"
            f" {cpu_ms['gateway'] / cpu_ms['gateway, baseline']:.2f} in CPU per call"
        )
    if with_auth:
        open_ms, cached_ms = medians["mlflow server, open"], medians["basic-auth, cache 60 s"]
        lines.append(ratio_line("mlflow server, open (same command as basic-auth)", open_ms, direct_ms, "direct"))
        lines.append(ratio_line("MLflow basic-auth, credential cache 60 s", cached_ms, open_ms, "its open twin"))
        lines.append(
            f"  gateway / MLflow basic-auth (cached): {gateway_ms / cached_ms:.2f}; what each adds to its open MLflow:"
            f" gateway {gateway_ms - direct_ms:+.2f} ms, basic-auth {cached_ms - open_ms:+.2f} ms"
        )
        trio_ms = {name: median(values) * 1000 for name, values in uncached.items()}
        lines.append(
            f"  MLflow basic-auth as shipped (no credential cache; {UNCACHED_AUTH_CALLS} rounds with direct and"
            f" gateway): {trio_ms['basic-auth, as shipped']:.1f} ms median against direct {trio_ms['direct']:.2f},"
            f" gateway {trio_ms['gateway']:.2f}; gateway / basic-auth"
            f" {trio_ms['gateway'] / trio_ms['basic-auth, as shipped']:.3f}"
        )
    else:
        lines.append("  MLflow basic-auth: skipped (needs Flask-WTF: pip install 'mlflow[auth]')")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["small"], help="run only the small REST call section")
    args = parser.parse_args()
    baseline_src = os.environ.get(BASELINE_SRC_VARIABLE)
    key = generate_api_key()
    # In memory where possible: disk write-back of the uploaded artifacts otherwise lands on whichever side happens
    # to be uploading when it starts, and swamps the difference being measured.
    memory_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=memory_dir) as scratch:
        scratch_path = Path(scratch)
        for name in ("mlflow", "gateway", "baseline"):
            (scratch_path / name).mkdir()
        mlflow_process, mlflow_url = start_mlflow(scratch_path / "mlflow")
        processes = [mlflow_process]
        try:
            # The upstream is a one-worker MLflow on httptools (like the embedded one): keep-alive is right for it.
            gateway_process, gateway_url = start_gateway(
                scratch_path / "gateway", mlflow_url, key, HOKUSAI_MLFLOW_KEEPALIVE="true"
            )
            processes.append(gateway_process)
            gateways = {"gateway": (gateway_url, gateway_process.pid)}
            if baseline_src:
                baseline_process, baseline_url = start_gateway(
                    scratch_path / "baseline", mlflow_url, key, source=baseline_src, HOKUSAI_MLFLOW_KEEPALIVE="true"
                )
                processes.append(baseline_process)
                gateways["gateway, baseline"] = (baseline_url, baseline_process.pid)
            small_lines = small_call_section(scratch_path, mlflow_url, gateways, key)
            if args.only == "small":
                print("\n".join(small_lines))
                return
            if baseline_src:
                stop_group(processes.pop())
            rest = other_sections(scratch_path, mlflow_url, gateway_url, gateway_process, key)
        finally:
            for process in reversed(processes):
                stop_group(process)
        (scratch_path / "multi").mkdir()
        penalty = keepalive_penalty(scratch_path / "multi", key)

    print("\n".join(small_lines))
    artifacts, workflows, idle_rss, peak_rss = rest
    print(f"artifacts ({ARTIFACT_MB} MB, {ARTIFACT_ROUNDS} rounds, median MB/s):")
    for way in ("up", "down"):
        direct_rate, gateway_rate = median(artifacts["direct"][way]), median(artifacts["gateway"][way])
        print(
            f"  {way:4s}: direct {direct_rate:.0f}, gateway {gateway_rate:.0f}; ratio {gateway_rate / direct_rate:.2f}"
            " (target >= 0.90)"
        )
    direct_s, gateway_s = median(workflows["direct"]), median(workflows["gateway"])
    print(
        f"stock mlflow client workflow ({WORKFLOW_ROUNDS} rounds): direct {direct_s:.2f} s, gateway {gateway_s:.2f} s;"
        f" ratio {gateway_s / direct_s:.2f}"
    )
    print(
        f"gateway RSS: idle {idle_rss / 2**20:.0f} MB, peak {peak_rss / 2**20:.0f} MB over artifacts and workflows"
        f" (+{(peak_rss - idle_rss) / 2**20:.0f} MB)"
    )
    print("MLflow with 4 uvicorn workers (h11), POST runs/search, median:")
    for name, seconds in penalty.items():
        print(f"  {name}: {seconds * 1000:.1f} ms")


def other_sections(
    scratch_path: Path, mlflow_url: str, gateway_url: str, gateway_process: subprocess.Popen, key: str
) -> tuple[dict, dict[str, list[float]], int, int]:
    """Artifacts and the stock client's workflow, with the gateway's RSS sampled throughout."""
    peak_rss = [psutil.Process(gateway_process.pid).memory_info().rss]
    idle_rss = peak_rss[0]
    done = threading.Event()

    def sample() -> None:
        process = psutil.Process(gateway_process.pid)
        while not done.is_set():
            peak_rss[0] = max(peak_rss[0], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        clients = {
            "direct": httpx.Client(base_url=mlflow_url, timeout=120),
            "gateway": httpx.Client(base_url=gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=120),
        }
        prefixes = {"direct": "", "gateway": "/mlflow"}
        source = scratch_path / "blob.bin"
        with open(source, "wb") as out:
            for _ in range(ARTIFACT_MB):
                out.write(os.urandom(2**20))
        artifacts = artifact_throughput(clients, prefixes, source)
        workflows = run_workflows(mlflow_url, gateway_url, key)
    finally:
        done.set()
        sampler.join()
    return artifacts, workflows, idle_rss, peak_rss[0]


if __name__ == "__main__":
    main()
