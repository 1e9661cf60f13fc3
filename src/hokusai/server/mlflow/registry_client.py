"""RegistryClient: the MLflow registry and tracking calls the service makes, typed, over the one upstream client.

MLflow's REST shapes (paging, tag lists, filter quoting, version numbers, download URIs, error codes) are handled
here once; callers get small frozen dataclasses, never MLflow's JSON. Every call goes through `MlflowApi`, the one
place that turns MLflow's answers into our errors (and that tests count calls at).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hokusai.server.errors import Conflict, InvalidRequest, NotFound
from hokusai.server.mlflow.upstream import MlflowUpstream, UpstreamFailed
from hokusai.server.registry.inputs import canonical_version, filter_literal, holdable_name, list_literal

logger = logging.getLogger(__name__)
API = "/api/2.0/mlflow"

# MLflow answers a database error it did not expect with the driver's text: `(sqlite3.IntegrityError) UNIQUE
# constraint failed ... [SQL: INSERT ...]` (as BAD_REQUEST, 400) when two writes race, for instance two requests
# setting the same alias. Such text names tables and statements: it is never relayed to a caller.
DATABASE_ERROR = re.compile(r"\[SQL: |\((?:sqlite3|psycopg2?|pymysql|MySQLdb|pyodbc)\.|IntegrityError|OperationalError")
CONFLICT_RETRIES = 3  # a write that lost a race was rolled back whole by MLflow: trying it again is safe
PAGE_SIZE_LIMIT = 1000  # MLflow's own cap for model-versions/search, registered-models/search and runs/search
IDS_PER_SEARCH = 500  # run and logged-model ids per `IN (...)` filter
LOGGED_MODELS_PAGE = 500
# Names per `name IN (...)` call when reading registered models: keeps MLflow's request line well under 8 KB.
NAME_FILTER_CHARS = 2000
LOGGED_MODEL = re.compile(r"^models:/(m-[0-9a-f]{32})$")


class ConcurrentChange(Conflict):
    def __init__(self) -> None:
        super().__init__("The change conflicted with a concurrent change to the same model; retry it")


class ModelNotFound(NotFound):
    def __init__(self, name: str, version: str) -> None:
        super().__init__(f"Model not found: {name}:{version}")


def quoted(value: str) -> str:
    """A string literal for an MLflow filter that the value cannot break out of (see `inputs.filter_literal`)."""
    literal = filter_literal(value)
    if literal is None:
        raise InvalidRequest("A model name containing both ' and \" cannot be searched in MLflow")
    return literal


def name_filter(name: str) -> str:
    """The model-versions/search filter for one model's versions; InvalidRequest when no literal can hold the name."""
    return f"name = {quoted(name)}"


def version_number(name: str, version: str) -> str:
    """The one check of a (name, version) taken from a caller: a positive integer MLflow can hold, of a name it can
    hold; anything else names no model version (404), and MLflow is not asked."""
    canonical = canonical_version(version)
    if canonical is None or not holdable_name(name):
        raise ModelNotFound(name, version)
    return canonical


def tag_dict(raw: Iterable[Mapping[str, Any]] | None) -> dict[str, str]:
    """MLflow's `[{"key": k, "value": v}, ...]` as a dict."""
    return {tag["key"]: tag.get("value", "") for tag in raw or []}


def tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in tags.items()]


def latest_metrics(metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The latest value of each key (by step, then timestamp), as MLflow shows a run's metrics."""
    latest: dict[str, tuple[int, int, float]] = {}
    for metric in metrics:
        order = (int(metric.get("step", 0) or 0), int(metric.get("timestamp", 0) or 0))
        value = float(metric.get("value", 0.0))
        if metric["key"] not in latest or order >= latest[metric["key"]][:2]:
            latest[metric["key"]] = (*order, value)
    return {key: value for key, (_, _, value) in latest.items()}


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    stage: str = "None"
    status: str = "READY"
    description: str = ""
    source: str = ""
    run_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # only model-versions/get (and get-by-alias) return them; search does not
    created_ms: int = 0
    updated_ms: int = 0

    @property
    def logged_model_id(self) -> str | None:
        match = LOGGED_MODEL.match(self.source)
        return match.group(1) if match else None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelVersion:
        return cls(
            name=raw["name"],
            version=raw["version"],
            stage=raw.get("current_stage", "None"),
            status=raw.get("status", "READY"),
            description=raw.get("description", ""),
            source=raw.get("source", ""),
            run_id=raw.get("run_id") or None,
            tags=tag_dict(raw.get("tags")),
            aliases=tuple(raw.get("aliases", [])),
            created_ms=int(raw.get("creation_timestamp") or 0),
            updated_ms=int(raw.get("last_updated_timestamp") or 0),
        )


@dataclass(frozen=True)
class VersionPage:
    versions: tuple[ModelVersion, ...]
    next_page_token: str | None


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, version), in MLflow's order
    description: str = ""
    created_ms: int = 0
    updated_ms: int = 0

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RegisteredModel:
        aliases = tuple((alias["alias"], alias["version"]) for alias in raw.get("aliases", []))
        return cls(
            name=raw["name"],
            tags=tag_dict(raw.get("tags")),
            aliases=aliases,
            description=raw.get("description", "") or "",
            created_ms=int(raw.get("creation_timestamp") or 0),
            updated_ms=int(raw.get("last_updated_timestamp") or 0),
        )


@dataclass(frozen=True)
class RunDataset:
    """A dataset logged on a run with mlflow.log_input."""

    name: str
    digest: str
    source_type: str
    source: str
    context: str | None


@dataclass(frozen=True)
class Run:
    run_id: str
    experiment_id: str
    artifact_uri: str
    metrics: Mapping[str, float] = field(default_factory=dict)  # the latest value of each key
    tags: Mapping[str, str] = field(default_factory=dict)
    datasets: tuple[RunDataset, ...] = ()
    model_outputs: tuple[str, ...] = ()  # ids of the logged models the run produced

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Run:
        info, data = raw.get("info") or {}, raw.get("data") or {}
        datasets = []
        for entry in (raw.get("inputs") or {}).get("dataset_inputs", []):
            dataset = entry.get("dataset", {})
            datasets.append(
                RunDataset(
                    name=dataset.get("name", ""),
                    digest=dataset.get("digest", ""),
                    source_type=dataset.get("source_type", ""),
                    source=dataset.get("source", ""),
                    context=tag_dict(entry.get("tags")).get("mlflow.data.context"),
                )
            )
        outputs = (raw.get("outputs") or {}).get("model_outputs", [])
        return cls(
            run_id=info.get("run_id", ""),
            experiment_id=info.get("experiment_id", ""),
            artifact_uri=info.get("artifact_uri", ""),
            metrics=latest_metrics(data.get("metrics", [])),
            tags=tag_dict(data.get("tags")),
            datasets=tuple(datasets),
            model_outputs=tuple(output["model_id"] for output in outputs),
        )


@dataclass(frozen=True)
class LoggedModel:
    model_id: str
    name: str | None
    metrics: Mapping[str, float] = field(default_factory=dict)  # the latest value of each key

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> LoggedModel:
        info = raw.get("info") or {}
        return cls(
            model_id=info.get("model_id", ""),
            name=info.get("name") or None,
            metrics=latest_metrics((raw.get("data") or {}).get("metrics", [])),
        )


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    name: str | None


@dataclass(frozen=True)
class RunPage:
    runs: tuple[Run, ...]
    next_page_token: str | None


class MlflowApi:
    """One MLflow REST call through the upstream client, its errors turned into ours."""

    def __init__(self, upstream: MlflowUpstream) -> None:
        self.upstream = upstream

    async def __call__(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: Any = None,
        not_found: NotFound | None = None,
        tolerated: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """`path` under /api/2.0/mlflow; `tolerated` MLflow error codes count as success (their body is returned).

        A 404 raises `not_found` when given, any other 4xx an InvalidRequest with MLflow's message, a 5xx
        UpstreamFailed (502). A write that lost a database race inside MLflow is tried again a few times, then
        answered 409; MLflow's database text never reaches the caller.
        """
        for attempt in range(CONFLICT_RETRIES + 1):
            response = await self.upstream.request(method, API + path, params=params, json=json)
            body = _error_body(response.body)
            if response.status_code < 400:
                return body
            if body.get("error_code") in tolerated:
                return body
            message = str(body.get("message", ""))
            if response.status_code == 404 and not_found is not None:
                raise not_found
            if not DATABASE_ERROR.search(message):
                break
            logger.warning("MLflow %s %s hit a database error (attempt %d)", method, path, attempt + 1)
            if response.status_code >= 500:
                raise UpstreamFailed(response.status_code, "database error")
            if attempt < CONFLICT_RETRIES:
                await asyncio.sleep(0.05 * (attempt + 1))
        else:
            raise ConcurrentChange()
        if response.status_code < 500:
            raise InvalidRequest(message or f"MLflow refused the request ({response.status_code})")
        raise UpstreamFailed(response.status_code, message)


def _error_body(raw: bytes) -> dict[str, Any]:
    """MLflow's JSON body; an empty or non-JSON one (an HTML 500 page) as {} rather than a parse error."""
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class RegistryClient:
    """MLflow's model registry and the tracking reads and writes the service needs, one method per question.

    Versions given by callers are canonicalised here (`"007"` -> `"7"`); a version that cannot exist, or that
    MLflow does not have, is `ModelNotFound(name, <the version as given>)`.
    """

    def __init__(self, call: MlflowApi) -> None:
        self.call = call

    @classmethod
    def over(cls, upstream: MlflowUpstream) -> RegistryClient:
        return cls(MlflowApi(upstream))

    # Model versions

    async def search_versions(
        self,
        filter_string: str | None = None,
        max_results: int = PAGE_SIZE_LIMIT,
        page_token: str | None = None,
        order_by: str | None = None,
    ) -> VersionPage:
        """One page of versions matching the filter (`name_filter(name)` for one model's), or of all."""
        params = {"max_results": str(max_results)}
        if order_by:
            params["order_by"] = order_by
        if filter_string:
            params["filter"] = filter_string
        if page_token:
            params["page_token"] = page_token
        page = await self.call("GET", "/model-versions/search", params=params)
        versions = tuple(ModelVersion.from_json(raw) for raw in page.get("model_versions", []))
        return VersionPage(versions, page.get("next_page_token") or None)

    async def every_version(self, name: str | None = None) -> AsyncIterator[ModelVersion]:
        """Every version (of one model when named), read 1,000 a page.

        A name no filter literal can hold (both quotes, made straight in MLflow) is found by reading every version:
        slower, but such a model never fails a read.
        """
        literal = filter_literal(name) if name is not None else None
        page_token = None
        while True:
            page = await self.search_versions(
                f"name = {literal}" if literal is not None else None, page_token=page_token
            )
            for version in page.versions:
                if name is None or literal is not None or version.name == name:
                    yield version
            page_token = page.next_page_token
            if not page_token:
                return

    async def version_tagged(self, name: str, key: str, value: str) -> ModelVersion | None:
        """The oldest version of the model carrying the tag `key` = `value`, or None.

        model-versions/search filters on `tags.<key>` in MLflow's SQL store; a name no literal can hold is read
        version by version instead."""
        literal = filter_literal(name)
        if literal is None:
            found = [v async for v in self.every_version(name) if v.tags.get(key) == value]
        else:
            page = await self.search_versions(f"name = {literal} AND tags.`{key}` = {quoted(value)}")
            found = list(page.versions)
        return min(found, key=lambda v: int(v.version), default=None)

    async def get_version(self, name: str, version: str) -> ModelVersion:
        number = version_number(name, version)
        found = await self.call(
            "GET",
            "/model-versions/get",
            params={"name": name, "version": number},
            not_found=ModelNotFound(name, version),
        )
        return ModelVersion.from_json(found["model_version"])

    async def version_by_alias(self, name: str, alias: str) -> ModelVersion:
        if not holdable_name(name):
            raise ModelNotFound(name, f"@{alias}")
        found = await self.call(
            "GET",
            "/registered-models/alias",
            params={"name": name, "alias": alias},
            not_found=ModelNotFound(name, f"@{alias}"),
        )
        return ModelVersion.from_json(found["model_version"])

    async def create_version(
        self,
        name: str,
        source: str,
        tags: Mapping[str, str],
        run_id: str | None = None,
        model_id: str | None = None,
    ) -> ModelVersion:
        payload: dict[str, Any] = {"name": name, "source": source, "tags": tag_list(tags)}
        if run_id:
            payload["run_id"] = run_id
        if model_id:
            payload["model_id"] = model_id
        created = await self.call("POST", "/model-versions/create", json=payload)
        return ModelVersion.from_json(created["model_version"])

    async def update_description(self, name: str, version: str, description: str) -> None:
        number = version_number(name, version)
        await self.call(
            "PATCH", "/model-versions/update", json={"name": name, "version": number, "description": description}
        )

    async def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        number = version_number(name, version)
        await self.call(
            "POST", "/model-versions/set-tag", json={"name": name, "version": number, "key": key, "value": value}
        )

    async def delete_version_tag(self, name: str, version: str, key: str) -> None:
        number = version_number(name, version)
        await self.call("DELETE", "/model-versions/delete-tag", json={"name": name, "version": number, "key": key})

    async def transition_stage(self, name: str, version: str, stage: str, archive_existing: bool) -> None:
        number = version_number(name, version)
        await self.call(
            "POST",
            "/model-versions/transition-stage",
            json={"name": name, "version": number, "stage": stage, "archive_existing_versions": archive_existing},
        )

    async def delete_version(self, name: str, version: str) -> None:
        number = version_number(name, version)
        await self.call(
            "DELETE",
            "/model-versions/delete",
            json={"name": name, "version": number},
            not_found=ModelNotFound(name, version),
        )

    async def download_uri(self, name: str, version: str) -> str:
        """Where MLflow serves the version's files (`mlflow-artifacts:/...` when it serves them)."""
        number = version_number(name, version)
        located = await self.call(
            "GET",
            "/model-versions/get-download-uri",
            params={"name": name, "version": number},
            not_found=ModelNotFound(name, version),
        )
        return located["artifact_uri"]

    # Registered models and aliases

    async def registered_model(self, name: str) -> RegisteredModel:
        """The registered model; MLflow's refusal (one that does not exist included) is an InvalidRequest."""
        found = await self.call("GET", "/registered-models/get", params={"name": name})
        return RegisteredModel.from_json(found["registered_model"])

    async def find_registered_model(self, name: str) -> RegisteredModel | None:
        """The registered model, or None when it is gone (or MLflow cannot look that name up)."""
        found = await self.call(
            "GET",
            "/registered-models/get",
            params={"name": name},
            tolerated=frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}),
        )
        return RegisteredModel.from_json(found["registered_model"]) if "registered_model" in found else None

    async def registered_models(self, names: Iterable[str]) -> list[RegisteredModel]:
        """The registered models of these names that exist, in a few calls side by side.

        Names are asked for in `name IN (...)` lists; a name no list literal can hold (made straight in MLflow, with
        both quotes, a backslash or a control character) is read on its own with registered-models/get, which takes
        it as a plain parameter. One odd name never fails the whole.
        """
        listable, odd = [], []
        for name in sorted(set(names)):
            literal = list_literal(name)
            (listable if literal is not None else odd).append(literal or name)
        chunks: list[list[str]] = []
        for literal in listable:
            if not chunks or sum(len(item) + 2 for item in chunks[-1]) + len(literal) > NAME_FILTER_CHARS:
                chunks.append([])
            chunks[-1].append(literal)
        found = await asyncio.gather(*(self._models_in(chunk) for chunk in chunks), *(self._one(name) for name in odd))
        return [model for models in found for model in models]

    async def _models_in(self, literals: list[str]) -> list[RegisteredModel]:
        """The registered models named in one `IN` list; should MLflow refuse the list, each is read by name."""
        try:
            found = await self.call(
                "GET",
                "/registered-models/search",
                params={"filter": f"name IN ({', '.join(literals)})", "max_results": str(PAGE_SIZE_LIMIT)},
            )
        except InvalidRequest as exc:
            logger.warning("MLflow refused a list of %d model names (%s): reading them one by one", len(literals), exc)
            one_by_one = await asyncio.gather(*(self._one(literal[1:-1]) for literal in literals))
            return [model for models in one_by_one for model in models]
        return [RegisteredModel.from_json(raw) for raw in found.get("registered_models", [])]

    async def _one(self, name: str) -> list[RegisteredModel]:
        model = await self.find_registered_model(name)
        return [model] if model is not None else []

    async def every_registered_model(self) -> AsyncIterator[RegisteredModel]:
        """Every registered model (with its tags), read 1,000 a page."""
        page_token = None
        while True:
            params = {"max_results": str(PAGE_SIZE_LIMIT)}
            if page_token:
                params["page_token"] = page_token
            page = await self.call("GET", "/registered-models/search", params=params)
            for raw in page.get("registered_models", []):
                yield RegisteredModel.from_json(raw)
            page_token = page.get("next_page_token")
            if not page_token:
                return

    async def create_registered_model(self, name: str) -> None:
        """Create the model; one that exists already is left as it is."""
        await self.call(
            "POST",
            "/registered-models/create",
            json={"name": name},
            tolerated=frozenset({"RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"}),
        )

    async def set_model_tag(self, name: str, key: str, value: str) -> None:
        await self.call("POST", "/registered-models/set-tag", json={"name": name, "key": key, "value": value})

    async def set_alias(self, name: str, alias: str, version: str) -> None:
        number = version_number(name, version)
        await self.call("POST", "/registered-models/alias", json={"name": name, "alias": alias, "version": number})

    async def delete_alias(self, name: str, alias: str) -> None:
        await self.call("DELETE", "/registered-models/alias", json={"name": name, "alias": alias})

    # Runs, logged models and experiments

    async def run(self, run_id: str, missing: NotFound | None = None) -> Run | None:
        """The run; None when it does not exist (a version outlives its run), or `missing` raised when given."""
        if missing is not None:
            found = await self.call("GET", "/runs/get", params={"run_id": run_id}, not_found=missing)
        else:
            found = await self.call(
                "GET", "/runs/get", params={"run_id": run_id}, tolerated=frozenset({"RESOURCE_DOES_NOT_EXIST"})
            )
        return Run.from_json(found["run"]) if "run" in found else None

    async def logged_model(self, model_id: str, missing: NotFound | None = None) -> LoggedModel | None:
        """The logged model; None when it does not exist, or `missing` raised when given."""
        if missing is not None:
            found = await self.call("GET", f"/logged-models/{model_id}", not_found=missing)
        else:
            found = await self.call(
                "GET", f"/logged-models/{model_id}", tolerated=frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})
            )
        return LoggedModel.from_json(found["model"]) if "model" in found else None

    async def run_artifact_paths(self, run_id: str, path: str) -> list[str]:
        """The paths of the entries directly under `path` in the run's artifacts."""
        listed = await self.call("GET", "/artifacts/list", params={"run_id": run_id, "path": path})
        return [entry.get("path", "") for entry in listed.get("files", [])]

    async def search_runs_page(
        self,
        experiment_ids: list[str],
        filter_string: str,
        max_results: int,
        order_by: list[str] | None = None,
        page_token: str | None = None,
        all_runs: bool = False,
    ) -> RunPage:
        """One page of runs/search; `all_runs` includes deleted runs."""
        body: dict[str, Any] = {"experiment_ids": experiment_ids, "filter": filter_string, "max_results": max_results}
        if order_by:
            body["order_by"] = order_by
        if all_runs:
            body["run_view_type"] = "ALL"
        if page_token:
            body["page_token"] = page_token
        page = await self.call("POST", "/runs/search", json=body)
        return RunPage(tuple(Run.from_json(raw) for raw in page.get("runs", [])), page.get("next_page_token"))

    async def search_runs(
        self,
        experiment_ids: list[str],
        filter_string: str,
        order_by: list[str] | None = None,
        all_runs: bool = False,
    ) -> AsyncIterator[Run]:
        """Every run matching the filter, 1,000 a page."""
        page_token = None
        while True:
            page = await self.search_runs_page(
                experiment_ids, filter_string, PAGE_SIZE_LIMIT, order_by, page_token, all_runs
            )
            for run in page.runs:
                yield run
            page_token = page.next_page_token
            if not page_token:
                return

    async def runs(self, run_ids: set[str], experiment_ids: list[str]) -> dict[str, Run]:
        """Many runs (deleted ones included) in a few calls: the experiments searched for 500 ids at once."""
        found: dict[str, Run] = {}
        ordered = sorted(run_ids)
        for start in range(0, len(ordered), IDS_PER_SEARCH):
            chunk = ordered[start : start + IDS_PER_SEARCH]
            condition = f"attributes.run_id IN ({', '.join(quoted(run_id) for run_id in chunk)})"
            async for run in self.search_runs(experiment_ids, condition, all_runs=True):
                found[run.run_id] = run
        return found

    async def logged_models(self, model_ids: set[str], experiment_ids: list[str]) -> dict[str, LoggedModel]:
        """Many logged models in a few calls, searched by id in every experiment, 500 ids a call."""
        found: dict[str, LoggedModel] = {}
        ordered = sorted(model_ids)
        for start in range(0, len(ordered), IDS_PER_SEARCH):
            chunk = ordered[start : start + IDS_PER_SEARCH]
            page_token = None
            while True:
                body: dict[str, Any] = {
                    "experiment_ids": experiment_ids,
                    "filter": f"model_id IN ({', '.join(quoted(model_id) for model_id in chunk)})",
                    "max_results": LOGGED_MODELS_PAGE,
                }
                if page_token:
                    body["page_token"] = page_token
                page = await self.call("POST", "/logged-models/search", json=body)
                for raw in page.get("models", []):
                    model = LoggedModel.from_json(raw)
                    found[model.model_id] = model
                page_token = page.get("next_page_token")
                if not page_token:
                    break
        return found

    async def experiments(self) -> list[Experiment]:
        """Every experiment, deleted ones included (a version outlives its run's experiment), 1,000 a page."""
        found: list[Experiment] = []
        page_token = None
        while True:
            params = {"max_results": str(PAGE_SIZE_LIMIT), "view_type": "ALL"}
            if page_token:
                params["page_token"] = page_token
            page = await self.call("GET", "/experiments/search", params=params)
            found += [Experiment(raw["experiment_id"], raw.get("name")) for raw in page.get("experiments", [])]
            page_token = page.get("next_page_token")
            if not page_token:
                return found

    async def experiment_id(self, name: str) -> str | None:
        found = await self.call(
            "GET",
            "/experiments/get-by-name",
            params={"experiment_name": name},
            tolerated=frozenset({"RESOURCE_DOES_NOT_EXIST"}),
        )
        return found["experiment"]["experiment_id"] if "experiment" in found else None

    async def create_experiment(self, name: str) -> str | None:
        """The new experiment's id; None when one of that name exists already."""
        created = await self.call(
            "POST", "/experiments/create", json={"name": name}, tolerated=frozenset({"RESOURCE_ALREADY_EXISTS"})
        )
        return created.get("experiment_id")

    async def create_run(self, experiment_id: str, start_time: int, run_name: str, tags: Mapping[str, str]) -> str:
        created = await self.call(
            "POST",
            "/runs/create",
            json={
                "experiment_id": experiment_id,
                "start_time": start_time,
                "run_name": run_name,
                "tags": tag_list(tags),
            },
        )
        return created["run"]["info"]["run_id"]

    async def log_batch(
        self, run_id: str, metrics: Mapping[str, float], params: Mapping[str, str], timestamp: int
    ) -> None:
        await self.call(
            "POST",
            "/runs/log-batch",
            json={
                "run_id": run_id,
                "metrics": [
                    {"key": key, "value": value, "timestamp": timestamp, "step": 0} for key, value in metrics.items()
                ],
                "params": tag_list(params),
            },
        )

    async def log_input(self, run_id: str, dataset: Mapping[str, str], tags: Mapping[str, str]) -> None:
        await self.call(
            "POST",
            "/runs/log-inputs",
            json={"run_id": run_id, "datasets": [{"tags": tag_list(tags), "dataset": dict(dataset)}]},
        )

    async def finish_run(self, run_id: str, end_time: int) -> None:
        await self.call("POST", "/runs/update", json={"run_id": run_id, "status": "FINISHED", "end_time": end_time})
