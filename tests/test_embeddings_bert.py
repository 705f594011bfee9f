"""BERT-family embedding models (BERT, XLM-RoBERTa) served by the inference worker's own encoder
(workers/inference/encoder.py): through `/v1/embeddings`, Ollama's `/api/embed` and `mlxk embed`, against a real
`mlxk serve`, on tiny random encoders the test factory writes in the real cache layout with sentence-transformers
pooling configs. The vectors are checked against an independent NumPy BERT, and batched inputs of different lengths
against one-at-a-time (padding must be masked: encoder attention looks both ways).
"""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import httpx
import numpy as np
import ollama
import pytest

from tests import factory
from tests.fixtures.engine import no_compile_off_main_thread  # noqa: F401 (autouse: an in-process engine below)
from tests.fixtures.server import API_KEY, spawn_server

BERT_ID = "sentence-transformers-mlx/tiny-bert-mean"
XLMR_ID = "sentence-transformers-mlx/tiny-xlmr-cls"
ODD_ID = "sentence-transformers-mlx/tiny-modernbert"
MODELS = {BERT_ID: ("bert", "mean"), XLMR_ID: ("xlm-roberta", "cls")}
TEXTS = ["hello", "the cat sat on the mat", "a different, longer sentence of text is the one here",
         "dog world hello vector embedding model"]


def _odd_files() -> dict[str, bytes]:
    files = factory.tiny_bert_files(seed=3)
    config = json.loads(files["config.json"])
    config["model_type"] = "modernbert"
    config["architectures"] = ["ModernBertModel"]
    return {**files, "config.json": json.dumps(config).encode()}


@pytest.fixture(scope="module")
def files():
    made = {repo: factory.tiny_bert_files(model_type=kind, pooling=pooling, seed=n)
            for n, (repo, (kind, pooling)) in enumerate(MODELS.items())}
    return {**made, ODD_ID: _odd_files()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("bert")
    for repo, repo_files in files.items():
        factory.write_repo(root / "hf" / "hub", repo, repo_files)
    srv = spawn_server(root, api_key=API_KEY)
    yield srv
    srv.stop()


def _embed(server, model: str, inputs) -> list[list[float]]:
    with server.http() as http:
        response = http.post("/v1/embeddings", json={"model": model, "input": inputs, "encoding_format": "float"})
    assert response.status_code == 200, response.text
    return [d["embedding"] for d in response.json()["data"]]


def _close(a, b, tol=1e-4) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol


def _reference(repo_files: dict[str, bytes], text: str, pooling: str) -> list[float]:
    """The sentence embedding as Hugging Face's BertModel + sentence-transformers compute it, in float64 NumPy."""
    import mlx.core as mx
    from tokenizers import Tokenizer

    config = json.loads(repo_files["config.json"])
    ids = Tokenizer.from_str(repo_files["tokenizer.json"].decode()).encode(text).ids
    w = {k: np.array(v, dtype=np.float64) for k, v in mx.load(_tmp_file(repo_files["model.safetensors"])).items()}
    offset = config["pad_token_id"] + 1 if config["model_type"] != "bert" else 0
    erf = np.vectorize(math.erf)

    def norm(x, name):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + config["layer_norm_eps"]) * w[name + ".weight"] + w[name + ".bias"]

    def dense(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][
        offset + np.arange(len(ids))] + w["embeddings.token_type_embeddings.weight"][0])
    x = norm(x, "embeddings.LayerNorm")
    heads = config["num_attention_heads"]
    for n in range(config["num_hidden_layers"]):
        at = f"encoder.layer.{n}."
        q, k, v = (dense(x, at + f"attention.self.{p}").reshape(len(ids), heads, -1).transpose(1, 0, 2)
                   for p in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attended = (probs @ v).transpose(1, 0, 2).reshape(len(ids), -1)
        x = norm(dense(attended, at + "attention.output.dense") + x, at + "attention.output.LayerNorm")
        inner = dense(x, at + "intermediate.dense")
        inner = inner * 0.5 * (1 + erf(inner / math.sqrt(2)))
        x = norm(dense(inner, at + "output.dense") + x, at + "output.LayerNorm")
    pooled = x[0] if pooling == "cls" else x.mean(0)
    return list(pooled / np.linalg.norm(pooled))


def _tmp_file(data: bytes) -> str:
    import tempfile

    handle = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
    handle.write(data)
    handle.close()
    return handle.name


def test_bert_family_embedders_are_listed_runnable_and_others_say_why_not(server):
    models = {m["name"]: m for m in httpx.get(f"{server.url}/api/models", headers=server.headers).json()["models"]}
    for repo in MODELS:
        assert models[repo]["model_type"] == "embedding" and models[repo]["health"] == "healthy", models[repo]
        assert models[repo]["runtime_compatible"] is True
    reason = models[ODD_ID]["reason"]
    assert models[ODD_ID]["runtime_compatible"] is False and "modernbert" in reason
    assert "bert, roberta, xlm-roberta" in reason and "upgrade" not in reason  # upgrading mlx-lm would not help
    ol = ollama.Client(host=server.url, headers=server.headers, timeout=60)
    listed = {m.model for m in ol.list().models}
    assert {f"{repo}:latest" for repo in MODELS} <= listed and f"{ODD_ID}:latest" not in listed
    assert "embedding" in ol.show(BERT_ID).capabilities
    with server.http() as http:
        refused = http.post("/v1/embeddings", json={"model": ODD_ID, "input": "hello"})
    error = refused.json()["error"]  # refused before the worker tries it: the index's verdict, even before its scan
    assert refused.status_code == 400 and error["code"] == "model_not_runnable" and "modernbert" in error["message"]


@pytest.mark.parametrize("repo", list(MODELS))
def test_vectors_match_an_independent_reference_encoder(server, files, repo):
    """Weight names, post-norm layers, exact GELU, RoBERTa's position offset and the configured pooling."""
    _, pooling = MODELS[repo]
    for text, vector in zip(TEXTS[:2], _embed(server, repo, TEXTS[:2])):
        assert _close(vector, _reference(files[repo], text, pooling), tol=2e-3)


@pytest.mark.parametrize("repo", list(MODELS))
def test_batched_inputs_of_different_lengths_give_the_lone_vectors(server, repo):
    alone = [_embed(server, repo, text)[0] for text in TEXTS]
    together = _embed(server, repo, TEXTS)
    assert all(_close(a, b) for a, b in zip(alone, together))
    assert not _close(alone[0], alone[1], tol=1e-2)
    assert all(abs(math.fsum(x * x for x in v) - 1) < 1e-4 for v in together)


def test_ollama_embed_and_mlxk_embed_give_the_same_bert_vectors(server):
    reference = _embed(server, BERT_ID, ["hello world", "the cat sat"])
    ol = ollama.Client(host=server.url, headers=server.headers, timeout=120)
    reply = ol.embed(model=BERT_ID, input=["hello world", "the cat sat"])
    assert all(_close(a, b) for a, b in zip(reply.embeddings, reference))
    assert reply.prompt_eval_count == 4 + 5  # [CLS] hello world [SEP] and [CLS] the cat sat [SEP]
    cli = subprocess.run([sys.executable, "-c", "from mlxk.cli import main; main()", "embed", BERT_ID,
                          "hello world", "--json"], env={**server.env, "MLXK_API_KEY": API_KEY},
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert _close(json.loads(cli.stdout)["data"]["embeddings"][0], reference[0])


def test_ollama_truncates_an_input_over_the_context_keeping_the_final_sep(server):
    """Ollama's `truncate` (default true; the legacy /api/embeddings likewise) cuts an input to the context (64
    tokens here) as Hugging Face's truncation does: [CLS] + the first 62 tokens + [SEP]. `truncate: false` and
    OpenAI's route refuse it."""
    words = ["hello", "world", "cat"] * 40   # 122 tokens with [CLS] and [SEP]
    long = " ".join(words)
    ol = ollama.Client(host=server.url, headers=server.headers, timeout=120)
    reply = ol.embed(model=BERT_ID, input=long)
    assert reply.prompt_eval_count == 64
    assert _close(reply.embeddings[0], _embed(server, BERT_ID, " ".join(words[:62]))[0])
    assert _close(ol.embeddings(model=BERT_ID, prompt=long).embedding, reply.embeddings[0])
    with server.http() as http:
        kept = http.post("/api/embed", json={"model": BERT_ID, "input": long, "truncate": False})
        refused = http.post("/v1/embeddings", json={"model": BERT_ID, "input": ["hello", long]})
    assert kept.status_code == 400 and "maximum context length is 64" in kept.json()["error"], kept.text
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input[1]"


def test_an_encoder_cannot_generate(server):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": BERT_ID,
                                                            "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400 and "embedding" in response.json()["error"]["message"]


def test_the_factory_tokenizer_adds_cls_and_sep(files):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(files[BERT_ID]["tokenizer.json"].decode())
    assert tok.encode("hello world").tokens == ["[CLS]", "hello", "world", "[SEP]"]


def test_mlxk_health_judges_encoders_runnable_and_names_an_unknown_type(model_factory, files):
    """The full runtime check (the worker's scan, `mlxk health`), not only list's provisional verdict."""
    from mlxk.detect import detect
    from mlxk.health import check_integrity, check_runtime, inspect_repo

    for repo_id, repo_files in files.items():
        repo = model_factory.write(repo_id, repo_files)
        view = inspect_repo(repo.repo_id, repo.repo_dir)
        assert check_integrity(view) == []
        finding = check_runtime(view, detect(view))
        if repo_id == ODD_ID:
            assert finding.rule == "unsupported_model_type" and "modernbert" in finding.message
            assert "bert, roberta, xlm-roberta" in finding.message and "upgrade" not in finding.message
        else:
            assert finding is None, finding


def test_the_engine_refuses_to_generate_with_an_encoder_and_still_embeds_with_it(tmp_path, files):
    """The api never sends one (the index says `embedding`), but the worker does not trust that: a generate request
    for an encoder is a 400, and the model stays loaded for embeddings."""
    from mlxk.workers.inference.embed import Embedder
    from mlxk.workers.inference.engine import Engine
    from tests.fixtures.engine import chat, collect, model_ref

    ref = model_ref(factory.write_repo(tmp_path, BERT_ID, files[BERT_ID]))
    engine = Engine().start()
    try:
        [error] = collect(engine.submit(chat(ref)))
        assert error["type"] == "bad_request" and "is an embedding model" in error["message"]
        embedder = Embedder(engine)
        reply = asyncio.run(embedder.embed({"model": {"key": ref.key, "path": ref.path}, "inputs": ["hello"]}))
        assert len(reply["embeddings"][0]) == 32 and [m["key"] for m in engine.status()["models"]] == [ref.key]
    finally:
        engine.stop()


def test_a_quantized_conversion_loads_and_embeds_like_its_float_weights(tmp_path):
    """mlx-community's BERT conversions are quantized (config.json `quantization`, packed weights with scales and
    biases): they load with the same names, and 8-bit vectors point where the float ones do."""
    from mlxk.workers.inference.embed import Embedder
    from mlxk.workers.inference.engine import Engine
    from tests.fixtures.engine import model_ref

    plain = model_ref(factory.write_repo(tmp_path, "org/tiny-bert", factory.tiny_bert_files(seed=5)))
    packed = model_ref(factory.write_repo(tmp_path, "org/tiny-bert-8bit",
                                          factory.tiny_bert_files(seed=5, quantize_bits=8)))
    engine = Engine(max_loaded=2).start()
    try:
        embedder = Embedder(engine)

        def vectors(ref):
            message = {"model": {"key": ref.key, "path": ref.path}, "inputs": TEXTS}
            return asyncio.run(embedder.embed(message))["embeddings"]

        for a, b in zip(vectors(plain), vectors(packed)):
            assert 0.99 < sum(x * y for x, y in zip(a, b)) and a != b  # unit vectors: the dot is the cosine
        memory = {m["key"]: m["memory_bytes"] for m in engine.status()["models"]}
        assert memory[packed.key] < memory[plain.key] / 2
    finally:
        engine.stop()
