"""The Anthropic Messages API of `mlxk serve`, driven by the official `anthropic` SDK against a real server and
inference worker on tiny scripted models (tests/fixtures/server.py, tests/factory.py)."""
from __future__ import annotations

import json
import os
import re
import signal

import anthropic
import pytest

from tests.fixtures.server import API_KEY, CALLER_ID, DIALECT_MODELS as MODELS, RANDOM_ID, SCRIPTED_ID, \
    SCRIPTED_REPLY, THINKER_ID, spawn_server

HI = [{"role": "user", "content": "hi"}]
# no extra keys: with tool_choice any the grammar forces the call, and an open object lets a scripted model write on
F_TOOL = [{"name": "f", "description": "answers",
           "input_schema": {"type": "object", "properties": {}, "additionalProperties": False}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = spawn_server(tmp_path_factory.mktemp("anthropic"), models=MODELS, api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    # api_key goes out as X-Api-Key, as from Claude Code
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60)


def test_messages_create_answers_a_message_with_usage(client):
    reply = client.messages.create(model=SCRIPTED_ID, max_tokens=64, messages=HI)
    assert (reply.type, reply.role, reply.model) == ("message", "assistant", SCRIPTED_ID)
    assert reply.id.startswith("msg_")
    assert [(b.type, b.text) for b in reply.content] == [("text", SCRIPTED_REPLY)]
    assert (reply.stop_reason, reply.stop_sequence) == ("end_turn", None)
    usage = reply.usage
    assert usage.input_tokens + usage.cache_read_input_tokens > 5 and usage.output_tokens >= 3
    assert usage.cache_creation_input_tokens == 0


def test_bearer_token_works_too_and_a_wrong_key_is_an_authentication_error(server):
    bearer = anthropic.Anthropic(base_url=server.url, auth_token=API_KEY, api_key=None, max_retries=0)
    assert bearer.messages.create(model=SCRIPTED_ID, max_tokens=8, messages=HI).content[0].text == SCRIPTED_REPLY
    wrong = anthropic.Anthropic(base_url=server.url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as raised:
        wrong.messages.create(model=SCRIPTED_ID, max_tokens=8, messages=HI)
    assert raised.value.body["type"] == "error"
    assert raised.value.body["error"]["type"] == "authentication_error"
    assert "X-Api-Key" in raised.value.body["error"]["message"]


def test_stream_text_stream_and_final_message(client):
    with client.messages.stream(model=SCRIPTED_ID, max_tokens=64, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == SCRIPTED_REPLY
    assert final.content[0].text == SCRIPTED_REPLY and final.stop_reason == "end_turn"
    assert final.usage.output_tokens >= 3


def _events(server, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a raw stream; the names must equal the data types (the SDK dispatches on names)."""
    with server.http() as http, http.stream("POST", "/v1/messages?beta=true", json={**body, "stream": True},
                                            headers={"anthropic-version": "2023-06-01",
                                                     "anthropic-beta": "claude-code-20250219,made-up-beta"}) as r:
        assert r.status_code == 200
        frames = r.read().decode().strip().split("\n\n")
    events = []
    for frame in frames:
        name, data = frame.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
        assert events[-1][0] == events[-1][1]["type"]
    return events


def test_stream_event_sequence_is_exact(server):
    events = _events(server, {"model": SCRIPTED_ID, "max_tokens": 64, "messages": HI,
                              "context_management": {"edits": []}, "metadata": {"user_id": "u"}})
    names = [n for n, _ in events]
    deltas = names.count("content_block_delta")
    assert names == (["message_start", "content_block_start", "ping"] + ["content_block_delta"] * deltas
                     + ["content_block_stop", "message_delta", "message_stop"])
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] + start["usage"]["cache_read_input_tokens"] > 5  # real, not a placeholder
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] >= 3


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_report_the_match_and_never_leak(client, stream):
    kwargs = dict(model=SCRIPTED_ID, max_tokens=64, messages=HI, stop_sequences=["zzz", "world"])
    if stream:
        with client.messages.stream(**kwargs) as s:
            reply = s.get_final_message()
    else:
        reply = client.messages.create(**kwargs)
    assert reply.content[0].text == "Hello "
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", "world")


def test_max_tokens_stop_reason(client):
    reply = client.messages.create(model=SCRIPTED_ID, max_tokens=2, messages=HI)
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 2


def test_tool_round_trip(client):
    reply = client.messages.create(model=CALLER_ID, max_tokens=64, messages=HI, tools=F_TOOL)
    assert reply.stop_reason == "tool_use"
    [call] = [b for b in reply.content if b.type == "tool_use"]
    assert (call.name, call.input) == ("f", {}) and call.id.startswith("toolu_")
    again = client.messages.create(model=CALLER_ID, max_tokens=64, tools=F_TOOL, messages=HI + [
        {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": [{"type": "text", "text": "42"}]},
                                     {"type": "text", "text": "go on"}]}])
    assert again.stop_reason == "tool_use"
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens > \
        reply.usage.input_tokens + reply.usage.cache_read_input_tokens


def test_tool_choice_any_on_a_model_without_a_call_format_is_refused_in_anthropic_terms(client):
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=RANDOM_ID, max_tokens=8, messages=HI, tools=F_TOOL, tool_choice={"type": "any"})
    message = info.value.body["error"]["message"]
    assert 'tool_choice {"type": "any"}' in message and 'use tool_choice {"type": "auto"}' in message, message
    assert "'required'" not in message and "'auto'" not in message


def test_streamed_tool_input_arrives_as_input_json_delta(client, server):
    with client.messages.stream(model=CALLER_ID, max_tokens=64, messages=HI, tools=F_TOOL,
                                tool_choice={"type": "any"}) as stream:
        final = stream.get_final_message()
    [call] = final.content
    assert (call.type, call.name, call.input, final.stop_reason) == ("tool_use", "f", {}, "tool_use")
    events = _events(server, {"model": CALLER_ID, "max_tokens": 64, "messages": HI, "tools": F_TOOL})
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert [d["type"] for d in deltas] == ["input_json_delta"]
    assert json.loads("".join(d["partial_json"] for d in deltas)) == {}


def test_reasoning_becomes_a_signed_thinking_block(client, server):
    reply = client.messages.create(model=THINKER_ID, max_tokens=64, messages=HI)
    assert [b.type for b in reply.content] == ["thinking", "text"]
    assert reply.content[0].thinking == "Hm." and reply.content[0].signature
    assert reply.content[1].text == "Hello world!"
    events = _events(server, {"model": THINKER_ID, "max_tokens": 64, "messages": HI})
    starts = [(d["index"], d["content_block"]["type"]) for n, d in events if n == "content_block_start"]
    assert starts == [(0, "thinking"), (1, "text")]
    thinking_deltas = [d["delta"]["type"] for n, d in events if n == "content_block_delta" and d["index"] == 0]
    assert thinking_deltas[-1] == "signature_delta"
    # the thinking block comes back on the next turn with the signature we issued: accepted
    again = client.messages.create(model=THINKER_ID, max_tokens=64, messages=HI + [
        {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
        {"role": "user", "content": "more"}])
    assert again.content[-1].text == "Hello world!"


def test_count_tokens_counts_what_messages_would_prompt(client):
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    counted = client.messages.count_tokens(model=CALLER_ID, messages=HI, system=system, tools=F_TOOL)
    reply = client.messages.create(model=CALLER_ID, max_tokens=64, messages=HI, system=system, tools=F_TOOL)
    assert counted.input_tokens == reply.usage.input_tokens + reply.usage.cache_read_input_tokens
    # tools are in the prompt unless tool_choice is none
    bare = client.messages.count_tokens(model=CALLER_ID, messages=HI, system=system, tools=F_TOOL,
                                        tool_choice={"type": "none"})
    assert bare.input_tokens < counted.input_tokens


def test_count_tokens_counts_a_prompt_over_the_context_instead_of_refusing_it(client):
    """Counting is not generating: a prompt the model cannot take is still counted (the tiny models' context is
    2048 tokens), while messages.create refuses it."""
    long = [{"role": "user", "content": "many words " * 1500}]
    counted = client.messages.count_tokens(model=SCRIPTED_ID, messages=long)
    assert counted.input_tokens > 2048
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=SCRIPTED_ID, max_tokens=8, messages=long)
    assert "maximum context length is 2048" in info.value.body["error"]["message"]


def test_claude_code_attribution_block_is_dropped(client):
    plain = client.messages.count_tokens(model=SCRIPTED_ID, messages=HI, system="Be brief.")
    attributed = client.messages.count_tokens(model=SCRIPTED_ID, messages=HI, system=[
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cch=abc123;"},
        {"type": "text", "text": "Be brief."}])
    assert attributed.input_tokens == plain.input_tokens


@pytest.mark.parametrize("body, status, kind, needle", [
    ({"model": "no-such-model", "max_tokens": 8, "messages": HI}, 404, "not_found_error", "no-such-model"),
    ({"model": SCRIPTED_ID, "messages": HI}, 400, "invalid_request_error", "max_tokens"),
    ({"model": SCRIPTED_ID, "max_tokens": 8, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "invalid_request_error", "messages[0].role"),
    ({"model": SCRIPTED_ID, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]}, 400,
     "invalid_request_error", "image blocks are not supported"),
    ({"model": SCRIPTED_ID, "max_tokens": 8, "messages": HI, "tools": F_TOOL,
      "tool_choice": {"type": "tool", "name": "g"}}, 400, "invalid_request_error", "'g'"),
])
def test_errors_are_in_anthropic_shape(server, body, status, kind, needle):
    with server.http() as http:
        r = http.post("/v1/messages", json=body)
    assert r.status_code == status
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == kind
    assert needle in error["error"]["message"]
    assert error["request_id"] == r.headers["x-request-id"]


def test_sdk_raises_typed_errors(client):
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model", max_tokens=8, messages=HI)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model=SCRIPTED_ID, messages=[])


def test_openai_routes_keep_openai_errors(server):
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": HI})
    assert r.status_code == 404 and "type" not in r.json() and r.json()["error"]["code"] == "model_not_found"


def test_models_list_reads_in_both_sdks(client, server):
    page = client.models.list()
    assert SCRIPTED_ID in [m.id for m in page.data] and page.has_more is False
    one = client.models.retrieve(SCRIPTED_ID)
    assert (one.type, one.display_name) == ("model", SCRIPTED_ID) and one.created_at.year > 1970
    assert SCRIPTED_ID in [m.id for m in server.openai().models.list().data]


def test_worker_dying_mid_stream_is_an_error_event(server, client):
    client.messages.create(model=RANDOM_ID, max_tokens=1, messages=HI)   # loaded, so the kill lands mid-stream
    pid = server.health()["worker"]["pid"]
    received = 0
    with pytest.raises(anthropic.APIStatusError) as raised:
        with client.messages.stream(model=RANDOM_ID, max_tokens=2000, messages=HI) as stream:
            for _ in stream.text_stream:
                received += 1
                if received == 1:
                    os.kill(pid, signal.SIGKILL)
    assert received < 2000
    error = raised.value.body["error"]
    assert error["type"] == "overloaded_error" and "restart" in error["message"]
    assert client.messages.create(model=SCRIPTED_ID, max_tokens=64, messages=HI).content[0].text == SCRIPTED_REPLY


def test_middleware_refusals_are_in_anthropic_shape_too(server):
    with server.http() as http:
        wrong_type = http.post("/v1/messages/count_tokens", content=b"{}",
                               headers={"content-type": "text/plain", "sec-fetch-site": "cross-site"})
        misdirected = http.post("/v1/messages", json={}, headers={"host": "evil.example"})
    for response, status, kind in ((wrong_type, 415, "invalid_request_error"),
                                   (misdirected, 421, "invalid_request_error")):
        assert response.status_code == status
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]


def test_consecutive_turns_of_one_role_are_merged():
    from mlxk.server.routes.anthropic import CountTokensRequest, chat_messages

    body = CountTokensRequest(model="m", system="s", messages=[
        {"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
        {"role": "user", "content": [{"type": "text", "text": "reminder"},
                                     {"type": "tool_result", "tool_use_id": "t1", "content": "42"}]}])
    assert chat_messages(body) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "42"},   # the tool result first, then the user's text
        {"role": "user", "content": "reminder"}]


def test_thinking_disabled_reaches_the_template_and_enabled_is_tolerated(client):
    default = client.messages.count_tokens(model=THINKER_ID, messages=HI)
    disabled = client.messages.count_tokens(model=THINKER_ID, messages=HI, thinking={"type": "disabled"})
    assert disabled.input_tokens > default.input_tokens   # the template's empty think block
    reply = client.messages.create(model=SCRIPTED_ID, max_tokens=64, messages=HI,   # not a thinking model: no 400
                                   thinking={"type": "enabled", "budget_tokens": 1024})
    assert reply.content[0].text == SCRIPTED_REPLY


def test_prompt_over_the_context_is_a_400_in_anthropic_words(client):
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(model=SCRIPTED_ID, max_tokens=8, messages=[{"role": "user", "content": "hi " * 2100}])
    error = raised.value.body["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "context_length_exceeded"
    assert re.match(r"prompt is too long: \d+ tokens > 2048 maximum\. This model's maximum context", error["message"])
