"""tool_choice "auto" with grammar-constrained calls (workers/inference/constrain.py): the text is free, but a call the
model opens (Qwen-style `<tool_call>`, Llama 3's bare JSON, gpt-oss harmony's `to=functions.X`) is held to the tools:
its name is one of them and its arguments validate against that tool's `parameters`, whatever the weights.

The models here are "bigram" models whose next token depends only on the last one: a few scripted transitions (the
prompt's last token → the call's opening marker, and so on) and, for every other token, random logits. So the model
opens a call deterministically and writes the rest from noise; only the grammar makes it a valid call. The real
tokenizers and chat templates of /work/shared/realmodels are used where the family matters (skipped when absent).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests import factory
from tests.fixtures.server import API_KEY, spawn_server
from mlxk.workers.inference.protocol import GenerateRequest, ModelRef, Params
from tests.fixtures.engine import engine, no_compile_off_main_thread  # noqa: F401 (fixtures)
from tests.fixtures.shared import REALMODELS

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 9}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
                   "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
HI = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---- bigram models ----------------------------------------------------------------------------------------------


def bigram_weights(config: dict, table: dict[int, int], noise_seed: int | None) -> dict[str, bytes]:
    """Weights of a llama whose next token depends only on the last: `table` maps a token to its successor (a logit
    far above the rest); every other token gets random logits (noise_seed), or all-equal ones (None: the grammar's
    lowest allowed token id wins). Attention and MLP outputs are zeroed, so the last token's embedding alone
    reaches the head; each scripted source token gets its own embedding dimension."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    config = {**config, "tie_word_embeddings": False}
    vocab, dim = config["vocab_size"], config["hidden_size"]
    sources = sorted(table)
    free = dim - len(sources)
    assert free >= 8, "hidden_size too small for the table"
    rng = np.random.default_rng(noise_seed or 0)
    embed = np.zeros((vocab, dim), dtype=np.float32)
    head = np.zeros((vocab, dim), dtype=np.float32)
    if noise_seed is not None:
        embed[:, :free] = rng.normal(size=(vocab, free))
        head[:, :free] = rng.normal(size=(vocab, free))
    for k, source in enumerate(sources):
        embed[source] = 0.0
        embed[source, free + k] = 1.0
        head[table[source], free + k] = 100.0
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.float32)
    updates = [(k, mx.zeros_like(v)) for k, v in tree_flatten(model.parameters())
               if k.endswith(("o_proj.weight", "down_proj.weight"))]
    updates += [("model.embed_tokens.weight", mx.array(embed)), ("lm_head.weight", mx.array(head))]
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())
    with tempfile.TemporaryDirectory(prefix="mlxk-bigram-") as tmp:
        save_model(Path(tmp), model)
        save_config(dict(config), Path(tmp) / "config.json")
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def tokenizer_of(files: dict):
    from mlx_lm.tokenizer_utils import load

    with tempfile.TemporaryDirectory(prefix="mlxk-tok-") as tmp:
        for name, data in files.items():
            if not name.endswith(".safetensors"):
                (Path(tmp) / name).write_bytes(data)
        return load(Path(tmp))


def family_base(family: str) -> dict:
    """The family's real tokenizer and template around a tiny llama config of its vocabulary size."""
    folder = REALMODELS / family
    if not folder.is_dir():
        pytest.skip(f"{folder} is not on this machine (the real {family} tokenizer and template)")
    real = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    eos = generation.get("eos_token_id", real.get("eos_token_id"))
    files = {name: (folder / name).read_bytes() for name in (
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
        "chat_template.jinja") if (folder / name).is_file()}
    files["config.json"] = json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32,
        "max_position_embeddings": 4096, "vocab_size": real["vocab_size"], "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "bos_token_id": real.get("bos_token_id"),
        "eos_token_id": eos if isinstance(eos, list) else [eos], "torch_dtype": "float32"}).encode()
    return files


def scripted(base: dict, script, noise_seed: int | None) -> dict:
    """base's files with bigram weights; script(tokenizer, prompt_ids) gives the table."""
    tokenizer = tokenizer_of(base)
    prompt = tokenizer.apply_chat_template(HI, tools=[WEATHER, TIME], add_generation_prompt=True)
    weights = bigram_weights(json.loads(base["config.json"]), script(tokenizer, prompt), noise_seed)
    return {**base, **weights}


def qwen_style(tokenizer, prompt) -> dict[int, int]:
    """The tiny tools model (mlx-lm's json_tools format): open a call at once, end the reply after it."""
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>"))
    return {prompt[-1]: start, end: min(tokenizer.eos_token_ids)}


def qwen_style_forever(tokenizer, prompt) -> dict[int, int]:
    """Open a call, and after each call a new line and another call: only max_tokens ends the reply."""
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>"))
    return {prompt[-1]: start, end: prompt[-1]}


# ---- the engine -----------------------------------------------------------------------------------------------




def write(tmp_path_factory, repo_id: str, files: dict) -> ModelRef:
    repo = factory.write_repo(tmp_path_factory.mktemp("hub"), repo_id, files)
    return ModelRef(f"{repo.repo_id}@{repo.revision}", str(repo.snapshot_dir))


def collect(ticket, timeout=120.0) -> list[dict]:
    events = []
    while True:
        events.append(ticket.events.get(timeout=timeout))
        if events[-1]["event"] in ("done", "error"):
            return events


def text_of(events, field="content") -> str:
    return "".join(e.get(field, "") for e in events if e["event"] == "delta")


def calls_of(events) -> list[dict]:
    return [c for e in events for c in e.get("tool_calls", [])]


def assert_valid(call: dict) -> None:
    name = call["function"]["name"]
    assert name in SCHEMAS, call
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


def submit(engine, ref, **params):
    return collect(engine.submit(GenerateRequest(id="t", model=ref, kind="chat", messages=HI, params=Params(
        **{"tools": [WEATHER, TIME], **params}))))


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("tool_choice", [None, "auto"])
def test_auto_call_from_noise_validates(tmp_path_factory, engine, seed, tool_choice):
    """The model opens `<tool_call>` by itself (tool_choice auto, or absent: OpenAI's default with tools); the
    name and arguments come from random logits, so only the grammar makes them a valid call."""
    files = scripted(factory.tiny_model_files(tools=True), qwen_style, seed)
    ref = write(tmp_path_factory, f"org/auto-{seed}", files)
    events = submit(engine, ref, max_tokens=120, tool_choice=tool_choice)
    assert events[-1]["event"] == "done" and events[-1]["finish_reason"] == "tool_calls", events[-1]
    (call,) = calls_of(events)
    assert_valid(call)
    assert text_of(events) == ""


def test_without_the_grammar_the_same_model_writes_no_valid_call(tmp_path_factory, engine):
    """The control: tool_choice "none" hides the tools and constrains nothing; the same model still opens
    `<tool_call>`, and the noise after it is no JSON (else the test above would prove nothing)."""
    files = scripted(factory.tiny_model_files(tools=True), qwen_style, 1)
    ref = write(tmp_path_factory, "org/auto-control", files)
    events = submit(engine, ref, max_tokens=40, tool_choice="none")
    content = text_of(events)
    assert calls_of(events) == [] and content.startswith("<tool_call>")
    with pytest.raises(json.JSONDecodeError):
        json.loads(content.removeprefix("<tool_call>").split("</tool_call>")[0])


def test_auto_calls_and_text_mix_and_a_cut_call_says_length(tmp_path_factory, engine):
    """After a call the row is free again and may open another; the one max_tokens cuts comes back as its text."""
    files = scripted(factory.tiny_model_files(tools=True), qwen_style_forever, 4)
    ref = write(tmp_path_factory, "org/auto-forever", files)
    events = submit(engine, ref, max_tokens=160)   # two calls with their spaces, a third cut
    assert events[-1]["finish_reason"] == "length", events[-1]
    calls = calls_of(events)
    assert len(calls) >= 2 and [c["index"] for c in calls] == list(range(len(calls)))
    for call in calls:
        assert_valid(call)
    assert "<tool_call>" in text_of(events)   # the cut call's text, not dropped


def test_auto_on_a_model_that_never_opens_a_call_is_plain_text(tmp_path_factory, engine):
    files = factory.tiny_model_files(tools=True)
    events = submit(engine, write(tmp_path_factory, "org/auto-random", files), max_tokens=10)
    assert calls_of(events) == [] and events[-1]["finish_reason"] == "length" and text_of(events)


# ---- real families ----------------------------------------------------------------------------------------------


def llama_opens_json(tokenizer, prompt) -> dict[int, int]:
    """Llama 3.2 answers a tool prompt with bare JSON: the first token opens it, noise writes the rest."""
    return {prompt[-1]: tokenizer.encode('{"', add_special_tokens=False)[0]}


def llama_paris(tokenizer, prompt) -> dict[int, int]:
    """No noise: where the script says nothing all logits tie and the grammar's lowest allowed token id wins (one
    tool, so the name is forced); `"` → `Paris` → `"` fills the only free string, the city, with "Paris"."""
    ids = {s: tokenizer.encode(s, add_special_tokens=False)[0] for s in ('{"', '"', "Paris")}
    return {prompt[-1]: ids['{"'], ids['"']: ids["Paris"], ids["Paris"]: ids['"']}


@pytest.mark.parametrize("seed", [1, 2])
def test_llama32_auto_call_from_noise_validates(tmp_path_factory, engine, seed):
    files = scripted(family_base("llama3.2"), llama_opens_json, seed)
    ref = write(tmp_path_factory, f"meta-llama/Llama-3.2-noise-{seed}", files)
    events = submit(engine, ref, max_tokens=80)
    assert events[-1]["event"] == "done" and events[-1]["finish_reason"] == "tool_calls", events[-1]
    (call,) = calls_of(events)
    assert_valid(call)
    assert text_of(events) == ""


def harmony_call(tokenizer, prompt) -> dict[int, int]:
    """gpt-oss opens a commentary message to a function (`<|channel|>commentary to=…`); noise writes the rest."""
    channel, comment, ary, to = tokenizer.encode("<|channel|>commentary to", add_special_tokens=False)
    return {prompt[-1]: channel, channel: comment, comment: ary, ary: to}


def test_gpt_oss_auto_call_from_noise_validates(tmp_path_factory, engine):
    files = scripted(family_base("gpt-oss"), harmony_call, 5)
    ref = write(tmp_path_factory, "openai/gpt-oss-noise", files)
    events = submit(engine, ref, max_tokens=80)
    assert events[-1]["event"] == "done" and events[-1]["finish_reason"] == "tool_calls", events[-1]
    (call,) = calls_of(events)
    assert_valid(call)
    assert text_of(events) == ""


def mistral_list_end(tokenizer, prompt) -> dict[int, int]:
    """Close the list after the first get_weather call, whose arguments end with the digit of `days` (a bigram
    machine would otherwise repeat its call until max_tokens): digit → `}}` → `]`. The digit may also come as
    sentencepiece's byte-fallback token (`<0x31>`)."""
    last = {s: tokenizer.encode("x" + s, add_special_tokens=False)[-1] for s in ("]", "}}", *"123456789")}
    digits = [last[d] for d in "123456789"] + [i for i in tokenizer.convert_tokens_to_ids(
        [f"<0x{ord(d):02X}>" for d in "123456789"]) if i not in (None, tokenizer.unk_token_id)]
    return {**{d: last["}}"] for d in digits}, last["}}"]: last["]"]}


def mistral_call(tokenizer, prompt) -> dict[int, int]:
    """Mistral v0.3 opens `[TOOL_CALLS]` and then writes a JSON list of calls up to the end of the reply."""
    return {prompt[-1]: tokenizer.convert_tokens_to_ids("[TOOL_CALLS]"), **mistral_list_end(tokenizer, prompt)}


@pytest.mark.parametrize("tool_choice, script", [(None, mistral_call), ("required", mistral_list_end)])
def test_mistral_call_from_noise_validates(tmp_path_factory, engine, tool_choice, script):
    """Mistral's JSON-list format: opened by the model (auto) or forced (required); nothing may follow the list."""
    files = scripted(family_base("mistral-v0.3"), script, 6)
    ref = write(tmp_path_factory, f"mistralai/Mistral-noise-{tool_choice}", files)
    events = submit(engine, ref, max_tokens=120, tool_choice=tool_choice, tools=[WEATHER])
    assert events[-1]["event"] == "done" and events[-1]["finish_reason"] == "tool_calls", events[-1]
    calls = calls_of(events)
    assert calls and [c["index"] for c in calls] == list(range(len(calls)))
    for call in calls:
        assert_valid(call)
    assert text_of(events) == ""


# ---- through the real server: streamed and not -----------------------------------------------------------------

TINY_ID, LLAMA_ID = "org/tiny-auto-calls", "meta-llama/Llama-3.2-tiny-scripted"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto-server")
    cache = root / "hf" / "hub"
    cache.mkdir(parents=True)
    factory.write_repo(cache, TINY_ID, scripted(factory.tiny_model_files(tools=True), qwen_style, 1))
    if (REALMODELS / "llama3.2").is_dir():
        factory.write_repo(cache, LLAMA_ID, scripted(family_base("llama3.2"), llama_paris, None))
    srv = spawn_server(root, api_key=API_KEY)
    yield srv
    srv.stop()


def post(server, body: dict) -> dict:
    with server.http(timeout=120) as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, body: dict) -> tuple[list[dict], str | None, str]:
    """(tool-call deltas, finish_reason, content) of a streamed completion."""
    deltas, finish, content = [], None, ""
    with server.http(timeout=120) as http, http.stream("POST", "/v1/chat/completions",
                                                       json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                deltas += choice["delta"].get("tool_calls") or []
                content += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
    return deltas, finish, content


def test_http_auto_call_validates_streamed_and_not(server):
    body = {"model": TINY_ID, "messages": HI, "tools": [WEATHER, TIME], "tool_choice": "auto", "max_tokens": 120}
    choice = post(server, body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert_valid(call)
    deltas, finish, content = stream(server, body)
    assert finish == "tool_calls" and content == ""
    assert_valid({"function": {"name": deltas[0]["function"]["name"],
                               "arguments": "".join(d["function"].get("arguments") or "" for d in deltas)}})


def test_http_auto_call_cut_by_max_tokens_says_length_and_keeps_its_text(server):
    body = {"model": TINY_ID, "messages": HI, "tools": [WEATHER, TIME], "max_tokens": 6}
    choice = post(server, body)["choices"][0]
    assert choice["finish_reason"] == "length" and not choice["message"].get("tool_calls")
    assert choice["message"]["content"].startswith("<tool_call>")
    deltas, finish, content = stream(server, body)
    assert finish == "length" and deltas == [] and content == choice["message"]["content"]


def test_http_llama32_writes_a_call_unforced(server):
    """Issue #10: the Llama 3.2 template renders the tools, the model answers with bare JSON on its own (no
    tool_choice), and the reply is a tool call with finish_reason tool_calls, streamed and not."""
    if not (REALMODELS / "llama3.2").is_dir():
        pytest.skip(f"{REALMODELS / 'llama3.2'} is not on this machine (the real Llama 3.2 tokenizer and template)")
    body = {"model": LLAMA_ID, "messages": HI, "tools": [WEATHER], "max_tokens": 60, "temperature": 0}
    reply = post(server, body)
    plain = post(server, {"model": LLAMA_ID, "messages": HI, "max_tokens": 1})
    assert reply["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 50   # the template rendered the tool
    message = reply["choices"][0]
    assert message["finish_reason"] == "tool_calls", message
    (call,) = message["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 1}
    assert_valid(call)
    assert not message["message"].get("content")
    deltas, finish, content = stream(server, body)
    assert finish == "tool_calls" and content == ""
    assert json.loads("".join(d["function"].get("arguments") or "" for d in deltas))["city"] == "Paris"


def test_http_every_dialect_constrains_an_auto_call(server):
    """Anthropic (tool_choice auto, its default), Responses and Ollama (tools, no choice) reach the same grammar."""
    anthropic_tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
                        "input_schema": t["function"]["parameters"]} for t in (WEATHER, TIME)]
    with server.http(timeout=120) as http:
        r = http.post("/v1/messages", json={"model": TINY_ID, "max_tokens": 120, "messages": HI,
                                            "tools": anthropic_tools, "tool_choice": {"type": "auto"}})
        assert r.status_code == 200, r.text
        (use,) = [b for b in r.json()["content"] if b["type"] == "tool_use"]
        assert r.json()["stop_reason"] == "tool_use"
        assert_valid({"function": {"name": use["name"], "arguments": json.dumps(use["input"])}})

        r = http.post("/v1/responses", json={"model": TINY_ID, "max_output_tokens": 120, "input": HI,
                                             "tools": [{"type": "function", **t["function"]} for t in (WEATHER, TIME)]})
        assert r.status_code == 200, r.text
        (item,) = [o for o in r.json()["output"] if o["type"] == "function_call"]
        assert_valid({"function": {"name": item["name"], "arguments": item["arguments"]}})

        r = http.post("/api/chat", json={"model": TINY_ID, "messages": HI, "stream": False, "tools": [WEATHER, TIME],
                                         "options": {"num_predict": 120}})
        assert r.status_code == 200, r.text
        (call,) = r.json()["message"]["tool_calls"]
        assert_valid({"function": {"name": call["function"]["name"],
                                   "arguments": json.dumps(call["function"]["arguments"])}})


def test_http_auto_with_a_tool_schema_the_grammar_cannot_enforce_is_a_400(server):
    """With auto the tool's parameters constrain a call the model opens, so a schema the compiler rejects is the
    request's fault up front (it once passed unchecked, as auto constrained nothing)."""
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}
    with server.http(timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"model": TINY_ID, "messages": HI, "tools": [bad]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools[0].function.parameters"
