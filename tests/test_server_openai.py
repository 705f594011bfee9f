"""The OpenAI API of `mlxk serve`, driven by the official `openai` client against a real server and worker.

One server for the module (tests/fixtures/server.py): a scripted model that answers exactly "Hello world!", a
random-weight one that never stops by itself, a scripted thinker, an API key.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import time

import httpx
import openai
import pytest

from tests import factory
from tests.fixtures.server import API_KEY, CALLER_ID, DIALECT_MODELS, RANDOM_ID, SCRIPTED_ID, SCRIPTED_REPLY, \
    THINKER_ID, spawn_server

TOOLS_ID = "mlx-community/tiny-tools"
MODELS = {TOOLS_ID: {"tools": True, "reply": SCRIPTED_REPLY}, **DIALECT_MODELS}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = spawn_server(tmp_path_factory.mktemp("openai"), models=MODELS, api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def test_models_lists_runnable_models(server, client):
    factory.make_variant(server.root / "hf" / "hub", "shard_empty", repo_id="mlx-community/tiny-broken")
    ids = {m.id for m in client.models.list().data}
    assert {SCRIPTED_ID, RANDOM_ID, THINKER_ID} <= ids
    assert "mlx-community/tiny-broken" not in ids
    model = client.models.retrieve(SCRIPTED_ID)
    assert (model.id, model.object, model.owned_by) == (SCRIPTED_ID, "model", "mlx-community")


def test_chat_non_streaming_with_usage(client):
    reply = client.chat.completions.create(model=SCRIPTED_ID, messages=HI)
    assert reply.object == "chat.completion"
    assert reply.model == SCRIPTED_ID
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == SCRIPTED_REPLY
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.usage
    assert usage.prompt_tokens > 5 and usage.completion_tokens >= 3
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_streaming_role_first_usage_last(client):
    chunks = list(client.chat.completions.create(model="tiny-scripted", messages=HI, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SCRIPTED_REPLY
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 3
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=SCRIPTED_ID, messages=HI, stream=True))
    assert all(c.choices for c in chunks)
    assert all(getattr(c, "usage", None) is None for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_never_leak(client, stream):
    kwargs = dict(model=SCRIPTED_ID, messages=HI, stop=["world"])
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    else:
        reply = client.chat.completions.create(**kwargs)
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
    assert text == "Hello "


def test_max_tokens_gives_length(client):
    reply = client.chat.completions.create(model=RANDOM_ID, messages=HI, max_completion_tokens=3, seed=1)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_completions_plain_and_streamed(client):
    reply = client.completions.create(model=SCRIPTED_ID, prompt="Say hi:", max_tokens=16)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == SCRIPTED_REPLY and reply.choices[0].finish_reason == "stop"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(client.completions.create(model=SCRIPTED_ID, prompt="Say hi:", max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}, stop="world"))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello "
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_reasoning_content_separated(client):
    reply = client.chat.completions.create(model=THINKER_ID, messages=HI)
    message = reply.choices[0].message
    assert message.content == "Hello world!"
    assert getattr(message, "reasoning_content", None) == "Hm."
    chunks = list(client.chat.completions.create(model=THINKER_ID, messages=HI, stream=True))
    thinking = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    assert thinking == "Hm."
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello world!"


def test_tools_reach_the_chat_template(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    plain = client.chat.completions.create(model=TOOLS_ID, messages=HI)
    with_tools = client.chat.completions.create(model=TOOLS_ID, messages=HI, tools=tools, tool_choice="auto")
    assert with_tools.choices[0].message.content == SCRIPTED_REPLY
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 10   # the tool schema was rendered
    off = client.chat.completions.create(model=TOOLS_ID, messages=HI, tools=tools, tool_choice="none")
    assert off.usage.prompt_tokens == plain.usage.prompt_tokens


F_TOOL = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


def test_tool_calls_reach_the_client_as_openai_tool_calls(client):
    reply = client.chat.completions.create(model=CALLER_ID, messages=HI, tools=F_TOOL)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content  # the markup became a call, not text
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "f", {})
    assert call.id
    # the client sends the call and its result back: the template takes both and the model answers again
    again = client.chat.completions.create(model=CALLER_ID, tools=F_TOOL, messages=HI + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "42"}])
    assert again.choices[0].finish_reason == "tool_calls"
    assert again.usage.prompt_tokens > reply.usage.prompt_tokens


def test_streamed_tool_calls_arrive_as_deltas(client):
    chunks = list(client.chat.completions.create(model=CALLER_ID, messages=HI, tools=F_TOOL, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].index == 0 and deltas[0].id and deltas[0].function.name == "f"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments) == {}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_client_disconnect_cancels_generation(server, client):
    stream = client.chat.completions.create(model=RANDOM_ID, messages=HI, stream=True, max_tokens=2000)
    for i, _chunk in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 1.5  # the 2000 tokens alone would take ~4 s here: only a cancel frees it sooner
    while time.monotonic() < deadline:
        ps = httpx.get(f"{server.url}/api/ps", headers=server.headers).json()
        if ps["running"] == 0 and ps["waiting"] == 0:
            break
        time.sleep(0.05)
    assert (ps["running"], ps["waiting"]) == (0, 0)
    metrics = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    assert "mlxk_http_requests_in_flight 0" in metrics


def _wait_ps(server, done, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        ps = httpx.get(f"{server.url}/api/ps", headers=server.headers).json()
        if done(ps) or time.monotonic() > deadline:
            return ps
        time.sleep(0.02)


def test_non_streamed_client_disconnect_cancels_generation(server):
    rid = f"req-hangup-{time.monotonic_ns()}"
    body = json.dumps({"model": RANDOM_ID, "messages": HI, "max_tokens": 2000}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {API_KEY}\r\nx-request-id: {rid}\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + body)
        ps = _wait_ps(server, lambda ps: ps["running"] == 1, timeout=30)
        assert ps["running"] == 1, ps
    # Hung up. 2000 tokens alone take ~4 s here: only a cancel frees the row this soon.
    ps = _wait_ps(server, lambda ps: ps["running"] == 0 and ps["waiting"] == 0, timeout=1.5)
    assert (ps["running"], ps["waiting"]) == (0, 0)
    cancelled = re.search(rf"request {re.escape(rid)} cancelled after (\d+) tokens", server.log())
    assert cancelled and int(cancelled.group(1)) < 2000
    deadline = time.monotonic() + 2   # the api's own books close too (in flight 0)
    while "mlxk_http_requests_in_flight 0" not in httpx.get(f"{server.url}/metrics", headers=server.headers).text:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_four_parallel_streams_complete(client):
    def one(i: int) -> tuple[str, str, int]:
        chunks = list(client.chat.completions.create(
            model=SCRIPTED_ID, messages=[{"role": "user", "content": f"question {i}"}], stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        return text, finish, chunks[-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert results == [(SCRIPTED_REPLY, "stop", results[0][2])] * 4


# ---------------------------------------------------------------- errors


def test_unknown_model_404_with_suggestion(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="mlx-community/tiny-scriptd", messages=HI)
    error = info.value.body
    assert error["code"] == "model_not_found"
    assert SCRIPTED_ID in error["message"] and SCRIPTED_ID in error["suggestions"]


def test_names_resolve_like_the_cli(server, client):
    revision = server.repos[SCRIPTED_ID].revision
    reply = client.chat.completions.create(model=f"tiny-scripted@{revision[:7]}", messages=HI)
    assert reply.model == SCRIPTED_ID and reply.choices[0].message.content == SCRIPTED_REPLY
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=f"{SCRIPTED_ID}@0000000", messages=HI)
    assert "revision '0000000'" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=HI)
    assert info.value.body["code"] == "ambiguous_match" and SCRIPTED_ID in info.value.body["matches"]


def test_not_runnable_model_gets_index_reason(server, client):
    factory.make_variant(server.root / "hf" / "hub", "shard_empty", repo_id="mlx-community/tiny-broken")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-broken", messages=HI)
    body = info.value.body
    assert body["code"] == "model_not_runnable"
    assert "mlx-community/tiny-broken cannot be run" in body["message"]
    assert "Traceback" not in body["message"] and body["reason"]


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"temperature": "hot"}, "temperature"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),   # only with stream: true, as OpenAI says
])
def test_unsupported_or_invalid_fields_name_the_field(server, extra, param):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": SCRIPTED_ID, "messages": HI, **extra})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert error["type"] == "invalid_request_error"


def test_completions_refuses_best_of_and_echo(client):
    for kwargs, param in (({"best_of": 2}, "best_of"), ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=SCRIPTED_ID, prompt="x", **kwargs)
        assert info.value.body["param"] == param


def test_neutral_and_unknown_fields_are_accepted(client):
    reply = client.chat.completions.create(
        model=SCRIPTED_ID, messages=HI, n=1, logprobs=False, presence_penalty=0, frequency_penalty=0,
        response_format={"type": "text"}, store=False, user="u", metadata={"a": "b"}, service_tier="auto",
        parallel_tool_calls=True, top_p=1.0, temperature=0, seed=7,
        extra_body={"some_future_field": {"x": 1}, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0})
    assert reply.choices[0].message.content == SCRIPTED_REPLY


def test_bad_json_is_400_in_openai_shape_with_request_id(server):
    with server.http() as http:
        response = http.post("/v1/chat/completions", content=b'{"model": ',
                             headers={"x-request-id": "abc-123", "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in response.json()["error"]["message"]
    assert response.headers["x-request-id"] == "abc-123"


def test_request_id_on_every_response(server):
    with server.http() as http:
        ok = http.get("/v1/models")
        missing = http.get("/no/such/route")
    assert ok.headers["x-request-id"].startswith("req-")
    assert missing.status_code == 404 and missing.headers["x-request-id"].startswith("req-")
    assert missing.json()["error"]["code"] == "not_found"


def test_api_key_required_except_health(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key="wrong").models.list()


# ---------------------------------------------------------------- a dying worker


def _worker_pid(server) -> int:
    return server.health()["worker"]["pid"]


def test_killed_worker_fails_stream_then_next_request_works(server, client):
    client.chat.completions.create(model=RANDOM_ID, messages=HI, max_tokens=1)
    pid = _worker_pid(server)
    stream = client.chat.completions.create(model=RANDOM_ID, messages=HI, stream=True, max_tokens=2000)
    received = 0
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
                if received == 1:
                    os.kill(pid, signal.SIGKILL)
    assert "restart" in str(info.value.message)
    assert received < 2000
    reply = client.chat.completions.create(model=SCRIPTED_ID, messages=HI)
    assert reply.choices[0].message.content == SCRIPTED_REPLY
    assert _worker_pid(server) != pid
    assert server.health()["worker"]["restarts"] >= 1


def test_killed_worker_gives_retryable_503_to_waiting_request(server, client):
    client.chat.completions.create(model=RANDOM_ID, messages=HI, max_tokens=1)
    pid = _worker_pid(server)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(httpx.post, f"{server.url}/v1/chat/completions", headers=server.headers, timeout=60,
                             json={"model": RANDOM_ID, "messages": HI, "max_tokens": 2000})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ps = httpx.get(f"{server.url}/api/ps", headers=server.headers).json()
            if ps["running"] or ps["waiting"]:
                break
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        response = future.result()
    if response.status_code == 200:
        pytest.skip("the generation finished before the kill landed")
    assert response.status_code == 503
    body = response.json()["error"]
    assert (body["type"], body["code"], body["retryable"]) == ("server_error", "worker_restarting", True)
    assert response.headers["retry-after"] == "1"
    assert client.chat.completions.create(model=SCRIPTED_ID, messages=HI).choices[0].message.content == SCRIPTED_REPLY


# ---------------------------------------------------------------- two workers for one socket (honcho)


class FakeExternalWorker:
    """Stands in for honcho's `inference` worker: takes the socket's lock first, answers pings once listening."""

    def __init__(self, sock: str):
        self.sock = sock
        self.handle = None
        self.server = None

    def lock(self) -> None:
        import fcntl

        self.handle = open(f"{self.sock}.lock", "w")
        fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)

    async def listen(self) -> None:
        import asyncio

        async def pong(reader, writer):
            await reader.readline()
            writer.write(json.dumps({"event": "pong", "pid": os.getpid()}).encode() + b"\n")
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_unix_server(pong, path=self.sock)

    async def close(self) -> None:
        server, self.server = self.server, None
        handle, self.handle = self.handle, None
        if server is not None:
            server.close()
            await server.wait_closed()
        if handle is not None:
            handle.close()


def _supervisor(tmp_path, *, external=False):
    from mlxk.server.supervisor import Supervisor, WorkerOptions

    return Supervisor(WorkerOptions(socket=tmp_path / "inference.sock", max_loaded=1, keep_alive_s=5.0,
                                    max_waiting=4, max_prompt_tokens=1000, external=external))


def run_supervised(tmp_path, scenario, *, external=False, locked=False) -> None:
    """Run `await scenario(sup, fake, ensure)`: a started Supervisor, a FakeExternalWorker on its socket (holding
    the lock already when `locked`) and `ensure`, a task of `sup.ensure()` created just before the scenario, so it
    has not run yet when the scenario starts. Whatever happens, ensure is cancelled, the supervisor stopped and the
    fake worker closed."""
    import asyncio

    async def main():
        sup = _supervisor(tmp_path, external=external)
        fake = FakeExternalWorker(sup.socket)
        ensure = None
        try:
            if locked:
                fake.lock()
            await sup.start()
            ensure = asyncio.create_task(sup.ensure())
            await scenario(sup, fake, ensure)
        finally:
            if ensure is not None:
                ensure.cancel()
            await sup.stop()
            await fake.close()

    asyncio.run(main())


def test_external_mode_never_starts_a_worker_and_waits_for_honchos(tmp_path, monkeypatch):
    """MLXK_INFERENCE_EXTERNAL (the Procfile's api line): even with no lock and no socket yet, the api waits."""
    import asyncio

    from mlxk.server import supervisor

    monkeypatch.setattr(supervisor, "EXTERNAL_WAIT_S", 3.0)

    async def scenario(sup, fake, ensure):
        assert sup.state() == {"state": "stopped", "pid": None, "managed": False, "restarts": 0}
        await asyncio.sleep(1.0)
        assert not ensure.done() and sup.child_pid is None
        await fake.listen()
        await asyncio.wait_for(ensure, 10)
        assert sup.state()["managed"] is False and sup.child_pid is None
        await fake.close()
        sup._lost()
        with pytest.raises(supervisor.WorkerRestarting, match="MLXK_INFERENCE_EXTERNAL"):
            await sup.ensure()                  # gone for good: a clear 503, still no worker of our own
        assert sup.child_pid is None

    run_supervised(tmp_path, scenario, external=True)


def test_supervisor_waits_for_a_starting_external_worker_instead_of_starting_a_rival(tmp_path):
    import asyncio

    async def scenario(sup, fake, ensure):      # fake: started by honcho, lock taken, no socket yet
        await asyncio.sleep(1.0)
        assert not ensure.done() and sup.child_pid is None   # waiting for it; no second worker
        await fake.listen()
        await asyncio.wait_for(ensure, 10)
        assert sup.state() == {"state": "ready", "pid": None, "managed": False, "restarts": 0}

    run_supervised(tmp_path, scenario, locked=True)


def test_supervisor_uses_the_worker_that_won_the_socket_from_its_child(tmp_path):
    import asyncio

    async def scenario(sup, fake, ensure):      # nothing there yet: the api starts its own worker...
        deadline = time.monotonic() + 5
        while sup.child_pid is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        child = sup.child_pid
        fake.lock()                                  # ...and honcho's takes the socket first
        await fake.listen()
        await asyncio.wait_for(ensure, 60)           # the child exits ("already serving"): no 503, the winner
        assert sup.state()["managed"] is False and sup.child_pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)                        # gone and reaped
        await asyncio.sleep(1.5)                     # three monitor rounds: nothing restarts the loser
        assert sup.restarts == 0 and sup.child_pid is None

    run_supervised(tmp_path, scenario)
