"""The Ollama API with the official `ollama` Python client against a real `mlxk serve` on tiny models.

One server for the module, its HF_ENDPOINT the test Hub (so /api/pull runs a real pull job), API key `test-key`
(sent by the client as OLLAMA_API_KEY does: `Authorization: Bearer`).
"""
from __future__ import annotations

import datetime
import json
import subprocess
import sys

import httpx
import ollama
import pytest

from tests import factory
from tests.fixtures.jobs import hub_env
from tests.fixtures.queue import reap_background_workers
from tests.fixtures.server import API_KEY, SCRIPTED_ID, SCRIPTED_REPLY, spawn_server

CALLER_ID = "mlx-community/tiny-tool-caller"
# The scripted weights can only say distinct tokens, which leaves no room for arguments inside the call: the model
# calls get_weather with none ({}); test_tool_call_arguments_become_objects covers arguments with keys.
CALL_REPLY = '<tool_call>{"name": "get_weather"}</tool_call>'
THINKER_ID = "mlx-community/tiny-thinker"
# no required argument: the scripted caller writes {"name": "get_weather"} alone, and a call the model opens is held
# to the tool's schema (tool_choice auto is grammar-constrained, workers/inference/constrain.py)
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, hub_server):
    root = tmp_path_factory.mktemp("ollama")
    srv = spawn_server(root, api_key=API_KEY, env=hub_env(hub_server), models={
        SCRIPTED_ID: {"reply": SCRIPTED_REPLY}, CALLER_ID: {"tools": True, "reply": CALL_REPLY},
        THINKER_ID: {"reasoning": True}})
    yield srv
    srv.stop()
    reap_background_workers(root / "mlxk")


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, headers=server.headers, timeout=120)


def test_version_is_an_ollama_api_level_clients_accept(client):
    version = client._request_raw("GET", "/api/version").json()["version"]
    parts = [int(p) for p in version.split(".")]
    assert len(parts) == 3 and parts >= [0, 6, 4]


def test_list_names_every_model_with_a_tag(client):
    models = {m.model: m for m in client.list().models}
    assert f"{SCRIPTED_ID}:latest" in models
    tagged = models[f"{SCRIPTED_ID}:latest"]
    assert tagged.size > 0 and len(tagged.digest) == 64 and isinstance(tagged.modified_at, datetime.datetime)
    assert tagged.details.family == "llama"


def test_show_has_model_info_capabilities_and_parameters(client):
    shown = client.show(f"{CALLER_ID}:latest")
    assert shown.modelinfo["general.architecture"] == "llama"
    assert "llama.context_length" in shown.modelinfo
    assert {"completion", "tools"} <= set(shown.capabilities)
    assert all(len(line.split(None, 1)) == 2 for line in shown.parameters.splitlines())  # `key value` lines


def test_show_of_an_unknown_model_is_404_in_ollamas_shape(server, client):
    with pytest.raises(ollama.ResponseError) as info:
        client.show("mlx-community/nothing-like-this")
    assert info.value.status_code == 404 and "no cached model matches" in info.value.error
    body = httpx.post(f"{server.url}/api/show", json={"model": "x/nope"}, headers=server.headers).json()
    assert set(body) == {"error"}


def test_chat_streams_ndjson_and_ends_with_counts_and_ns_durations(client):
    chunks = list(client.chat(model=SCRIPTED_ID, messages=HI, stream=True))
    assert "".join(c.message.content for c in chunks) == SCRIPTED_REPLY
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done
    final = chunks[-1]
    assert final.done_reason == "stop" and final.message.content == ""
    assert final.prompt_eval_count > 0 and final.eval_count == len(chunks) - 1 or final.eval_count > 0
    assert final.total_duration >= final.eval_duration > 0 and final.total_duration < 600 * 10**9


def test_chat_without_stream_and_options_num_predict(client):
    reply = client.chat(model=f"{SCRIPTED_ID}:latest", messages=HI, options={"num_predict": 2, "temperature": 0})
    assert reply.done and reply.done_reason == "length" and reply.eval_count == 2
    assert SCRIPTED_REPLY.startswith(reply.message.content)


def test_generate_streamed_and_not(client):
    reply = client.generate(model=SCRIPTED_ID, prompt="hi", keep_alive="5m")
    assert reply.response == SCRIPTED_REPLY and reply.done_reason == "stop" and reply.prompt_eval_count > 0
    pieces = list(client.generate(model=SCRIPTED_ID, prompt="hi", stream=True))
    assert "".join(p.response for p in pieces) == SCRIPTED_REPLY and pieces[-1].done


def test_tool_calls_carry_object_arguments(client):
    for stream in (False, True):
        chunks = list(client.chat(model=CALLER_ID, messages=HI, tools=WEATHER, stream=True)) if stream else \
            [client.chat(model=CALLER_ID, messages=HI, tools=WEATHER)]
        calls = [call for c in chunks for call in c.message.tool_calls or []]
        assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {})]
    # the round trip: the client sends the call and the tool's answer back
    reply = client.chat(model=CALLER_ID, tools=WEATHER, messages=[
        *HI, {"role": "assistant", "content": "", "tool_calls": [calls[0].model_dump()]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}], options={"num_predict": 4})
    assert reply.done


def test_tool_call_arguments_become_objects():
    """The worker's OpenAI-style calls carry arguments as JSON text; Ollama's carry an object (OL-py requires it)."""
    from mlxk.server.routes.ollama import _tool_calls

    calls = {0: {"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}},
             1: {"id": None, "function": {"name": "g", "arguments": ""}}}
    first, second = _tool_calls(calls)
    assert first == {"id": "call_1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo"}}}
    assert second["function"] == {"index": 1, "name": "g", "arguments": {}}
    assert second["id"].startswith("call_") and second["id"] != first["id"]


def test_tools_on_a_model_without_tool_support_is_400(client):
    """Ollama's answer: 400 '"<model>" does not support tools' (dialects.md §3), not a call that never comes."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=SCRIPTED_ID, messages=HI, tools=tools)
    assert info.value.status_code == 400 and f'"{SCRIPTED_ID}" does not support tools' in info.value.error


def test_think_on_a_model_that_cannot_think_is_400(client):
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=SCRIPTED_ID, messages=HI, think=True)
    assert info.value.status_code == 400 and "does not support thinking" in info.value.error
    reply = client.chat(model=THINKER_ID, messages=HI, think=True, options={"num_predict": 3})
    assert reply.done


FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


@pytest.mark.parametrize("fmt", ["json", FLAG])
def test_format_constrains_the_reply_to_json(client, fmt):
    """The scripted model would say its sentence; `format` makes the worker's grammar force JSON instead."""
    reply = client.chat(model=SCRIPTED_ID, messages=HI, format=fmt, options={"num_predict": 60, "temperature": 0})
    text = reply.message.content
    if reply.done_reason == "stop":
        value = json.loads(text)
        assert isinstance(value, dict) and (fmt == "json" or set(value) == {"ok"} and isinstance(value["ok"], bool))
    else:  # cut by num_predict: honest "length", and what came is a JSON prefix
        assert reply.done_reason == "length" and text.startswith("{"), reply
    if fmt != "json":  # the schema leaves no room for the scripted sentence (json mode may make it a key)
        assert text.startswith('{"ok":') and SCRIPTED_REPLY not in text, text


def test_a_format_that_is_neither_json_nor_a_schema_is_400(server):
    # raw HTTP: the ollama client itself refuses such a format before sending it
    response = httpx.post(f"{server.url}/api/chat", headers=server.headers, timeout=60,
                          json={"model": SCRIPTED_ID, "messages": HI, "format": "yaml"})
    assert response.status_code == 400 and "format" in response.json()["error"], response.text


@pytest.mark.parametrize("body, problem", [
    ({"messages": HI}, "model"),
    ({"model": SCRIPTED_ID, "messages": HI, "options": {"temperature": "hot"}}, "options.temperature"),
    ({"model": SCRIPTED_ID, "messages": HI, "keep_alive": "1x"}, "keep_alive"),
    ({"model": SCRIPTED_ID, "messages": [{"content": "hi"}]}, "role"),
    ({"model": SCRIPTED_ID, "messages": [{"role": "user", "content": ["hi"]}]}, "content must be a string"),
    ({"model": SCRIPTED_ID, "messages": ["hi"]}, "messages"),
    ({"model": "a:b:c", "messages": HI}, "invalid model name"),
])
def test_bad_chat_bodies_are_400_naming_the_field(server, body, problem):
    response = httpx.post(f"{server.url}/api/chat", json=body, headers=server.headers, timeout=60)
    assert response.status_code == 400 and problem in response.json()["error"]


def test_load_ps_and_unload_with_empty_input(server, client):
    loaded = httpx.post(f"{server.url}/api/generate", headers=server.headers, timeout=60,
                        json={"model": SCRIPTED_ID, "prompt": "", "keep_alive": -1}).json()
    assert loaded["done"] and loaded["done_reason"] == "load"
    running = {m.model: m for m in client.ps().models}
    assert f"{SCRIPTED_ID}:latest" in running
    entry = httpx.get(f"{server.url}/api/ps", headers=server.headers).json()["models"]
    mine = next(m for m in entry if m["repo_id"] == SCRIPTED_ID)
    datetime.datetime.fromisoformat(mine["expires_at"])  # what Open WebUI does with it
    assert mine["size_vram"] > 0 and mine["expires_ts"] is None  # keep_alive -1: never expires
    unloaded = httpx.post(f"{server.url}/api/generate", headers=server.headers, timeout=60,
                          json={"model": SCRIPTED_ID, "prompt": "", "keep_alive": 0}).json()
    assert unloaded["done_reason"] == "unload"


def test_pull_streams_progress_then_delete(client, hub):
    repo = hub.unique_repo("mlx-community/ollama-pulled")
    hub.add_repo(repo, factory.tiny_model_files(reply=SCRIPTED_REPLY))
    lines = list(client.pull(f"{repo}:latest", stream=True))
    statuses = [line.status for line in lines]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    progress = [line for line in lines if line.total]
    assert progress and progress[-1].completed == progress[-1].total
    assert f"{repo}:latest" in [m.model for m in client.list().models]
    assert client.chat(model=repo, messages=HI).message.content == SCRIPTED_REPLY

    assert client.delete(f"{repo}:latest").status == "success"
    assert f"{repo}:latest" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as info:
        client.delete(f"{repo}:latest")
    assert info.value.status_code == 404


def test_pull_without_stream_waits_and_reports_failure(client, hub):
    repo = hub.unique_repo("mlx-community/ollama-blocking")
    hub.add_repo(repo, factory.tiny_model_files(reply=SCRIPTED_REPLY))
    assert client.pull(repo).status == "success"  # the client's default: stream false, one object
    with pytest.raises(ollama.ResponseError) as info:
        client.pull("mlx-community/not-on-the-hub-at-all")
    assert info.value.status_code == 404


def test_pull_of_a_missing_repo_streams_an_error_line(server, hub):
    with httpx.stream("POST", f"{server.url}/api/pull", headers=server.headers, timeout=60,
                      json={"model": "mlx-community/missing-everywhere"}) as response:
        lines = [json.loads(line) for line in response.iter_lines()]
    assert response.status_code == 200 and "error" in lines[-1] and "status" not in lines[-1]


def test_copy_makes_an_alias_that_resolves_lists_and_deletes_alone(server, client):
    client.copy(SCRIPTED_ID, "my-assistant")
    assert "my-assistant:latest" in [m.model for m in client.list().models]
    assert client.chat(model="my-assistant", messages=HI).message.content == SCRIPTED_REPLY
    assert client.chat(model="MY-ASSISTANT:latest", messages=HI).model == "MY-ASSISTANT:latest"  # case-insensitive
    listed = subprocess.run([sys.executable, "-c", "from mlxk.cli import main; main()", "list", "--json"],
                            env=server.env, capture_output=True, text=True, timeout=60)
    row = next(m for m in json.loads(listed.stdout)["data"]["models"] if m["name"] == SCRIPTED_ID)
    assert row["aliases"] == ["my-assistant"]
    text = subprocess.run([sys.executable, "-c", "from mlxk.cli import main; main()", "list"],
                          env=server.env, capture_output=True, text=True, timeout=60).stdout
    assert "(alias: my-assistant)" in text
    assert client.delete("my-assistant:latest").status == "success"  # the alias goes, the model stays
    models = [m.model for m in client.list().models]
    assert "my-assistant:latest" not in models and f"{SCRIPTED_ID}:latest" in models


def test_copy_refuses_a_name_that_already_means_a_cached_model_but_overwrites_an_alias(server, client):
    """QA: `/api/copy` to `tiny-random` (a short name) silently redirected that name. Such a destination (a short
    name, a substring, even an ambiguous one) is 409 naming what it would shadow; an existing alias is overwritten."""
    for destination, shadowed in (("tiny-thinker", [THINKER_ID]), ("TOOL-CALL", [CALLER_ID]),
                                  ("tiny", [CALLER_ID, THINKER_ID])):
        with pytest.raises(ollama.ResponseError) as info:
            client.copy(SCRIPTED_ID, destination)
        assert info.value.status_code == 409 and "would shadow" in info.value.error, destination
        assert all(repo in info.value.error for repo in shadowed), info.value.error
    assert "tools" not in client.show("tiny-thinker").capabilities   # the name still means its own model
    client.copy(SCRIPTED_ID, "overwritten")
    client.copy(CALLER_ID, "overwritten")   # Ollama's copy overwrites a copy
    assert "tools" in client.show("overwritten").capabilities
    assert client.delete("overwritten").status == "success"


def test_rm_and_delete_of_an_alias_remove_the_alias_never_a_model(server, client, hub):
    """QA: `mlxk rm ALIAS` / `POST /api/jobs/rm` deleted the model the alias's text fuzzy-matched. The alias is
    made first, the model whose short name it is arrives later (a pull), so both meanings exist at once."""
    repo = hub.unique_repo("mlx-community/pulled-later")
    short = repo.split("/")[1]
    client.copy(SCRIPTED_ID, short)
    hub.add_repo(repo, factory.tiny_model_files(reply=SCRIPTED_REPLY))
    assert client.pull(repo).status == "success"

    def listed():
        return [m.model for m in client.list().models]

    with server.http() as http:
        removed = http.post("/api/jobs/rm", json={"model": short, "force": True})
    assert removed.status_code == 200, removed.text
    body = removed.json()
    assert body["action"] == "alias_removed" and body["alias"] == short and body["repo_id"] == SCRIPTED_ID
    assert "stays cached" in body["message"]
    assert f"{repo}:latest" in listed() and f"{SCRIPTED_ID}:latest" in listed() and f"{short}:latest" not in listed()

    with pytest.raises(ollama.ResponseError) as info:   # now the short name of a cached model: no new alias
        client.copy(SCRIPTED_ID, short)
    assert info.value.status_code == 409 and repo in info.value.error
    with pytest.raises(ollama.ResponseError) as info:   # /api/delete deletes exact names only, as rm without --force
        client.delete(f"{short}:latest")
    assert info.value.status_code == 409 and repo in info.value.error
    assert f"{repo}:latest" in listed()
    assert client.delete(f"{repo}:latest").status == "success"
    assert f"{SCRIPTED_ID}:latest" in listed()


def test_ollamas_curl_examples_work_as_written_and_stop_takes_an_alias(server, client):
    """`curl URL/api/chat -d '{...}'` (Ollama's docs) sends application/x-www-form-urlencoded and no Origin: not a
    browser, so the body is read as JSON. /api/stop resolves an alias as every other route does."""
    body = {"model": SCRIPTED_ID, "messages": HI, "stream": False}
    reply = httpx.post(f"{server.url}/api/chat", content=json.dumps(body), timeout=120,
                       headers={**server.headers, "content-type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["message"]["content"] == SCRIPTED_REPLY
    client.copy(SCRIPTED_ID, "stop-me")
    try:
        stopped = httpx.post(f"{server.url}/api/stop", json={"model": "stop-me"}, headers=server.headers, timeout=60)
        assert stopped.status_code == 200 and stopped.json()["models"] == [SCRIPTED_ID], stopped.text
    finally:
        client.delete("stop-me")


@pytest.mark.parametrize("source, destination, status, problem", [
    ("mlx-community/nothing-here", "x", 404, "no cached model matches"),
    (SCRIPTED_ID, "bad name!", 400, "invalid model name"),
    (SCRIPTED_ID, "alias@abc123", 400, "not a revision"),
    (SCRIPTED_ID, CALLER_ID, 400, "already the name of a cached model"),
])
def test_bad_copies(client, source, destination, status, problem):
    with pytest.raises(ollama.ResponseError) as info:
        client.copy(source, destination)
    assert info.value.status_code == status and problem in info.value.error
