"""No request body makes a 5xx, and the connection stays usable after any error.

Reproductions (issue 9): JSON nested 1,000+ levels was a 500 RecursionError; a lone surrogate ("\\ud800") in
content, `stop`, `model` or a completions prompt was a 500 UnicodeEncodeError in the worker protocol, and after
each 500 the keep-alive connection was reset under the client's next request. Then a bounded schemathesis run
(the real `mlxk serve` over real HTTP, positive and negative cases from our own OpenAPI document) finds no 5xx.
"""
from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.fixtures.queue import reap_background_workers
from tests.fixtures.server import SCRIPTED_ID, SCRIPTED_REPLY, spawn_server

JSON = {"content-type": "application/json"}
CHAT = {"model": SCRIPTED_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": SCRIPTED_ID, "prompt": "hi", "max_tokens": 2}
LONE = "\ud800"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """A keyless server with the scripted model; jobs that fuzzing queues go to a worker that soon exits."""
    root = tmp_path_factory.mktemp("fuzz")
    server = spawn_server(root, models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}},
                          env={"MLXK_WORKER_IDLE": "2", "HF_ENDPOINT": "http://127.0.0.1:9"})
    yield server
    server.stop()
    reap_background_workers(root / "mlxk")


def bad_then_good(srv, bad: tuple, good: tuple, timeout: float = 60) -> tuple[httpx.Response, httpx.Response]:
    """Send `bad` then `good` (method, path, kwargs) on one keep-alive client; assert one connection carried both
    (the same client-side port), i.e. the error did not cost the client its connection."""
    ports = []
    with httpx.Client(base_url=srv.url, timeout=timeout) as client:
        responses = []
        for method, path, kwargs in (bad, good):
            responses.append(client.request(method, path, **kwargs))
            ports.append(responses[-1].extensions["network_stream"].get_extra_info("client_addr")[1])
    assert ports[0] == ports[1], "the connection was dropped after the error"
    return responses[0], responses[1]


def nested(depth: int) -> bytes:
    inner = "[" * depth + "]" * depth
    return f'{{"model": "{SCRIPTED_ID}", "messages": [{{"role": "user", "content": {inner}}}]}}'.encode()


def with_surrogate(path: str) -> bytes:
    """A body whose field at `path` holds a lone surrogate, written as JSON's \\ud800 escape."""
    body = json.loads(json.dumps(COMPLETION if path.startswith("prompt") else CHAT))
    where = {
        "model": lambda b: b.update(model=LONE),
        "messages[0].content": lambda b: b["messages"][0].update(content=f"hi {LONE}"),
        "messages[0].role": lambda b: b["messages"][0].update(role=LONE),
        "stop": lambda b: b.update(stop=LONE),
        "stop[1]": lambda b: b.update(stop=["x", LONE]),
        "prompt": lambda b: b.update(prompt=LONE),
        "prompt[0]": lambda b: b.update(prompt=[LONE]),
        "tools[0].function.name": lambda b: b.update(tools=[{**TOOL, "function": {**TOOL["function"], "name": LONE}}]),
        "user": lambda b: b.update(user=LONE),
        "metadata": lambda b: b.update(metadata={LONE: "key"}),
    }
    where[path](body)
    return json.dumps(body).encode()  # ensure_ascii: the surrogate travels as the six characters \ud800


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_bodies_are_400_and_the_connection_survives(srv, depth):
    bad, good = bad_then_good(srv, ("POST", "/v1/chat/completions", {"content": nested(depth), "headers": JSON}),
                              ("GET", "/v1/models", {}))

    assert bad.status_code == 400, bad.text
    assert "nested too deeply" in bad.json()["error"]["message"]
    assert good.status_code == 200


@pytest.mark.parametrize("path", ["model", "messages[0].content", "messages[0].role", "stop", "stop[1]", "prompt",
                                  "prompt[0]", "tools[0].function.name", "user", "metadata"])
def test_lone_surrogates_are_400_naming_the_field(srv, path):
    endpoint = "/v1/completions" if path.startswith("prompt") else "/v1/chat/completions"
    bad, good = bad_then_good(srv, ("POST", endpoint, {"content": with_surrogate(path), "headers": JSON}),
                              ("GET", "/health", {}))

    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert "surrogate" in error["message"] and error["param"] == path
    assert good.status_code == 200


@pytest.mark.parametrize("body", [b'{"model": "x", "temperature": NaN, "messages": []}', b'{"model": Infinity}',
                                  b"\xff\xfe", b"[]", b'"text"', b""])
def test_other_unusable_json_is_400(srv, body):
    bad, good = bad_then_good(srv, ("POST", "/v1/chat/completions", {"content": body, "headers": JSON}),
                              ("GET", "/health", {}))
    assert bad.status_code == 400, bad.text
    assert good.status_code == 200


def test_a_good_generation_after_bad_ones_on_one_connection(srv):
    bad, good = bad_then_good(srv, ("POST", "/v1/completions", {"content": with_surrogate("prompt"), "headers": JSON}),
                              ("POST", "/v1/chat/completions", {"json": CHAT}), timeout=120)
    assert bad.status_code == 400
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["message"]["content"]


def test_openapi_declares_bodies_and_errors(srv):
    doc = httpx.get(f"{srv.url}/openapi.json", timeout=10).json()
    posts = {path: ops["post"] for path, ops in doc["paths"].items() if "post" in ops}
    assert set(posts) >= {"/v1/chat/completions", "/v1/completions", "/api/jobs/pull", "/api/jobs/scan",
                          "/api/jobs/{job_id}/cancel", "/api/jobs/{job_id}/retry", "/api/stop"}
    for path, op in posts.items():
        assert "application/json" in op["requestBody"]["content"], path
        assert {"400", "401", "403", "415", "421"} <= set(op["responses"]), path
    chat = posts["/v1/chat/completions"]
    assert chat["requestBody"]["required"] is True and "503" in chat["responses"]
    assert "messages" in chat["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "$defs" not in json.dumps(doc)  # every schema stands alone or lives in components


def test_schemathesis_finds_no_server_error(srv):
    """Bounded: a few positive and negative cases per operation (well under a minute on two busy cores)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    failures, calls = [], []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=8, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def exercise(case):
                if case.method.upper() == "POST" and (case.media_type or "application/json") != "application/json":
                    return  # 415 by design; covered in test_security_http
                response = case.call(base_url=srv.url, timeout=60)
                calls.append(response.status_code)
                if response.status_code >= 500 and response.status_code != 503:
                    failures.append((case.method, case.formatted_path, case.body, response.status_code,
                                     response.text[:300]))

            try:
                exercise()
            except Unsatisfiable:  # nothing to break in this operation (GET /health has no input at all)
                assert mode == GenerationMode.NEGATIVE
    assert not failures, failures[:5]
    assert len(calls) > 100 and any(400 <= status < 500 for status in calls)  # it really sent cases, bad ones too


def test_an_unexpected_error_is_a_500_that_keeps_the_connection(tmp_path):
    """A bug (here a route added by the test that raises) answers 500 in OpenAI's shape without its traceback, and
    the keep-alive connection serves the next request: real uvicorn in a thread, the app of `mlxk serve`."""
    import threading

    import uvicorn

    from mlxk.server.app import create_app
    from tests.fixtures.server import free_port

    app = create_app()

    @app.get("/test-only/boom")
    async def boom():
        raise RuntimeError("a bug with a secret inside")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)

        class Srv:
            url = f"http://127.0.0.1:{port}"

        bad, good = bad_then_good(Srv, ("GET", "/test-only/boom", {}), ("GET", "/health", {}))
    finally:
        server.should_exit = True
        thread.join(30)
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["code"] == "internal" and "RuntimeError" in error["message"] and "secret" not in error["message"]
    assert bad.headers["x-request-id"]
    assert good.status_code == 200
