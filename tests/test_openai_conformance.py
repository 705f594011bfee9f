"""OpenAI conformance of `mlxk serve`: responses that validate against OpenAI's published schemas, and requests as
real clients send them (developer role, penalties, keep_alive durations, `:latest`, trailing slashes, stop strings
made of multi-byte characters, tool calls cut short), driven by the official `openai` client against a real server
and worker on tiny scripted models.

The schemas are read from ../shared/reference/openai-schemas.json (openai/openai-openapi); the schema tests skip,
saying why, where that file is absent.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

import httpx
import openai
import pytest

from tests import factory
from tests.fixtures.server import API_KEY, RANDOM_ID, SCRIPTED_ID, SCRIPTED_REPLY, spawn_server

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-schemas.json"

EMOJI_ID = "mlx-community/tiny-emoji"            # answers "Hi 😀 café": multi-byte characters
EMOJI_REPLY = "Hi 😀 café"
CALLER_ID = "mlx-community/tiny-tool-caller"     # answers one complete tool call
CALL_REPLY = '<tool_call>{"name": "f"}</tool_call>'
OPEN_CALLER_ID = "mlx-community/tiny-open-call"  # a call whose closing tag never comes (EOS inside the call)
OPEN_CALL_REPLY = '<tool_call>{"name": "f"}'
BAD_CALLER_ID = "mlx-community/tiny-bad-call"    # a closed call the json_tools parser cannot parse
BAD_CALL_REPLY = '<tool_call>{"name</tool_call>'
STRICT_ID = "mlx-community/tiny-strict-roles"    # Gemma-style template: user/assistant alternate, system first only
DEV_ID = "mlx-community/tiny-developer-aware"    # a template that knows `developer` and refuses `system`
F_TOOL = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
HI = [{"role": "user", "content": "hi"}]

# Gemma's rule, on ChatML tokens so the scripted weights still answer: a leading system message is folded into the
# first user turn, and any other role order raises the error Gemma's template raises.
STRICT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (prefix if loop.first else '') + message['content'] "
    "+ '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
DEV_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ raise_exception('use the developer role') }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _with_template(template: str) -> dict[str, bytes]:
    files = dict(factory.tiny_model_files(reply=SCRIPTED_REPLY))
    config = json.loads(files["tokenizer_config.json"])
    config["chat_template"] = template
    files["tokenizer_config.json"] = json.dumps(config).encode()
    return files


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """MLXK_KEEP_ALIVE=-1, as in the report: a model must stay loaded after its request."""
    root = tmp_path_factory.mktemp("conformance")
    hub = root / "hf" / "hub"
    hub.mkdir(parents=True)
    factory.write_repo(hub, STRICT_ID, _with_template(STRICT_TEMPLATE))
    factory.write_repo(hub, DEV_ID, _with_template(DEV_TEMPLATE))
    srv = spawn_server(root, api_key=API_KEY, env={"MLXK_KEEP_ALIVE": "-1"}, models={
        SCRIPTED_ID: {"reply": SCRIPTED_REPLY}, RANDOM_ID: {}, EMOJI_ID: {"reply": EMOJI_REPLY},
        CALLER_ID: {"tools": True, "reply": CALL_REPLY},
        BAD_CALLER_ID: {"tools": True, "reply": BAD_CALL_REPLY}, OPEN_CALLER_ID: {"tools": True, "reply": OPEN_CALL_REPLY}})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def chat_text(client, stream: bool, **kwargs) -> tuple[str, str]:
    """(content, finish_reason) of one chat completion, streamed or not."""
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.content or "", choice.finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert len(finishes) == 1
    return "".join(c.choices[0].delta.content or "" for c in chunks), finishes[0]


def completion_text(client, stream: bool, **kwargs) -> tuple[str, str]:
    if not stream:
        choice = client.completions.create(**kwargs).choices[0]
        return choice.text, choice.finish_reason
    chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


# ---------------------------------------------------------------- OpenAI's published schemas


def _nullable_as_any_of(node):
    """The file's note: OpenAPI 3.0 `nullable: true` means anyOf [schema, null] (JSON Schema has no nullable)."""
    if isinstance(node, list):
        return [_nullable_as_any_of(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_as_any_of(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@lru_cache(maxsize=1)
def _components() -> dict:
    if not SCHEMAS.is_file():
        pytest.skip(f"OpenAI's schemas are not at {SCHEMAS} (../shared/reference/openai-schemas.json)")
    return _nullable_as_any_of(json.loads(SCHEMAS.read_text())["components"])


def assert_valid(name: str, body: dict, *, mid_stream_completion: bool = False) -> None:
    from jsonschema import Draft202012Validator

    components = _components()
    if mid_stream_completion:
        # OpenAI's own streams send finish_reason null until the last chunk (and its clients rely on it), although
        # CreateCompletionResponse, shared by both shapes, declares it a non-null string: the one allowed deviation.
        components = copy.deepcopy(components)
        choice = components["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]
        choice["properties"]["finish_reason"] = {"anyOf": [choice["properties"]["finish_reason"], {"type": "null"}]}
    errors = sorted(Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": components})
                    .iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not errors, f"{name}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def sse_bodies(server, path: str, payload: dict) -> list[dict]:
    with server.http() as http, http.stream("POST", path, json=payload) as response:
        assert response.status_code == 200, response.read()
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("payload", [
    {"model": SCRIPTED_ID, "messages": HI},
    {"model": CALLER_ID, "messages": HI, "tools": F_TOOL},
    {"model": RANDOM_ID, "messages": HI, "max_tokens": 2},
], ids=["text", "tool-call", "length"])
def test_chat_responses_and_chunks_validate(server, payload):
    with server.http() as http:
        body = http.post("/v1/chat/completions", json=payload).json()
    assert_valid("CreateChatCompletionResponse", body)
    assert isinstance(body["system_fingerprint"], str) and body["choices"][0]["message"]["refusal"] is None
    for options in ({}, {"stream_options": {"include_usage": True}}):
        chunks = sse_bodies(server, "/v1/chat/completions", {**payload, "stream": True, **options})
        for chunk in chunks:
            assert_valid("CreateChatCompletionStreamResponse", chunk)
        assert {c["system_fingerprint"] for c in chunks} == {body["system_fingerprint"]}


def test_completion_responses_and_chunks_validate(server):
    payload = {"model": SCRIPTED_ID, "prompt": "Say hi:", "max_tokens": 16}
    with server.http() as http:
        body = http.post("/v1/completions", json=payload).json()
    assert_valid("CreateCompletionResponse", body)
    chunks = sse_bodies(server, "/v1/completions",
                        {**payload, "stream": True, "stream_options": {"include_usage": True}})
    finished = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finished) == 1 and chunks[-1]["usage"]["completion_tokens"] >= 3
    for chunk in chunks:
        mid_stream = bool(chunk["choices"]) and chunk not in finished
        assert_valid("CreateCompletionResponse", chunk, mid_stream_completion=mid_stream)
    assert "usage" not in chunks[0]


def test_models_validate_and_carry_context_length(server):
    with server.http() as http:
        listed = http.get("/v1/models").json()
        one = http.get(f"/v1/models/{SCRIPTED_ID}").json()
    assert_valid("ListModelsResponse", listed)
    assert_valid("Model", one)
    assert one["context_length"] == factory.TINY.max_position_embeddings
    assert {m["context_length"] for m in listed["data"]} == {factory.TINY.max_position_embeddings}


@pytest.mark.parametrize("method, path, payload, status", [
    ("post", "/v1/chat/completions", {"model": SCRIPTED_ID, "messages": HI, "temperature": 2.5}, 400),
    ("post", "/v1/chat/completions", {"model": "tiny", "messages": HI}, 400),
    ("post", "/v1/completions", {"model": SCRIPTED_ID, "prompt": "x", "echo": True}, 400),
    ("post", "/v1/chat/completions", {"model": "mlx-community/nope", "messages": HI}, 404),
    ("get", "/v1/models/mlx-community/nope", None, 404),
    ("get", "/no/such/route", None, 404),
])
def test_errors_validate(server, method, path, payload, status):
    with server.http() as http:
        response = http.request(method.upper(), path, json=payload)
    assert response.status_code == status
    assert_valid("ErrorResponse", response.json())
    if status == 400:
        assert response.json()["error"]["param"]


def test_unauthorized_error_validates(server):
    response = httpx.get(f"{server.url}/v1/models")
    assert response.status_code == 401
    assert_valid("ErrorResponse", response.json())


# ---------------------------------------------------------------- values the schema rejects: 400 naming the field


@pytest.mark.parametrize("extra, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": HI + [{"role": "tool", "content": "42"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name"),
    ({"reasoning_effort": "bogus"}, "reasoning_effort"),
    ({"n": 0}, "n"),
])
def test_values_the_schema_rejects_are_400_naming_the_field(server, extra, param):
    payload = {"model": SCRIPTED_ID, "messages": HI, **extra}
    with server.http() as http:
        response = http.post("/v1/chat/completions", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert error["type"] == "invalid_request_error"
    if _components_available():
        assert not _schema_accepts("CreateChatCompletionRequest", payload)  # the schema agrees it is wrong


def _components_available() -> bool:
    return SCHEMAS.is_file()


def _schema_accepts(name: str, body: dict) -> bool:
    from jsonschema import Draft202012Validator

    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": _components()}).is_valid(body)


@pytest.mark.parametrize("part, kind", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image_url"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "input_audio"),
])
def test_image_and_audio_parts_are_400_naming_the_part(client, part, kind):
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SCRIPTED_ID, messages=messages)
    assert info.value.body["param"] == "messages[0].content[1]" and kind in info.value.body["message"]


def test_completion_without_prompt_is_400_naming_it(server):
    with server.http() as http:
        response = http.post("/v1/completions", json={"model": SCRIPTED_ID, "max_tokens": 4})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_model_errors_name_the_model_param(client):
    for name in ("tiny", "org/na me"):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=name, messages=HI)
        assert info.value.body["param"] == "model"


def test_template_refusal_names_messages(client):
    with pytest.raises(openai.BadRequestError) as info:  # assistant first: the strict template refuses
        client.chat.completions.create(model=STRICT_ID, messages=[{"role": "assistant", "content": "x"}] + HI)
    body = info.value.body
    assert body["param"] == "messages" and "Conversation roles must alternate" in body["message"]


def test_context_length_exceeded_as_openai_says_it(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SCRIPTED_ID, messages=[{"role": "user", "content": "hi " * 2100}])
    body = info.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
    assert body["message"].startswith("This model's maximum context length is 2048 tokens. However, your messages "
                                      "resulted in ")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SCRIPTED_ID, prompt="hi " * 2100)
    assert (info.value.body["code"], info.value.body["param"]) == ("context_length_exceeded", "prompt")


# ---------------------------------------------------------------- requests as clients send them


def test_developer_role_becomes_system_for_templates_without_it(client):
    system = client.chat.completions.create(model=STRICT_ID, messages=[{"role": "system", "content": "Be brief."}] + HI)
    developer = client.chat.completions.create(model=STRICT_ID,
                                               messages=[{"role": "developer", "content": "Be brief."}] + HI)
    plain = client.chat.completions.create(model=STRICT_ID, messages=HI)
    assert developer.choices[0].message.content == SCRIPTED_REPLY
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens > plain.usage.prompt_tokens


def test_developer_role_kept_for_templates_that_know_it(client):
    reply = client.chat.completions.create(model=DEV_ID, messages=[{"role": "developer", "content": "Be brief."}] + HI)
    assert reply.choices[0].message.content == SCRIPTED_REPLY
    with pytest.raises(openai.BadRequestError, match="use the developer role"):
        client.chat.completions.create(model=DEV_ID, messages=[{"role": "system", "content": "Be brief."}] + HI)


def _greedy(client, **penalties) -> str:
    return client.chat.completions.create(model=RANDOM_ID, messages=HI, max_tokens=40, temperature=0,
                                          **penalties).choices[0].message.content


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_penalties_are_honoured(client, penalty):
    plain = _greedy(client)
    assert _greedy(client) == plain                      # greedy is deterministic: a difference is the penalty's
    assert _greedy(client, **{penalty: 0}) == plain      # 0 is neutral
    assert _greedy(client, **{penalty: 2.0}) != plain


@pytest.mark.parametrize("suffix", [":latest", ":LATEST"])
def test_latest_tag_is_accepted(client, suffix):
    reply = client.chat.completions.create(model=SCRIPTED_ID + suffix, messages=HI)
    assert reply.model == SCRIPTED_ID and reply.choices[0].message.content == SCRIPTED_REPLY
    assert client.models.retrieve("tiny-scripted" + suffix).id == SCRIPTED_ID


@pytest.mark.parametrize("method, path, payload", [
    ("POST", "/v1/chat/completions/", {"model": SCRIPTED_ID, "messages": HI}),
    ("POST", "/v1/completions/", {"model": SCRIPTED_ID, "prompt": "x", "max_tokens": 16}),
    ("GET", "/v1/models/", None),
    ("GET", f"/v1/models/{SCRIPTED_ID}/", None),
])
def test_trailing_slash_is_served_not_redirected(server, method, path, payload):
    with server.http(follow_redirects=False) as http:
        response = http.request(method, path, json=payload)
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------- stop strings: characters, never bytes


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("stop, expected", [
    (["😀"], "Hi "),
    (["é"], "Hi 😀 caf"),
    (["😀 c"], "Hi "),
    (["caf", "zzz"], "Hi 😀 "),          # a match followed in the list by a stop that never matches
    (["zzz", "é", "😀"], "Hi "),          # two match: the earliest in the text wins, whatever the list order
    (["ca", " c"], "Hi 😀"),              # ... also when both are in one piece of text (token-level stops miss both)
])
def test_stop_strings_cut_on_characters(client, stream, stop, expected):
    assert chat_text(client, stream, model=EMOJI_ID, messages=HI, stop=stop) == (expected, "stop")
    assert completion_text(client, stream, model=EMOJI_ID, prompt="x", max_tokens=20, stop=stop) == (expected, "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_unmatched_stops_leave_multibyte_text_whole(client, stream):
    assert chat_text(client, stream, model=EMOJI_ID, messages=HI, stop=["zzz", "ü"]) == (EMOJI_REPLY, "stop")


# ---------------------------------------------------------------- tool calls that end unusually


def _tool_reply(client, stream: bool, **kwargs) -> tuple[str, list, str]:
    """(content, [(index, name, arguments)], finish_reason), streamed or not."""
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [(i, c.function.name, c.function.arguments) for i, c in enumerate(choice.message.tool_calls or [])]
        return choice.message.content or "", calls, choice.finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    calls = [(d.index, d.function.name, d.function.arguments) for c in chunks for d in c.choices[0].delta.tool_calls or []]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    return "".join(c.choices[0].delta.content or "" for c in chunks), calls, finish[-1]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_call_cut_by_max_tokens_returns_its_text(client, stream):
    content, calls, finish = _tool_reply(client, stream, model=CALLER_ID, messages=HI, tools=F_TOOL, max_tokens=4)
    assert (calls, finish) == ([], "length")
    assert content.startswith("<tool_call>{") and CALL_REPLY.startswith(content)


# Under tool_choice "auto" (the default with tools) a call the model opens is held to the tools by the grammar
# (workers/inference/constrain.py), so these models can no longer write a botched or unclosed call; the router's
# fallbacks for such text (a parser that refuses, a call open at the end) are tested in tests/test_textout.py.


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_call_the_model_botches_is_held_to_the_tool(client, stream):
    """The model wants `<tool_call>{"name</tool_call>`; the grammar masks the early close and forces the name."""
    content, calls, finish = _tool_reply(client, stream, model=BAD_CALLER_ID, messages=HI, tools=F_TOOL,
                                         max_tokens=10)
    assert content.replace(" ", "").startswith('<tool_call>{"name":"f"') and "</tool_call>" not in content
    assert (calls, finish) == ([], "length")   # cut by max_tokens: its text comes back


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_call_the_model_leaves_open_is_closed_by_the_grammar(client, stream):
    """The model wants EOS right after `{"name": "f"}`; inside a call EOS is masked, so the call closes."""
    content, calls, finish = _tool_reply(client, stream, model=OPEN_CALLER_ID, messages=HI, tools=F_TOOL,
                                         max_tokens=10)
    assert [(i, name, json.loads(args)) for i, name, args in calls] == [(0, "f", {})]
    assert (content, finish) == ("", "length")


# ---------------------------------------------------------------- keep_alive: -1 is forever, durations


def _ps_model(server, repo_id: str) -> dict | None:
    ps = httpx.get(f"{server.url}/api/ps", headers=server.headers).json()
    return next((m for m in ps["models"] if m["repo_id"] == repo_id), None)


def test_keep_alive_minus_one_from_the_environment_never_unloads(server, client):
    client.chat.completions.create(model=SCRIPTED_ID, messages=HI)
    time.sleep(1.0)  # the report: unloaded 43 ms after the reply
    model = _ps_model(server, SCRIPTED_ID)
    assert model is not None and model["keep_alive_s"] < 0 and model["expires_ts"] is None


@pytest.mark.parametrize("keep_alive, seconds", [("1h30m", 5400), ("10m", 600), (90, 90), ("-1m", None)])
def test_keep_alive_durations_per_request(server, client, keep_alive, seconds):
    client.chat.completions.create(model=SCRIPTED_ID, messages=HI, extra_body={"keep_alive": keep_alive})
    model = _ps_model(server, SCRIPTED_ID)
    if seconds is None:
        assert model["keep_alive_s"] < 0 and model["expires_ts"] is None
    else:
        assert model["keep_alive_s"] == seconds and model["expires_ts"] > time.time() + seconds - 60


def test_bad_keep_alive_is_400_naming_the_forms(server):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": SCRIPTED_ID, "messages": HI, "keep_alive": "1x"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "keep_alive" and "'1h30m'" in error["message"] and "forever" in error["message"]


def test_keep_alive_flag_minus_one_wins_over_the_environment(tmp_path):
    srv = spawn_server(tmp_path / "flag", models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}},
                       args=("--keep-alive", "-1"), env={"MLXK_KEEP_ALIVE": "1"})
    try:
        srv.openai().chat.completions.create(model=SCRIPTED_ID, messages=HI)
        time.sleep(2.0)  # past the environment's 1 s
        model = _ps_model(srv, SCRIPTED_ID)
        assert model is not None and model["expires_ts"] is None
        ps = subprocess.run([sys.executable, "-c", "from mlxk.cli import main; main()", "ps"], env=srv.env,
                            capture_output=True, text=True, timeout=60)
        assert ps.returncode == 0 and re.search(r"tiny-scripted .* forever", ps.stdout), ps.stdout + ps.stderr
    finally:
        srv.stop()


# ---------------------------------------------------------------- two calls in one reply, through the api


class ScriptedWorker:
    """Stands in for the inference worker on its socket (MLXK_INFERENCE_EXTERNAL), replying to every generate with
    fixed events. A fake at the protocol seam, because a scripted tiny model cannot say two tool calls: its bigram
    weights need every token of the reply to be distinct, and two calls repeat `<tool_call>`."""

    def __init__(self, socket_path: Path, events: list[dict]):
        import socketserver

        events_json = [json.dumps(event).encode() + b"\n" for event in events]

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                op = json.loads(self.rfile.readline()).get("op")
                if op == "ping":
                    self.wfile.write(json.dumps({"event": "pong", "pid": os.getpid()}).encode() + b"\n")
                elif op == "generate":
                    self.wfile.write(b"".join(events_json))
                else:
                    self.wfile.write(json.dumps({"event": "error", "type": "bad_request", "message": op,
                                                 "status": 400, "retryable": False}).encode() + b"\n")

        socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.server = socketserver.ThreadingUnixStreamServer(str(socket_path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


TWO_CALLS = [
    {"event": "accepted", "prompt_tokens": 5, "cached_tokens": 0},
    {"event": "delta", "tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                       "function": {"name": "f", "arguments": '{"x": 1}'}}]},
    {"event": "delta", "tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                       "function": {"name": "g", "arguments": "{}"}}]},
    {"event": "done", "finish_reason": "tool_calls",
     "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}},
]


@pytest.fixture(scope="module")
def two_calls_server(tmp_path_factory):
    from mlxk.config import settings

    root = tmp_path_factory.mktemp("two-calls")
    worker = ScriptedWorker(settings()._replace(home=root / "mlxk").inference_socket, TWO_CALLS)
    srv = spawn_server(root, models={CALLER_ID: {"tools": True, "reply": CALL_REPLY}},
                       env={"MLXK_INFERENCE_EXTERNAL": "1"})
    yield srv
    srv.stop()
    worker.close()


def test_two_tool_calls_keep_their_indices_whole_and_streamed(two_calls_server):
    client = two_calls_server.openai()
    reply = client.chat.completions.create(model=CALLER_ID, messages=HI, tools=F_TOOL)
    calls = reply.choices[0].message.tool_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [("call_a", "f", '{"x": 1}'),
                                                                               ("call_b", "g", "{}")]
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
    chunks = [c for c in client.chat.completions.create(model=CALLER_ID, messages=HI, tools=F_TOOL, stream=True)
              if c.choices]
    deltas = [(d.index, d.id, d.function.name) for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas == [(0, "call_a", "f"), (1, "call_b", "g")]
    if _components_available():
        with two_calls_server.http() as http:
            body = http.post("/v1/chat/completions", json={"model": CALLER_ID, "messages": HI, "tools": F_TOOL}).json()
        assert_valid("CreateChatCompletionResponse", body)
