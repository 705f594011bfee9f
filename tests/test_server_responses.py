"""The OpenAI Responses API of `mlxk serve`, driven by the official `openai` SDK against a real server and
inference worker on tiny scripted models; stored responses live in state.db and outlive a server restart."""
from __future__ import annotations

import json
import os
import signal

import openai
import pytest

from tests.fixtures.server import API_KEY, CALLER_ID, DIALECT_MODELS as MODELS, RANDOM_ID, SCRIPTED_ID, \
    SCRIPTED_REPLY, THINKER_ID, spawn_server

F_TOOL = [{"type": "function", "name": "f", "description": "answers", "strict": False,
           "parameters": {"type": "object", "properties": {}}}]
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.output_item.done", "response.completed"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = spawn_server(tmp_path_factory.mktemp("responses"), models=MODELS, api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def test_create_with_string_input(client):
    reply = client.responses.create(model="tiny-scripted", input="hi")
    assert (reply.object, reply.status, reply.model) == ("response", "completed", SCRIPTED_ID)
    assert reply.id.startswith("resp_") and reply.output_text == SCRIPTED_REPLY
    [message] = reply.output
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    usage = reply.usage
    assert usage.input_tokens > 5 and usage.output_tokens >= 3
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0 and usage.output_tokens_details.reasoning_tokens == 0


def test_instructions_and_item_input_reach_the_prompt(client):
    plain = client.responses.create(model=SCRIPTED_ID, input=[{"role": "user", "content": "hi"}])
    told = client.responses.create(model=SCRIPTED_ID, instructions="Be brief and polite.", input=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}])
    assert told.instructions == "Be brief and polite."
    assert told.usage.input_tokens > plain.usage.input_tokens
    assert told.output_text == SCRIPTED_REPLY


def test_streamed_events_in_order_with_sequence_numbers(client):
    events = list(client.responses.create(model=SCRIPTED_ID, input="hi", stream=True))
    types = [e.type for e in events]
    deltas = types.count("response.output_text.delta")
    assert deltas >= 1
    assert types == TEXT_EVENTS[:4] + ["response.output_text.delta"] * deltas + TEXT_EVENTS[5:]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == SCRIPTED_REPLY
    final = events[-1].response
    assert final.status == "completed" and final.output_text == SCRIPTED_REPLY and final.usage.output_tokens >= 3
    with client.responses.stream(model=SCRIPTED_ID, input="hi") as stream:
        assert stream.get_final_response().output_text == SCRIPTED_REPLY


def test_function_call_round_trip(client):
    reply = client.responses.create(model=CALLER_ID, input="hi", tools=F_TOOL)
    [call] = reply.output
    assert (call.type, call.name, json.loads(call.arguments), call.status) == ("function_call", "f", {}, "completed")
    assert call.call_id and call.id.startswith("fc_")
    # the whole history sent back, as Codex does
    again = client.responses.create(model=CALLER_ID, tools=F_TOOL, store=False, input=[
        {"role": "user", "content": "hi"},
        {"type": "function_call", "call_id": call.call_id, "name": "f", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "42"},
        {"type": "web_search_call", "id": "ws_1", "status": "completed"}])   # skipped, not refused
    assert again.output[0].type == "function_call"
    assert again.usage.input_tokens > reply.usage.input_tokens
    # or continued from the stored response
    chained = client.responses.create(model=CALLER_ID, tools=F_TOOL, previous_response_id=reply.id, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "42"}])
    assert chained.previous_response_id == reply.id
    assert chained.usage.input_tokens == again.usage.input_tokens


def test_streamed_function_call_events(client):
    events = list(client.responses.create(model=CALLER_ID, input="hi", tools=F_TOOL, stream=True))
    types = [e.type for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert events[-1].response.output[0].name == "f"


def test_reasoning_becomes_a_reasoning_item(client):
    reply = client.responses.create(model=THINKER_ID, input="hi")
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    assert reply.output[0].summary[0].text == "Hm." and reply.output_text == "Hello world!"
    events = list(client.responses.create(model=THINKER_ID, input="hi", stream=True))
    added = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "message")]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta") == "Hm."


def test_max_output_tokens_makes_it_incomplete(client):
    reply = client.responses.create(model=SCRIPTED_ID, input="hi", max_output_tokens=2)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 2


def test_text_format_is_enforced_and_echoed(client):
    """text.format reaches the engine's grammar: the scripted model's sentence becomes JSON valid for the schema."""
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}
    reply = client.responses.create(model=SCRIPTED_ID, input="hi", max_output_tokens=40, text={"format": {
        "type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    assert reply.status == "completed" and reply.text.format.type == "json_schema"
    assert isinstance(json.loads(reply.output_text)["a"], bool)


def test_unknown_previous_response_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.responses.create(model=SCRIPTED_ID, input="hi", previous_response_id="resp_nope")
    assert raised.value.code == "response_not_found" and raised.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model=SCRIPTED_ID, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,"}]}])
    assert raised.value.param == "input[0].content[0]"


def test_store_false_is_not_kept(client):
    reply = client.responses.create(model=SCRIPTED_ID, input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(reply.id)


def test_previous_response_id_survives_a_restart_and_delete_removes_it(tmp_path):
    srv = spawn_server(tmp_path / "srv", models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}}, api_key=API_KEY)
    try:
        first = srv.openai().responses.create(model=SCRIPTED_ID, input="hi", instructions="Be brief.")
    finally:
        srv.stop()
    srv = spawn_server(tmp_path / "srv", api_key=API_KEY)   # same MLXK_HOME and cache, a new process
    try:
        client = srv.openai()
        kept = client.responses.retrieve(first.id)
        assert (kept.id, kept.output_text, kept.instructions) == (first.id, SCRIPTED_REPLY, "Be brief.")
        second = client.responses.create(model=SCRIPTED_ID, input="and again", previous_response_id=first.id)
        # the history (user turn and answer) is in the prompt; the instructions are not carried over
        alone = client.responses.create(model=SCRIPTED_ID, input="and again", store=False)
        assert second.usage.input_tokens > alone.usage.input_tokens
        assert client.responses.delete(first.id) is None
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.delete(first.id)
        assert client.responses.retrieve(second.id).previous_response_id == first.id
    finally:
        srv.stop()


def test_worker_dying_mid_stream_is_a_response_failed_event(server, client):
    client.responses.create(model=RANDOM_ID, input="hi", max_output_tokens=1)   # loaded, so the kill lands mid-stream
    pid = server.health()["worker"]["pid"]
    events = []
    for event in client.responses.create(model=RANDOM_ID, input="hi", max_output_tokens=2000, stream=True):
        events.append(event)
        if event.type == "response.output_text.delta" and sum(e.type == event.type for e in events) == 1:
            os.kill(pid, signal.SIGKILL)
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "worker_restarting"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kept = client.responses.retrieve(events[-1].response.id)   # stored as failed, as OpenAI keeps one
    assert kept.status == "failed" and kept.error.code == "worker_restarting"
    assert client.responses.create(model=SCRIPTED_ID, input="hi").output_text == SCRIPTED_REPLY


def test_reasoning_effort_none_turns_thinking_off(client):
    default = client.responses.create(model=THINKER_ID, input="hi", max_output_tokens=1, store=False)
    off = client.responses.create(model=THINKER_ID, input="hi", max_output_tokens=1, store=False,
                                  reasoning={"effort": "none"})
    assert off.usage.input_tokens > default.usage.input_tokens   # the template's empty think block
    assert off.reasoning.effort == "none"


@pytest.mark.parametrize("text, expected", [
    (None, None),
    ({"format": {"type": "text"}}, None),
    ({"format": {"type": "json_object"}}, {"type": "json_object"}),
    ({"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}, "strict": True}},
     {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}, "strict": True}}),
])
def test_text_format_becomes_the_chat_routes_response_format(text, expected):
    from mlxk.server.routes.responses import response_format

    assert response_format(text) == expected


def test_unknown_text_format_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model=SCRIPTED_ID, input="hi", text={"format": {"type": "yaml"}})
    assert raised.value.param == "text.format.type" and "json_schema" in raised.value.message


def _sse(server, payload: dict) -> list[dict]:
    with server.http() as http, http.stream("POST", "/v1/responses", json={**payload, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]


def _event_schemas() -> dict[str, str]:
    """Each Responses stream event type -> the name of its schema, from the ResponseStreamEvent union."""
    from tests.test_openai_conformance import _components

    schemas = _components()["schemas"]
    names = [ref["$ref"].rsplit("/", 1)[1] for ref in schemas["ResponseStreamEvent"]["anyOf"]]
    return {schemas[name]["properties"]["type"]["enum"][0]: name for name in names}


@pytest.mark.parametrize("payload", [
    {"model": THINKER_ID, "input": "hi"},                                                    # reasoning + message
    {"model": CALLER_ID, "input": "hi", "tools": [{"type": "function", "name": "f",         # no strict, no
                                                   "parameters": {"type": "object", "properties": {}}}]},
    {"model": SCRIPTED_ID, "input": "hi", "max_output_tokens": 2},                            # incomplete
], ids=["reasoning", "tool-call", "incomplete"])
def test_responses_and_their_events_validate_against_openais_schemas(server, payload):
    """Non-stream, GET and every streamed event against ../shared/reference/openai-schemas.json (usage's
    cache_write_tokens, content_part.done's logprobs, an echoed function tool's strict)."""
    from tests.test_openai_conformance import assert_valid

    with server.http() as http:
        body = http.post("/v1/responses", json=payload).json()
        again = http.get(f"/v1/responses/{body['id']}").json()
    assert_valid("Response", body)
    assert_valid("Response", again)
    events = _sse(server, payload)
    schemas = _event_schemas()
    for event in events:
        assert_valid(schemas[event["type"]], event)   # its own schema: the union's error would say only "no match"
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    if payload["model"] == THINKER_ID:   # "Hm." was reasoning: its tokens are counted
        assert body["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
        assert events[-1]["response"]["usage"]["output_tokens_details"]["reasoning_tokens"] > 0


def test_chat_completions_count_reasoning_tokens(server):
    with server.http() as http:
        thought = http.post("/v1/chat/completions", json={"model": THINKER_ID, "messages": [
            {"role": "user", "content": "hi"}]}).json()
        plain = http.post("/v1/chat/completions", json={"model": SCRIPTED_ID, "messages": [
            {"role": "user", "content": "hi"}]}).json()
    usage = thought["usage"]
    assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"]
    assert plain["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
