"""One bad model fails only its own requests; a frozen inference worker is noticed, bounded and replaced.

Real parts throughout: tiny MLX models from tests/factory.py with broken files, a real `mlxk serve` with its real
inference worker process (the official openai client over HTTP, the worker's own socket protocol), real SIGSTOP /
SIGCONT of the worker. The one seam: the in-process engine test turns the load-time probe off, so the same broken
weights fail inside the batch's decode step instead (what a model that loads and then fails while generating does).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from mlxk import db
from mlxk.db import models as queries
from mlxk.workers.inference import protocol
from tests import factory
from tests.fixtures.pause import release, wait_paused
from tests.fixtures.server import SCRIPTED_ID, SCRIPTED_REPLY, spawn_server

HELLO = [{"role": "user", "content": "hello"}]
HEADS_ID = "mlx-community/tiny-heads-mismatch"   # healthy to every header rule, fails in mlx-lm's load
INT_ID = "mlx-community/tiny-int-weights"        # F32 weights relabelled I32: caught by health, so sent to the worker
WAIT_S = 30.0


def int_weight_files() -> dict[str, bytes]:
    """The issue's reproduction: a float32 model whose safetensors header says I32 (same width, same size)."""
    files = factory.tiny_model_files(factory.ModelSpec(dtype="float32"))
    files["model.safetensors"] = factory.with_safetensors_dtype(files["model.safetensors"], "F32", "I32")
    return files


def heads_mismatch_files() -> dict[str, bytes]:
    """config.json says 8 attention heads where the weights were made for 4: k_proj/v_proj shapes no longer match
    (a shape mismatch no rule can see from headers without knowing the architecture)."""
    files = factory.tiny_model_files()
    config = json.loads(files["config.json"])
    config["num_attention_heads"] = 8
    return {**files, "config.json": json.dumps(config).encode()}


def until(predicate, timeout: float = WAIT_S, every: float = 0.05):
    """Poll predicate until it returns something truthy (returned) or the timeout passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not reached within {timeout}s")


def chat(srv, model: str, **kwargs):
    with contextlib.closing(srv.openai()) as client:
        return client.chat.completions.create(model=model, messages=HELLO, max_tokens=8, **kwargs)


def worker(srv) -> dict:
    return srv.health()["worker"]


def state_row(srv, repo_id: str) -> dict:
    with contextlib.closing(db.connect(srv.root / "mlxk" / "state.db")) as conn:
        return queries.get_model(conn, repo_id)


def socket_generate(srv, repo) -> list[dict]:
    """One generate request straight to the server's inference worker over its own socket protocol."""
    payload = {"op": "generate", "id": "direct", "kind": "chat", "messages": HELLO, "prompt": None,
               "model": {"key": f"{repo.repo_id}@{repo.revision}", "path": str(repo.snapshot_dir)},
               "params": {"max_tokens": 4}}

    async def go():
        return [event async for event in protocol.request(str(srv.root / "mlxk" / "inference.sock"), payload)]

    return asyncio.run(go())


# ---------------------------------------------------------------------------------------------------------------
# One bad model fails only its own requests


@pytest.fixture(scope="module")
def bad_models_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-models")
    cache = root / "hf" / "hub"
    cache.mkdir(parents=True)
    repos = {
        "heads": factory.write_repo(cache, HEADS_ID, heads_mismatch_files()),
        "int": factory.write_repo(cache, INT_ID, int_weight_files()),
    }
    srv = spawn_server(root, models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}})
    srv.repos.update(repos)
    yield srv
    srv.stop()


def test_model_failing_to_load_fails_only_its_requests_and_is_marked_not_runnable(bad_models_server):
    srv = bad_models_server
    assert chat(srv, SCRIPTED_ID).choices[0].message.content == SCRIPTED_REPLY
    before = worker(srv)
    assert state_row(srv, HEADS_ID)["health"] == "healthy"  # no header rule can see this one

    with pytest.raises(openai.UnprocessableEntityError) as caught:  # streamed: the error comes before any chunk
        chat(srv, HEADS_ID, stream=True)
    error = caught.value.body
    assert caught.value.status_code == 422 and error["code"] == "model_failed"
    assert error["message"].startswith(f"{HEADS_ID} failed while loading: ValueError")
    assert "k_proj" in error["message"] and "\n" not in error["message"]

    # The same worker process serves the good model on: no restart.
    assert chat(srv, SCRIPTED_ID).choices[0].message.content == SCRIPTED_REPLY
    after = worker(srv)
    assert (after["pid"], after["restarts"], after["state"]) == (before["pid"], 0, "ready")

    # The index now says why it cannot run; the next request fails fast with that reason, the worker never asked.
    row = state_row(srv, HEADS_ID)
    assert row["runtime_compatible"] is False and row["reason"].startswith("failed while loading: ValueError")
    with pytest.raises(openai.BadRequestError) as caught:
        chat(srv, HEADS_ID)
    assert caught.value.body["code"] == "model_not_runnable" and row["reason"] in caught.value.body["message"]
    listed = httpx.get(f"{srv.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in listed] == [SCRIPTED_ID]


def test_int_weights_fail_every_request_for_them_and_never_the_worker(bad_models_server):
    """The issue's six requests: each fails as the model's own error; the worker process stays the same one."""
    srv = bad_models_server
    assert chat(srv, SCRIPTED_ID).choices[0].message.content == SCRIPTED_REPLY
    pid = worker(srv)["pid"]
    for _ in range(6):
        (error,) = socket_generate(srv, srv.repos["int"])
        assert error["event"] == "error" and error["type"] == "model_failed" and error["status"] == 422
        assert error["message"].startswith(f"{INT_ID} failed while loading: ValueError")
        assert "int32" in error["message"] and error["model"].startswith(f"{INT_ID}@")
    assert chat(srv, SCRIPTED_ID).choices[0].message.content == SCRIPTED_REPLY
    assert worker(srv)["pid"] == pid and worker(srv)["restarts"] == 0
    # Health had already called it unhealthy, so over HTTP it never reaches the worker at all.
    with pytest.raises(openai.BadRequestError) as caught:
        chat(srv, INT_ID)
    assert caught.value.body["code"] == "model_not_runnable" and "is I32" in caught.value.body["message"]


@pytest.fixture(scope="module", autouse=False)
def no_compile_off_main_thread():
    """MLX's CPU backend may abort at exit after compiled kernels ran on a non-main thread (ml-explore/mlx#3126);
    the in-process engine thread is one (the worker process runs MLX on its main thread instead)."""
    import mlx.core as mx

    mx.disable_compile()
    yield
    mx.enable_compile()


def test_model_failing_while_generating_fails_its_rows_and_queue_only(tmp_path, monkeypatch,
                                                                       no_compile_off_main_thread):
    from mlxk.workers.inference.engine import Engine
    from mlxk.workers.inference.protocol import GenerateRequest, ModelRef, Params
    from mlxk.workers.inference.residency import Residency

    # The seam: without the load-time probe the broken weights load, and fail in BatchGenerator.next().
    monkeypatch.setattr(Residency, "_probe", lambda self, model: None)
    bad = factory.write_repo(tmp_path, INT_ID, int_weight_files())
    good = factory.write_repo(tmp_path, SCRIPTED_ID, factory.tiny_model_files(reply=SCRIPTED_REPLY))
    refs = {name: ModelRef(f"{r.repo_id}@{r.revision}", str(r.snapshot_dir)) for name, r in
            (("bad", bad), ("good", good))}
    engine = Engine(max_loaded=2).start()
    try:
        tickets = [engine.submit(GenerateRequest(id=f"b{i}", model=refs["bad"], kind="chat", messages=HELLO,
                                                 params=Params(max_tokens=4))) for i in range(3)]
        for ticket in tickets:
            events = []
            while not events or events[-1]["event"] not in ("done", "error"):
                events.append(ticket.events.get(timeout=60))
            error = events[-1]
            assert error["type"] == "model_failed" and error["status"] == 422
            assert error["message"].startswith(f"{INT_ID} failed while generating: ValueError")
        good_ticket = engine.submit(GenerateRequest(id="g", model=refs["good"], kind="chat", messages=HELLO,
                                                    params=Params(max_tokens=8)))
        events = []
        while not events or events[-1]["event"] not in ("done", "error"):
            events.append(good_ticket.events.get(timeout=60))
        assert events[-1]["event"] == "done"
        assert "".join(e.get("content", "") for e in events if e["event"] == "delta") == SCRIPTED_REPLY
        assert engine.alive and [m["key"] for m in engine.status()["models"]] == [refs["good"].key]
    finally:
        engine.stop()


# ---------------------------------------------------------------------------------------------------------------
# A frozen worker


def freezing_server(root, **env):
    return spawn_server(root, models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}},
                        env={"MLXK_WORKER_TIMEOUT": "1.5", **env})


def test_frozen_worker_is_reported_its_requests_get_503_and_it_serves_again_when_thawed(tmp_path):
    srv = freezing_server(tmp_path / "srv", MLXK_WORKER_REPLACE_AFTER="600", MLXK_TEST_PAUSE_AT="inference.admit")
    home = srv.root / "mlxk"
    try:
        # A request held on the MLX thread far longer than the timeout (a long prefill) is not the worker's silence:
        # the socket thread still answers pings, /health stays ready, and the request completes when let go.
        outcome = {}
        held = threading.Thread(target=lambda: outcome.update(reply=chat(srv, SCRIPTED_ID)))
        held.start()
        wait_paused(home, "inference.admit")
        pid = worker(srv)["pid"]
        window = time.monotonic() + 3 * 1.5
        while time.monotonic() < window:  # watching /health for twice the timeout and more: it never wavers
            assert worker(srv)["state"] == "ready"
            time.sleep(0.1)
        release(home, "inference.admit")
        held.join(WAIT_S)
        assert outcome["reply"].choices[0].message.content == SCRIPTED_REPLY

        # Freeze it with a request in flight (paused at admission, so it is certainly inside the worker).
        failed = {}

        def waiting():
            try:
                chat(srv, SCRIPTED_ID)
            except openai.APIStatusError as error:
                failed.update(status=error.status_code, body=error.body, at=time.monotonic())

        waiter = threading.Thread(target=waiting)
        waiter.start()
        wait_paused(home, "inference.admit")
        os.kill(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            state = until(lambda: (w := worker(srv))["state"] == "unresponsive" and w)
            assert time.monotonic() - frozen_at <= 5.0 and state["pid"] == pid
            health = srv.health()  # the api answers, and says honestly that it cannot generate
            assert health["status"] == "degraded" and "has not answered" in health["problems"][0]
            waiter.join(WAIT_S)
            assert failed["status"] == 503 and failed["body"]["code"] == "worker_unresponsive"
            assert failed["body"]["retryable"] is True and failed["at"] - frozen_at <= 5.0
            # New requests are refused at once, retryable, instead of queueing behind a frozen process.
            started = time.monotonic()
            response = httpx.post(f"{srv.url}/v1/chat/completions", timeout=WAIT_S,
                                  json={"model": SCRIPTED_ID, "messages": HELLO, "max_tokens": 4})
            assert response.status_code == 503 and time.monotonic() - started < 2.0
            assert response.json()["error"]["code"] == "worker_unresponsive"
            assert "has not answered for" in response.json()["error"]["message"]
            assert response.headers["retry-after"] == "1"
        finally:
            os.kill(pid, signal.SIGCONT)
        release(home, "inference.admit")  # the request it was holding was abandoned; let that row go
        state = until(lambda: (w := worker(srv))["state"] == "ready" and w)
        assert (state["pid"], state["restarts"]) == (pid, 0)  # thawed in time: the same worker, not replaced
        assert srv.health()["status"] == "ok" and "problems" not in srv.health()

        answered = {}
        again = threading.Thread(target=lambda: answered.update(reply=chat(srv, SCRIPTED_ID)))
        again.start()
        wait_paused(home, "inference.admit")
        release(home, "inference.admit")
        again.join(WAIT_S)
        assert answered["reply"].choices[0].message.content == SCRIPTED_REPLY
    finally:
        srv.stop()


def test_worker_that_stays_frozen_is_killed_and_replaced(tmp_path):
    srv = freezing_server(tmp_path / "srv", MLXK_WORKER_REPLACE_AFTER="1")
    try:
        assert chat(srv, SCRIPTED_ID).choices[0].message.content == SCRIPTED_REPLY
        old = worker(srv)["pid"]
        os.kill(old, signal.SIGSTOP)
        try:
            until(lambda: worker(srv)["state"] == "unresponsive")
            state = until(lambda: (w := worker(srv))["state"] == "ready" and w["pid"] != old and w, timeout=90)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(old, signal.SIGCONT)  # if it was not killed, do not leave it stopped
        assert state["restarts"] == 1
        with pytest.raises(ProcessLookupError):
            os.kill(old, 0)  # killed and reaped
        assert chat(srv, SCRIPTED_ID).choices[0].message.content == SCRIPTED_REPLY
        assert "killing it to start a new one" in srv.log()
    finally:
        srv.stop()


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[metal::malloc] Unable to allocate 4294967296 bytes")])
def test_running_out_of_memory_while_loading_is_retryable_not_the_models_fault(tmp_path, monkeypatch, error,
                                                                               no_compile_off_main_thread):
    """A full machine says nothing about the model: 503 busy, retryable, and no model_failed (so no verdict).
    The seam: the probe raises what MLX raises when an allocation fails (this machine cannot be filled safely)."""
    from mlxk.workers.inference.engine import Engine
    from mlxk.workers.inference.protocol import GenerateRequest, ModelRef, Params
    from mlxk.workers.inference.residency import Residency

    def out_of_memory(self, model):
        raise error

    monkeypatch.setattr(Residency, "_probe", out_of_memory)
    repo = factory.write_repo(tmp_path, SCRIPTED_ID, factory.tiny_model_files(reply=SCRIPTED_REPLY))
    engine = Engine().start()
    try:
        ticket = engine.submit(GenerateRequest(id="m", model=ModelRef(f"{repo.repo_id}@{repo.revision}",
                                                                      str(repo.snapshot_dir)),
                                               kind="chat", messages=HELLO, params=Params(max_tokens=4)))
        event = ticket.events.get(timeout=60)
        assert (event["type"], event["status"], event["retryable"]) == ("busy", 503, True)
        assert event["message"].startswith(f"not enough memory to load {SCRIPTED_ID}@") and engine.alive
    finally:
        engine.stop()


def test_frozen_external_worker_is_reported_but_never_killed(tmp_path):
    """Under honcho the worker is someone else's process: the api reports it and fails its requests, never kills it."""
    import subprocess
    import sys

    srv = freezing_server(tmp_path / "srv", MLXK_INFERENCE_EXTERNAL="1", MLXK_WORKER_REPLACE_AFTER="0.5")
    with open(tmp_path / "worker.log", "ab") as log:
        external = subprocess.Popen([sys.executable, "-m", "mlxk.workers.inference"], env=srv.env, cwd=srv.root,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        until(lambda: (srv.root / "mlxk" / "inference.sock").exists(), timeout=60)
        assert chat(srv, SCRIPTED_ID).choices[0].message.content == SCRIPTED_REPLY
        assert worker(srv)["managed"] is False
        os.kill(external.pid, signal.SIGSTOP)
        try:
            until(lambda: worker(srv)["state"] == "unresponsive")
            with pytest.raises(openai.APIStatusError) as caught:
                chat(srv, SCRIPTED_ID)
            assert caught.value.status_code == 503 and caught.value.body["code"] == "worker_unresponsive"
            # Well past MLXK_WORKER_REPLACE_AFTER (0.5 s): the monitor has had its chances, and still not killed it.
            until(lambda: worker(srv)["silent_s"] >= 3.0)
            assert external.poll() is None
        finally:
            os.kill(external.pid, signal.SIGCONT)
        until(lambda: worker(srv)["state"] == "ready")
        assert chat(srv, SCRIPTED_ID).choices[0].message.content == SCRIPTED_REPLY
    finally:
        srv.stop()
        if external.poll() is None:
            external.terminate()
            external.wait(20)
