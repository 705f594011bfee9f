"""Real model families in the engine: tiny random or scripted llama weights under the real tokenizers, configs and chat
templates of /work/shared/realmodels (read from there, never copied; skipped with the reason when absent).

Llama 3.2 calls tools with bare JSON (`{"name", "parameters"}`): its calls must come back as tool_calls, and a
forced call (tool_choice) must be generated in that format. Qwen3 writes "</think>\\n\\n" before its answer: the
blank lines must not open the content.
"""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tests import factory
from mlxk.workers.inference.protocol import GenerateRequest, ModelRef, Params
from tests.fixtures.engine import collect, model_ref, text_of
from tests.fixtures.engine import engine, no_compile_off_main_thread  # noqa: F401 (fixtures)
from tests.fixtures.shared import REALMODELS

SPEC = factory.ModelSpec(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=32, dtype="float32")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
    "additionalProperties": False}}}
HI = [{"role": "user", "content": "What is the weather in Paris?"}]


def family_files(family: str, reply_ids: list[int] | None = None) -> dict[str, bytes]:
    """The family's own tokenizer, template and generation files around tiny llama weights of its vocabulary size."""
    folder = REALMODELS / family
    if not folder.is_dir():
        pytest.skip(f"{folder} is not on this machine (the real {family} tokenizer and template)")
    real = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    eos = generation.get("eos_token_id", real.get("eos_token_id"))
    eos = eos if isinstance(eos, list) else [eos]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": SPEC.hidden_size,
        "num_hidden_layers": SPEC.num_hidden_layers, "num_attention_heads": SPEC.num_attention_heads,
        "num_key_value_heads": SPEC.num_key_value_heads, "intermediate_size": SPEC.intermediate_size,
        "max_position_embeddings": 4096, "vocab_size": real["vocab_size"], "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": reply_ids is None, "hidden_act": "silu",
        "bos_token_id": real.get("bos_token_id"), "eos_token_id": eos, "torch_dtype": SPEC.dtype,
    }
    files = factory._build_weights(SPEC, config, quantize=False, shards=1, script=reply_ids, eos_id=eos[0])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja"):
        if (folder / name).is_file():
            files[name] = (folder / name).read_bytes()
    return files


def write(tmp_path_factory, repo_id: str, files: dict) -> ModelRef:
    repo = factory.write_repo(tmp_path_factory.mktemp("hub"), repo_id, files)
    return model_ref(repo)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write(tmp_path_factory, "mlx-community/Llama-3.2-tiny", family_files("llama3.2"))


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_llama32_forced_call_is_a_tool_call(llama, engine, tool_choice):
    events = collect(engine.submit(GenerateRequest(id="t", model=llama, kind="chat", messages=HI, params=Params(
        max_tokens=60, tools=[WEATHER], tool_choice=tool_choice))))
    assert events[-1]["event"] == "done" and events[-1]["finish_reason"] == "tool_calls", events[-1]
    (call,) = [c for e in events for c in e.get("tool_calls", [])]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert text_of(events, "content") == ""


def test_llama32_free_text_stays_content(llama, engine):
    """With tools but no call (random weights write no JSON), the reply is content, finish length, nothing lost."""
    events = collect(engine.submit(GenerateRequest(id="t", model=llama, kind="chat", messages=HI, params=Params(
        max_tokens=8, tools=[WEATHER], tool_choice="auto"))))
    assert events[-1]["finish_reason"] == "length"
    assert text_of(events, "content") and not [c for e in events for c in e.get("tool_calls", [])]


def test_qwen3_answer_does_not_start_with_the_blank_lines_after_think(tmp_path_factory, engine):
    from tokenizers import Tokenizer

    folder = REALMODELS / "qwen3"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not on this machine (the real Qwen3 tokenizer and template)")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # the prompt ends in "\n", so the chain must not contain it (a bigram machine continues from the last token)
    ids = tokenizer.encode("<think>Hm.</think>\n\nHello", add_special_tokens=False).ids
    assert len(set(ids)) == len(ids), ids   # the scripted bigram machine needs distinct tokens
    ref = write(tmp_path_factory, "Qwen/Qwen3-tiny", family_files("qwen3", reply_ids=ids))
    events = collect(engine.submit(GenerateRequest(id="t", model=ref, kind="chat", messages=HI,
                                                   params=Params(max_tokens=20))))
    assert events[-1]["finish_reason"] == "stop", events
    assert text_of(events, "reasoning").strip() == "Hm.", events
    assert text_of(events, "content") == "Hello"


def test_gpt_oss_harmony_transcript_through_the_real_tokenizer():
    """The real gpt-oss tokenizer keeps harmony's markers in the decoded text (they are not special there), and the
    router turns its transcript into reasoning, content and tool calls, token by token as the engine feeds it."""
    from mlx_lm.tokenizer_utils import load

    from mlxk.workers.inference.textout import HarmonyRouter, is_harmony

    folder = REALMODELS / "gpt-oss"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not on this machine (the real gpt-oss tokenizer and template)")
    tokenizer = load(folder)
    assert is_harmony(tokenizer)
    hidden = set(tokenizer.all_special_ids)
    transcript = ("<|channel|>analysis<|message|>User asks weather.<|end|><|start|>assistant<|channel|>commentary "
                  'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>')
    for text, expected in ((transcript, ("User asks weather.", "", ["get_weather"])),
                           ("<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>final"
                            "<|message|>Hello world!<|return|>", ("Hm.", "Hello world!", []))):
        router, detok = HarmonyRouter([WEATHER]), tokenizer.detokenizer
        detok.reset()
        deltas = []
        for token in tokenizer.encode(text, add_special_tokens=False):
            if token not in hidden:
                detok.add_token(token)
                deltas.append(router.feed(detok.last_segment))
        detok.finalize()
        deltas += [router.feed(detok.last_segment), router.finish()]
        reasoning = "".join(d.get("reasoning", "") for d in deltas)
        content = "".join(d.get("content", "") for d in deltas)
        names = [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])]
        assert (reasoning, content, names) == expected


def test_gpt_oss_reply_in_the_engine_is_content_not_a_transcript(tmp_path_factory, engine):
    from tokenizers import Tokenizer

    folder = REALMODELS / "gpt-oss"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not on this machine (the real gpt-oss tokenizer and template)")
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
        "<|channel|>final<|message|>Hello world!", add_special_tokens=False).ids
    assert len(set(ids)) == len(ids), ids
    ref = write(tmp_path_factory, "openai/gpt-oss-tiny", family_files("gpt-oss", reply_ids=ids))
    events = collect(engine.submit(GenerateRequest(id="t", model=ref, kind="chat", messages=HI,
                                                   params=Params(max_tokens=20, tools=[WEATHER]))))
    assert events[-1].get("finish_reason") == "stop", events[-1]
    assert text_of(events, "content") == "Hello world!"
    assert text_of(events, "reasoning") == ""


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_gpt_oss_forced_call_is_a_tool_call(tmp_path_factory, engine, tool_choice):
    ref = write(tmp_path_factory, "openai/gpt-oss-random", family_files("gpt-oss"))
    events = collect(engine.submit(GenerateRequest(id="t", model=ref, kind="chat", messages=HI, params=Params(
        max_tokens=60, tools=[WEATHER], tool_choice=tool_choice))))
    assert events[-1].get("finish_reason") == "tool_calls", events
    (call,) = [c for e in events for c in e.get("tool_calls", [])]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert text_of(events, "content") == "" and text_of(events, "reasoning") == ""
