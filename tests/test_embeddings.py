"""Embeddings: `POST /v1/embeddings` with the `openai` SDK, Ollama's `/api/embed` and `/api/embeddings` with the
`ollama` client, and `mlxk embed`, against a real `mlxk serve` whose inference worker computes the vectors (mlx-lm,
last-token pooling) on a tiny embedding model the test factory writes in the real cache layout.
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import math
import struct
import subprocess
import sys
import time

import httpx
import ollama
import pytest

from tests import factory
from tests.fixtures.pause import release, wait_paused
from tests.fixtures.server import API_KEY, SCRIPTED_ID, SCRIPTED_REPLY, spawn_server

EMBED_ID = "mlx-community/tiny-sentence-vectors"  # classified by its model card, not its name
HIDDEN = factory.TINY.hidden_size


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    factory.write_repo(root / "hf" / "hub", EMBED_ID, factory.tiny_embedding_files())
    srv = spawn_server(root, api_key=API_KEY, models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def _norm(vector) -> float:
    return math.sqrt(sum(x * x for x in vector))


def _close(a, b, tol=1e-3) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol


def test_the_factory_model_is_classified_embedding(server):
    models = httpx.get(f"{server.url}/api/models", headers=server.headers).json()["models"]
    row = next(m for m in models if m["name"] == EMBED_ID)
    assert row["model_type"] == "embedding" and row["health"] == "healthy"


def test_embedding_models_are_listed_by_v1_models_and_chat_refuses_them(server, client):
    """OpenAI lists its embedding models in /v1/models too; the chat routes refuse one by name."""
    listed = {m.id: m for m in client.models.list().data}
    assert EMBED_ID in listed and SCRIPTED_ID in listed
    assert listed[EMBED_ID].context_length == factory.TINY.max_position_embeddings
    one = client.models.retrieve(EMBED_ID)
    assert one.id == EMBED_ID and one.context_length == factory.TINY.max_position_embeddings
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": EMBED_ID,
                                                            "messages": [{"role": "user", "content": "hi"}]})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "model_not_runnable" and error["param"] == "model"
    assert "embedding model" in error["message"]


def test_openai_sdk_embeddings_create(client):
    """The SDK asks for base64 by default and decodes it: float32 little-endian."""
    reply = client.embeddings.create(model=EMBED_ID, input=["hello world", "a different, longer sentence"])
    assert [d.index for d in reply.data] == [0, 1] and reply.model == EMBED_ID
    first, second = (d.embedding for d in reply.data)
    assert len(first) == HIDDEN and abs(_norm(first) - 1) < 1e-3 and abs(_norm(second) - 1) < 1e-3
    assert not _close(first, second)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 2


def test_float_and_base64_agree_and_string_equals_one_item_list(server):
    with server.http() as http:
        plain = http.post("/v1/embeddings", json={"model": EMBED_ID, "input": "hello world",
                                                   "encoding_format": "float"}).json()
        packed = http.post("/v1/embeddings", json={"model": EMBED_ID, "input": ["hello world"],
                                                    "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert _close(plain["data"][0]["embedding"], struct.unpack(f"<{len(raw) // 4}f", raw))


def test_token_ids_and_dimensions(server, client):
    ids = [5, 17, 42, 99]
    by_ids = client.embeddings.create(model=EMBED_ID, input=[ids, [7, 8]], encoding_format="float")
    assert by_ids.usage.prompt_tokens == 6
    single = client.embeddings.create(model=EMBED_ID, input=ids, encoding_format="float")  # one token list
    assert len(single.data) == 1 and _close(single.data[0].embedding, by_ids.data[0].embedding)
    short = client.embeddings.create(model=EMBED_ID, input=[ids], dimensions=8, encoding_format="float")
    vector = short.data[0].embedding
    assert len(vector) == 8 and abs(_norm(vector) - 1) < 1e-3
    with server.http() as http:
        too_many = http.post("/v1/embeddings", json={"model": EMBED_ID, "input": "x", "dimensions": HIDDEN + 1})
    assert too_many.status_code == 400 and f"this model's {HIDDEN}" in too_many.json()["error"]["message"]


def test_batched_requests_give_the_vectors_of_lone_ones(server, client):
    """Concurrent requests run through one padded forward pass; padding must not change any vector."""
    texts = [f"sentence number {i} " + "word " * i for i in range(8)]
    alone = [client.embeddings.create(model=EMBED_ID, input=t, encoding_format="float").data[0].embedding
             for t in texts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda t: client.embeddings.create(
            model=EMBED_ID, input=t, encoding_format="float").data[0].embedding, texts))
    mixed = client.embeddings.create(model=EMBED_ID, input=texts, encoding_format="float")
    assert all(_close(a, b) for a, b in zip(alone, together))
    assert all(_close(a, d.embedding) for a, d in zip(alone, mixed.data))
    ps = httpx.get(f"{server.url}/api/ps", headers=server.headers).json()
    assert any(m["repo_id"] == EMBED_ID for m in ps["models"])  # resident like any model


def _metric(server, name: str) -> int:
    text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    found = [line.split()[-1] for line in text.splitlines() if line.startswith(f"{name} ")]
    return int(found[0]) if found else 0  # no worker yet


def test_requests_that_wait_for_the_mlx_thread_share_one_forward_pass(tmp_path):
    """The MLX thread is held at the start of a flush (a test pause point) while 8 one-text requests arrive; once
    it goes on, all 8 run in one forward pass (each alone would be one pass)."""
    factory.write_repo(tmp_path / "hf" / "hub", EMBED_ID, factory.tiny_embedding_files())
    srv = spawn_server(tmp_path, env={"MLXK_TEST_PAUSE_AT": "embed.flush"})
    try:
        client = srv.openai()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            first = pool.submit(client.embeddings.create, model=EMBED_ID, input="text 0")
            wait_paused(srv.root / "mlxk", "embed.flush")  # the flush for the first request holds the thread
            rest = [pool.submit(client.embeddings.create, model=EMBED_ID, input=f"text {i}") for i in range(1, 8)]
            deadline = time.monotonic() + 60
            while _metric(srv, "mlxk_embed_waiting") < 8:
                assert time.monotonic() < deadline, "the requests did not reach the worker"
                time.sleep(0.05)
            release(srv.root / "mlxk", "embed.flush")
            vectors = [f.result(timeout=60).data[0].embedding for f in [first, *rest]]
        assert len(vectors) == 8 and all(len(v) == HIDDEN for v in vectors)
        assert _metric(srv, "mlxk_embed_batches_total") == 1 and _metric(srv, "mlxk_embed_peak_batch_inputs") == 8
    finally:
        srv.stop()


def test_a_client_that_hangs_up_cancels_its_embedding_request(tmp_path):
    """The MLX thread is held at the start of a flush (a test pause point); a second request arrives and waits for
    the batch, then its client hangs up: it leaves the batch (waiting back to 1, counted cancelled), and only the
    first request's input is computed once the thread goes on."""
    import socket

    factory.write_repo(tmp_path / "hf" / "hub", EMBED_ID, factory.tiny_embedding_files())
    srv = spawn_server(tmp_path, env={"MLXK_TEST_PAUSE_AT": "embed.flush"})
    try:
        client = srv.openai()

        def until(name, value):
            deadline = time.monotonic() + 60
            while _metric(srv, name) != value:
                assert time.monotonic() < deadline, f"{name} never became {value}"
                time.sleep(0.05)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.embeddings.create, model=EMBED_ID, input="text 0")
            wait_paused(srv.root / "mlxk", "embed.flush")
            body = json.dumps({"model": EMBED_ID, "input": "the one who leaves"}).encode()
            leaver = socket.create_connection(("127.0.0.1", srv.port))
            leaver.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            until("mlxk_embed_waiting", 2)
            leaver.close()
            until("mlxk_embed_cancelled_total", 1)
            assert _metric(srv, "mlxk_embed_waiting") == 1
            release(srv.root / "mlxk", "embed.flush")
            assert len(first.result(timeout=60).data[0].embedding) == HIDDEN
        assert _metric(srv, "mlxk_embed_peak_batch_inputs") == 1
        assert "client of an embedding request" in srv.log()
    finally:
        srv.stop()


@pytest.mark.parametrize("body, status, problem, param", [
    ({"model": SCRIPTED_ID, "input": "x"}, 400, "only embedding models give embeddings", "model"),
    ({"model": EMBED_ID, "input": []}, 400, "input", "input"),
    ({"model": EMBED_ID, "input": [""]}, 400, "empty", "input[0]"),
    ({"model": EMBED_ID, "input": [[-1]]}, 400, "negative", "input[0]"),
    ({"model": EMBED_ID, "input": [[1], [10 ** 9]]}, 400, "vocabulary", "input[1]"),
    ({"model": EMBED_ID, "input": ["a", 1]}, 400, "input[1]", "input[1]"),
    ({"model": EMBED_ID, "input": "x", "dimensions": HIDDEN + 1}, 400, "dimensions", "dimensions"),
    ({"model": EMBED_ID, "input": ["a", "many words " * 1200]}, 400, "maximum context length", "input[1]"),
    ({"model": EMBED_ID, "input": "x", "encoding_format": "int8"}, 400, "encoding_format", "encoding_format"),
    ({"model": "mlx-community/nope", "input": "x"}, 404, "no cached model", None),
])
def test_bad_embedding_requests(server, body, status, problem, param):
    """OpenAI refuses an input over the context (no truncation) and names the field at fault in `param`."""
    with server.http() as http:
        response = http.post("/v1/embeddings", json=body)
    error = response.json()["error"]
    assert response.status_code == status and problem in error["message"], error
    assert error["param"] == param


def test_ollama_embed_and_legacy_embeddings(server, client):
    ol = ollama.Client(host=server.url, headers=server.headers, timeout=120)
    reply = ol.embed(model=f"{EMBED_ID}:latest", input=["hello world", "bye"])
    assert len(reply.embeddings) == 2 and len(reply.embeddings[0]) == HIDDEN and reply.prompt_eval_count > 0
    openai_vector = client.embeddings.create(model=EMBED_ID, input="hello world", encoding_format="float")
    assert _close(reply.embeddings[0], openai_vector.data[0].embedding)
    legacy = ol.embeddings(model=EMBED_ID, prompt="hello world")
    assert _close(legacy.embedding, reply.embeddings[0])
    assert "embedding" in ol.show(EMBED_ID).capabilities
    with pytest.raises(ollama.ResponseError) as info:
        ol.embed(model=SCRIPTED_ID, input="x")
    assert info.value.status_code == 400 and "only embedding models" in info.value.error


def test_mlxk_embed_prints_vectors(server):
    def mlxk(*args):
        return subprocess.run([sys.executable, "-c", "from mlxk.cli import main; main()", *args],
                              env={**server.env, "MLXK_API_KEY": API_KEY}, capture_output=True, text=True,
                              timeout=120)

    text = mlxk("embed", "tiny-sentence-vectors", "hello world", "bye")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    assert len(lines) == 2 and len(json.loads(lines[0])) == HIDDEN
    doc = mlxk("embed", EMBED_ID, "hello world", "--json")
    data = json.loads(doc.stdout)["data"]
    assert data["dimensions"] == HIDDEN and _close(data["embeddings"][0], json.loads(lines[0]))
    wrong = mlxk("embed", SCRIPTED_ID, "x", "--json")
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["error"]["code"] == "model_not_runnable"
