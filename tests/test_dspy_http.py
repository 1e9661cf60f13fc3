"""/api/v1/dspy/* over HTTP, with DSPy's real HTTP path to a local OpenAI-compatible server (tests/fake_lm.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import through_the_gateway

EMAIL = {
    "program_id": "email-assistant-v1",
    "name": "Email Assistant",
    "version": "1.0.0",
    "description": "Writes short emails",
    "module": "ChainOfThought",
    "signature": "recipient, subject, context -> generated_email",
    "instructions": "Write a short, polite email.",
    "demos": [],
}
INPUTS = {"recipient": "john@example.com", "subject": "Meeting Follow-up", "context": "Discussed Q4 targets"}


@pytest.fixture(scope="module")
def dspy_service(start_service, mlflow_server, fake_lm, tmp_path_factory):
    database = tmp_path_factory.mktemp("dspy-db") / "hokusai.db"
    return start_service(
        mlflow_url=mlflow_server.url,
        database_url=f"sqlite:///{database}",
        dspy_lm="openai/instant",
        dspy_api_base=fake_lm.base_url,
        dspy_num_retries="0",
        dspy_max_timeout="5",
        dspy_record_content="true",
        dspy_cache="false",
        dspy_trusted_programs=json.dumps({"shouting-summary": "tests.dspy_programs:ShoutingSummary"}),
    )


@pytest.fixture(scope="module")
def dspy_keys(dspy_service) -> dict[str, str]:
    made = {"admin": dspy_service.admin_key}
    with dspy_service.client(dspy_service.admin_key) as admin:
        for scope in ("read", "write"):
            made[scope] = admin.post("/api/v1/keys", json={"name": f"dspy {scope}", "scopes": [scope]}).json()["key"]
        made["other"] = admin.post("/api/v1/keys", json={"name": "dspy other", "scopes": ["read"]}).json()["key"]
    return made


@pytest.fixture(scope="module")
def author(dspy_service, dspy_keys):
    with dspy_service.client(dspy_keys["write"]) as client:
        response = client.post("/api/v1/dspy/programs", json=EMAIL)
        assert response.status_code == 201, response.text
        yield client


@pytest.fixture(scope="module")
def user(dspy_service, dspy_keys, author):
    with dspy_service.client(dspy_keys["read"]) as client:
        yield client


def declare(author, **changes) -> dict:
    body = {**EMAIL, **changes}
    response = author.post("/api/v1/dspy/programs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_programs_are_listed_in_the_reference_shape(user):
    listed = user.get("/api/v1/dspy/programs").json()
    email = next(p for p in listed if p["program_id"] == "email-assistant-v1")
    assert email["name"] == "Email Assistant" and email["version"] == "1.0.0"
    assert email["signatures"][0]["input_fields"] == ["recipient", "subject", "context"]
    assert email["signatures"][0]["output_fields"] == ["generated_email"]
    assert email["description"] == "Writes short emails" and email["module"] == "ChainOfThought"
    trusted = next(p for p in listed if p["program_id"] == "shouting-summary")
    assert trusted["source"] == "trusted" and trusted["signatures"][0]["input_fields"] == ["text"]
    assert user.get("/api/v1/dspy/programs/email-assistant-v1").json() == email


def test_execute_chain_of_thought_against_the_language_model(user, fake_lm):
    before = fake_lm.requests
    response = user.post("/api/v1/dspy/execute", json={"program_id": "email-assistant-v1", "inputs": INPUTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["error"] is None and body["program_name"] == "email-assistant-v1"
    assert body["outputs"]["generated_email"] == "generated_email for john@example.com"
    assert body["outputs"]["reasoning"] == "reasoning for john@example.com"
    usage = body["metadata"]["usage"]["openai/instant"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["metadata"]["program_version"] == "1.0.0" and 0 < body["execution_time"] < 5
    assert fake_lm.requests == before + 1  # one real HTTP call to the LM, no JSON-adapter retry


def test_execute_predict_with_typed_fields_and_demos(author, user):
    declare(
        author,
        program_id="scorer",
        module="Predict",
        signature="text: str, tags: list[str], strict: Optional[bool] -> label: Literal['spam', 'ham'], score: float",
        demos=[{"text": "buy now", "tags": ["ad"], "strict": True, "label": "spam", "score": 0.9}],
    )
    answer = user.post(
        "/api/v1/dspy/execute", json={"program_id": "scorer", "inputs": {"text": "hi", "tags": [], "strict": None}}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"] == {"label": "spam", "score": 0.5}  # typed outputs, parsed by DSPy
    dry = user.post(
        "/api/v1/dspy/execute",
        json={"program_id": "scorer", "inputs": {"text": "hi", "tags": ["x"], "strict": False}, "mode": "dry_run"},
    ).json()
    rendered = json.dumps(dry["metadata"]["prompt"])
    assert "buy now" in rendered and "spam" in rendered and "ham" in rendered  # the demo and the field's choices
    bad_type = user.post(
        "/api/v1/dspy/execute", json={"program_id": "scorer", "inputs": {"text": "hi", "tags": 3, "strict": None}}
    )
    assert bad_type.status_code == 422 and "'tags' must be list[str]" in bad_type.json()["detail"]


def test_dry_run_and_debug(user, fake_lm):
    before = fake_lm.requests
    dry = user.post(
        "/api/v1/dspy/execute", json={"program_id": "email-assistant-v1", "inputs": INPUTS, "mode": "dry_run"}
    )
    assert dry.status_code == 200 and fake_lm.requests == before  # no LM call
    messages = dry.json()["metadata"]["prompt"]
    assert messages[0]["role"] == "system" and "Write a short, polite email." in messages[0]["content"]
    assert "john@example.com" in messages[-1]["content"] and dry.json()["outputs"] == {}
    debug = user.post(
        "/api/v1/dspy/execute", json={"program_id": "email-assistant-v1", "inputs": INPUTS, "mode": "debug"}
    ).json()
    call = debug["metadata"]["lm_calls"][0]
    assert "john@example.com" in json.dumps(call["messages"])
    assert "[[ ## generated_email ## ]]" in json.dumps(call["raw_output"])
    refused = user.post(
        "/api/v1/dspy/execute", json={"program_id": "email-assistant-v1", "inputs": INPUTS, "mode": "x"}
    )
    assert refused.status_code == 422


def test_inputs_must_match_the_signature(user):
    for inputs, words in (
        ({"recipient": "a", "subject": "b"}, "missing input fields: context"),
        ({**INPUTS, "cc": "x"}, "unknown input fields: cc"),
    ):
        refused = user.post("/api/v1/dspy/execute", json={"program_id": "email-assistant-v1", "inputs": inputs})
        assert refused.status_code == 422 and words in refused.json()["detail"], refused.text
    missing = user.post("/api/v1/dspy/execute", json={"program_id": "nope", "inputs": {}})
    assert missing.status_code == 404 and missing.json() == {"detail": "DSPy program not found: nope"}


def test_language_model_failures_are_502_and_recorded(author, user, dspy_keys, dspy_service):
    for model, words in (
        ("openai/error", "The language model failed"),
        ("openai/garbage", "The language model failed"),
        ("openai/unformatted", "answer could not be read"),
    ):
        program_id = f"failing-{model.rsplit('/', 1)[1]}"
        declare(author, program_id=program_id, module="Predict", lm={"model": model})
        failed = user.post("/api/v1/dspy/execute", json={"program_id": program_id, "inputs": INPUTS})
        assert failed.status_code == 502 and words in failed.json()["detail"], failed.text
        record = user.get(f"/api/v1/dspy/execution/{failed.headers['x-execution-id']}").json()
        assert record["success"] is False and record["program_id"] == program_id and words in record["error"]
        if model == "openai/unformatted":  # the LM answered (badly): the tokens it used are still accounted for
            assert record["usage"][model]["total_tokens"] > 0


def test_an_output_json_cannot_carry_is_answered_not_a_500(author, user):
    """An LM answering `nan` for a float field: DSPy parses float('nan'), which JSON cannot carry. The answer carries
    it as null (pydantic's JSON rule for NaN), the record as the string "NaN"; never a 500."""
    declare(
        author,
        program_id="nan-scorer",
        module="Predict",
        signature="text: str -> score: float",
        lm={"model": "openai/nan"},
    )
    answer = user.post("/api/v1/dspy/execute", json={"program_id": "nan-scorer", "inputs": {"text": "hi"}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"] == {"score": None}
    record = user.get(f"/api/v1/dspy/execution/{answer.json()['execution_id']}")
    assert record.status_code == 200, record.text
    batch = user.post("/api/v1/dspy/execute/batch", json={"program_id": "nan-scorer", "inputs_list": [{"text": "a"}]})
    assert batch.status_code == 200 and batch.json()["results"][0]["outputs"] == {"score": None}, batch.text


def test_timeouts_are_504_and_capped(author, user, fake_lm):
    declare(author, program_id="slow", module="Predict", lm={"model": "openai/slow-3000"})
    asked, answered = fake_lm.started["slow-3000"], fake_lm.finished["slow-3000"]
    timed_out = user.post("/api/v1/dspy/execute", json={"program_id": "slow", "inputs": INPUTS, "timeout": 0.5})
    assert timed_out.status_code == 504 and timed_out.json() == {"detail": "DSPy execution timed out after 0.5s"}
    assert fake_lm.started["slow-3000"] == asked + 1  # the call reached the LM ...
    assert fake_lm.finished["slow-3000"] == answered  # ... and its 3 s were not waited for
    record = user.get(f"/api/v1/dspy/execution/{timed_out.headers['x-execution-id']}").json()
    assert record["error_type"] == "timeout"
    capped = user.post("/api/v1/dspy/execute", json={"program_id": "slow", "inputs": INPUTS, "timeout": 3600})
    assert capped.status_code == 200  # 3600 s capped at 5 s, the LM answers in 3


def test_batch_runs_items_concurrently_with_mixed_failures(author, user, fake_lm):
    declare(author, program_id="batch-slow", module="Predict", lm={"model": "openai/slow-200"})
    items = [{**INPUTS, "recipient": f"r{i}@x"} for i in range(20)]
    items[3] = {"recipient": "only"}  # invalid: a failed item, not a failed batch
    asked = fake_lm.started["slow-200"]
    fake_lm.most_in_flight["slow-200"] = 0
    answer = user.post("/api/v1/dspy/execute/batch", json={"program_id": "batch-slow", "inputs_list": items})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["total"] == 20 and body["successful"] == 19 and body["failed"] == 1
    assert [r["success"] for r in body["results"]] == [i != 3 for i in range(20)]
    assert body["results"][5]["outputs"]["generated_email"] == "generated_email for r5@x"  # in the order given
    assert "missing input fields" in body["results"][3]["error"]
    assert fake_lm.started["slow-200"] == asked + 19  # one call per valid item ...
    assert fake_lm.most_in_flight["slow-200"] > 1  # ... several at once: concurrent, not one after another
    assert all(r["metadata"]["batch_id"] == body["batch_id"] for r in body["results"])
    record = user.get(f"/api/v1/dspy/execution/{body['results'][3]['execution_id']}").json()
    assert record["batch_id"] == body["batch_id"] and record["error_type"] == "invalid_input"
    too_many = user.post(
        "/api/v1/dspy/execute/batch", json={"program_id": "batch-slow", "inputs_list": [INPUTS] * 1001}
    )
    assert too_many.status_code == 422


def test_execution_records_belong_to_their_key(dspy_service, dspy_keys, user):
    done = user.post("/api/v1/dspy/execute", json={"program_id": "email-assistant-v1", "inputs": INPUTS}).json()
    record = user.get(f"/api/v1/dspy/execution/{done['execution_id']}").json()
    assert record["inputs"] == INPUTS and record["outputs"] == done["outputs"] and record["success"] is True
    assert record["input_bytes"] == len(json.dumps(INPUTS)) and record["usage"]["openai/instant"]["total_tokens"] > 0
    with dspy_service.client(dspy_keys["other"]) as other:
        assert other.get(f"/api/v1/dspy/execution/{done['execution_id']}").status_code == 404
    with dspy_service.client(dspy_keys["admin"]) as admin:
        assert admin.get(f"/api/v1/dspy/execution/{done['execution_id']}").status_code == 200
    assert user.get("/api/v1/dspy/execution/not-an-id").status_code == 404


def test_trusted_program_runs(user):
    answer = user.post("/api/v1/dspy/execute", json={"program_id": "shouting-summary", "inputs": {"text": "calm"}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"] == {"summary": "SUMMARY FOR CALM"}


def test_programs_are_versioned_updated_and_deleted(author, user):
    declare(author, program_id="versions", version="1.0.0", module="Predict")
    declare(author, program_id="versions", version="1.10.0", module="Predict", instructions="Newest.")
    declare(author, program_id="versions", version="1.9.0", module="Predict")
    assert user.get("/api/v1/dspy/programs/versions").json()["version"] == "1.10.0"  # the latest, by number
    assert author.post("/api/v1/dspy/programs", json={**EMAIL, "program_id": "versions"}).status_code == 409
    changed = author.put(
        "/api/v1/dspy/programs/versions/versions/1.0.0",
        json={**EMAIL, "program_id": "versions", "version": "1.0.0", "instructions": "Changed."},
    )
    assert changed.status_code == 200 and changed.json()["instructions"] == "Changed."
    executed = user.post(
        "/api/v1/dspy/execute",
        json={"program_id": "versions", "version": "1.0.0", "inputs": INPUTS, "mode": "dry_run"},
    ).json()
    assert "Changed." in executed["metadata"]["prompt"][0]["content"]  # the rebuilt program, not a cached one
    assert (
        author.put(
            "/api/v1/dspy/programs/versions/versions/9.9.9",
            json={**EMAIL, "program_id": "versions", "version": "9.9.9"},
        ).status_code
        == 404
    )
    assert user.post("/api/v1/dspy/programs", json={**EMAIL, "program_id": "x"}).status_code == 403
    assert author.delete("/api/v1/dspy/programs/versions", params={"version": "1.9.0"}).status_code == 200
    assert author.delete("/api/v1/dspy/programs/versions").json() == {"message": "Deleted versions (2 versions)"}
    assert user.get("/api/v1/dspy/programs/versions").status_code == 404


@pytest.mark.parametrize(
    "signature",
    [
        "x: this -> y",
        "x: os -> y",
        "x: os.path -> y",
        "x: list[subprocess] -> y",
        "x: __import__('os') -> y",
        "x -> y: typing.Any",
        "a, b",
        "a -> b -> c",
    ],
)
def test_signature_allow_list(author, signature):
    refused = author.post("/api/v1/dspy/programs", json={**EMAIL, "program_id": "unsafe", "signature": signature})
    assert refused.status_code == 400 and refused.json()["detail"].startswith("Invalid signature"), refused.text


def test_declarations_are_checked(author):
    for changes, status in (
        ({"demos": [{"recipient": "a", "unknown": "b"}]}, 400),
        ({"module": "ProgramOfThought"}, 422),
        ({"signature": None}, 422),
        ({"signatures": ["a -> b"], "signature": "a -> b"}, 422),
        ({"program_id": "../etc"}, 422),
        ({"program_id": "shouting-summary"}, 400),
        ({"lm": {"model": "openai/x", "api_base": "http://elsewhere"}}, 422),  # the service's key stays home
    ):
        refused = author.post("/api/v1/dspy/programs", json={**EMAIL, "program_id": "checked", **changes})
        assert refused.status_code == status, (changes, refused.text)


LOG_PICKLED_PROGRAM = """
import os, sys
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import dspy, mlflow
mlflow.set_experiment("pickled-dspy")
with mlflow.start_run():
    mlflow.dspy.log_model(dspy.ChainOfThought("question -> answer"), name="qa", registered_model_name=sys.argv[1])
"""


def test_pickled_programs_only_when_the_operator_allows_them(start_service, mlflow_server, fake_lm, author):
    refused = author.post(
        "/api/v1/dspy/programs", json={"program_id": "pickled", "name": "P", "source": "models:/pickled-qa/1"}
    )
    assert refused.status_code == 400 and refused.json()["detail"].startswith("Pickled DSPy programs are refused")
    allowing = start_service(
        mlflow_url=mlflow_server.url,
        dspy_lm="openai/instant",
        dspy_api_base=fake_lm.base_url,
        dspy_num_retries="0",
        dspy_allow_pickled="true",
    )
    logged = subprocess.run(
        [sys.executable, "-c", LOG_PICKLED_PROGRAM, "pickled-qa"],
        env=through_the_gateway(allowing, allowing.admin_key),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert logged.returncode == 0, logged.stderr[-3000:]
    with allowing.client(allowing.admin_key) as client:
        declared = client.post(
            "/api/v1/dspy/programs", json={"program_id": "pickled", "name": "P", "source": "models:/pickled-qa/1"}
        )
        assert declared.status_code == 201, declared.text
        assert declared.json()["source"] == "pickled" and declared.json()["module"] == "pickled"
        assert declared.json()["signatures"][0]["output_fields"] == ["reasoning", "answer"]
        answer = client.post("/api/v1/dspy/execute", json={"program_id": "pickled", "inputs": {"question": "why"}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"] == {"reasoning": "reasoning for why", "answer": "answer for why"}
        missing = client.post(
            "/api/v1/dspy/programs", json={"program_id": "pickled-2", "name": "P", "source": "models:/nothing/1"}
        )
        assert missing.status_code == 404


def test_without_a_language_model(service, keys, reader, writer):
    health = reader.get("/api/v1/dspy/health")
    assert health.status_code == 200
    assert health.json()["status"] == "unconfigured"
    assert health.json()["detail"].startswith("No language model configured for DSPy execution: set HOKUSAI_DSPY_LM")
    assert writer.post("/api/v1/dspy/programs", json={**EMAIL, "program_id": "no-lm"}).status_code == 201
    refused = reader.post("/api/v1/dspy/execute", json={"program_id": "no-lm", "inputs": INPUTS})
    assert refused.status_code == 503 and refused.json() == {"detail": health.json()["detail"]}
    assert "HOKUSAI_DSPY_API_BASE" in refused.json()["detail"]  # names what to set
    dry = reader.post("/api/v1/dspy/execute", json={"program_id": "no-lm", "inputs": INPUTS, "mode": "dry_run"})
    assert dry.status_code == 200  # rendering a prompt needs no model


def test_stats_survive_a_restart_and_cache_clear(  # last: it stops the module's service
    start_service, dspy_service, dspy_keys, user
):
    stats = user.get("/api/v1/dspy/stats").json()
    overall = stats["statistics"]
    assert overall["total_executions"] >= 10 and 0 < overall["success_rate"] < 1
    assert overall["p95_execution_time"] >= overall["average_execution_time"] * 0.5
    per = overall["per_program"]["failing-error"]
    assert per["total_executions"] == 1 and per["success_rate"] == 0
    assert stats["cache_enabled"] is False and stats["language_model"] == "openai/instant"
    health = user.get("/api/v1/dspy/health").json()
    assert health["status"] == "healthy" and health["total_executions"] == overall["total_executions"]
    assert user.post("/api/v1/dspy/cache/clear").status_code == 403
    with dspy_service.client(dspy_keys["admin"]) as admin:
        cleared = admin.post("/api/v1/dspy/cache/clear")
    assert cleared.status_code == 200 and cleared.json()["message"].startswith("Cache cleared successfully")
    dspy_service.stop()
    per_process = {"HOKUSAI_HOME", "HOKUSAI_PORT", "HOKUSAI_BOOTSTRAP_ADMIN_KEY", "HOKUSAI_ENVIRONMENT"}
    same_settings = {
        name.removeprefix("HOKUSAI_").lower(): value
        for name, value in dspy_service.env.items()
        if name.startswith("HOKUSAI_") and name not in per_process
    }
    again = start_service(**same_settings, bootstrap=False, process=True)  # same database, new process
    with again.client(dspy_keys["read"]) as client:
        assert client.get("/api/v1/dspy/stats").json()["statistics"] == overall
