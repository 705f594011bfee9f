"""Faults QA found in the grammar and tool paths (Nov 2026), each held here by a test that failed before its fix:

- F6: a JSON grammar that forced `": "` / `", "` pushed a model that writes compact JSON (Llama 3's own calls) off
  its tokens; now both forms pass and whitespace stays bounded.
- F8: objects without `additionalProperties` filled junk keys; for generation they now get none (xgrammar's strict
  mode), while the response is validated against the schema as sent.
- F7: `parallel_tool_calls: false` (Anthropic: `disable_parallel_tool_use`) was ignored; now at most one call.
- F3: a function tool without `description` broke gpt-oss's template (400 UndefinedError).
- F2: `developer` next to `system` (or two system messages) broke templates that require alternation (Gemma).

Models: the bigram models of test_tool_auto (scripted opening, noise after) and the real tokenizers and templates
of /work/shared/realmodels (skipped when absent).
"""
from __future__ import annotations

import json

import jsonschema
import pytest

from tests import factory
from tests.fixtures.server import API_KEY, spawn_server
from tests.test_tool_auto import (HI, REALMODELS, SCHEMAS, TIME, WEATHER, assert_valid, calls_of, collect,
                                  family_base, harmony_call, mistral_call, qwen_style_forever, scripted, text_of,
                                  tokenizer_of, write)
from mlxk.workers.inference import constrain
from mlxk.workers.inference.engine import _effective_tools, _merge_system_runs
from mlxk.workers.inference.protocol import GenerateRequest, Params
from tests.fixtures.engine import engine, no_compile_off_main_thread  # noqa: F401 (fixtures)

PET = {"properties": {"name": {"title": "Name", "type": "string", "maxLength": 8},
                      "kind": {"title": "Kind", "type": "string", "maxLength": 8},
                      "age": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 30}, {"type": "null"}],
                              "default": None}},
       "required": ["name", "kind"], "title": "Pet", "type": "object"}   # pydantic's Pet.model_json_schema()




def real_tokenizer(family: str):
    return tokenizer_of(family_base(family))


def processor_for(tokenizer, spec: constrain.Spec, fmt=None):
    """The processor as Engine._constraint builds it (Llama 3 auto: the opening at the reply's first token)."""
    vocab = constrain.grammar_tokenizer(tokenizer._tokenizer, tokenizer.eos_token_ids)
    grammar = constrain.lark_grammar(spec, fmt, constrain.format_markers(tokenizer, fmt))
    return constrain.GrammarProcessor(vocab, grammar, tokenizer.eos_token_ids,
                                      opening=spec.auto and fmt == constrain.FORMAT_LLAMA3)


def masked_walk(processor, ids: list[int]) -> list[bool]:
    """Drive the real processor over `ids` as BatchGenerator would; per token: whether its mask allowed it."""
    import mlx.core as mx

    allowed, context = [], [0]
    for token in ids:
        out = processor(mx.array(context), mx.zeros((1, processor.vocab.size)))
        allowed.append(bool(out[0, token].item() == 0))
        context.append(token)
    processor(mx.array(context), mx.zeros((1, processor.vocab.size)))   # the processor takes in the last token
    return allowed


def accepts(tokenizer, spec, text, fmt=None) -> bool:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return all(masked_walk(processor_for(tokenizer, spec, fmt), ids))


# ---- F6: compact and spaced JSON, bounded whitespace ---------------------------------------------------------


@pytest.mark.parametrize("text", [
    '{"name":"get_weather","parameters":{"city":"Paris","days":2}}',          # Llama 3's own compact call
    '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',    # json.dumps' spacing
    '{ "name" : "get_weather" , "parameters" : { "city" : "Paris" , "days" : 2 } }'])
def test_llama3_call_grammar_follows_compact_and_spaced_json(text):
    tokenizer = real_tokenizer("llama3.2")
    spec = constrain.spec_from(None, [WEATHER], "auto")
    processor = processor_for(tokenizer, spec, constrain.FORMAT_LLAMA3)
    assert all(masked_walk(processor, tokenizer.encode(text, add_special_tokens=False)))
    assert processor.state == constrain.ACTIVE and processor.matcher.is_accepting()   # held as a call, complete


@pytest.mark.parametrize("text", ['{"name":  "get_weather"', '{\n"name": "get_weather"', '{"name":"get_weather"\t'])
def test_json_whitespace_stays_bounded(text):
    """At most one space per gap: a model cannot spend its tokens on whitespace."""
    tokenizer = real_tokenizer("llama3.2")
    spec = constrain.spec_from(None, [WEATHER], "required")
    assert not accepts(tokenizer, spec, text, constrain.FORMAT_LLAMA3)


def test_response_format_grammar_follows_compact_json():
    tokenizer = real_tokenizer("qwen3")
    spec = constrain.spec_from({"type": "json_schema", "json_schema": {"name": "p", "schema": PET}}, None, None)
    assert accepts(tokenizer, spec, '{"name":"Rex","kind":"dog"}')
    assert accepts(tokenizer, spec, '{"name": "Rex", "kind": "dog", "age": 3}')


# ---- F8: no extra keys unless the schema says so ---------------------------------------------------------------


def test_objects_without_additional_properties_get_no_extra_keys():
    tokenizer = real_tokenizer("qwen3")
    spec = constrain.spec_from({"type": "json_schema", "json_schema": {"name": "p", "schema": PET}}, None, None)
    assert not accepts(tokenizer, spec, '{"name": "Rex", "kind": "dog", " ": null')
    assert not accepts(tokenizer, spec, '{"name": "Rex", "name": "Max"')
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}, "opt": {"type": "object", "properties": {
            "deep": {"type": "integer"}}}}}}}
    call = constrain.spec_from(None, [tool], "required")
    assert accepts(tokenizer, call, '<tool_call>\n{"name": "f", "arguments": {"q": "x", "opt": {"deep": 1}}}',
                   constrain.FORMAT_JSON_TOOLS)
    assert not accepts(tokenizer, call, '<tool_call>\n{"name": "f", "arguments": {"q": "x", "z"',
                       constrain.FORMAT_JSON_TOOLS)
    assert not accepts(tokenizer, call, '<tool_call>\n{"name": "f", "arguments": {"opt": {"deep": 1, "z"',
                       constrain.FORMAT_JSON_TOOLS)


def test_strict_objects_keeps_what_the_schema_says():
    open_map = {"type": "object", "additionalProperties": {"type": "integer"}}
    assert constrain.strict_objects(open_map) == open_map                   # said: kept
    assert constrain.strict_objects({"type": "object"}) == {"type": "object"}   # no properties: stays open
    tup = constrain.strict_objects({"type": "array", "prefixItems": [{"type": "integer"}]})
    assert tup["items"] is False
    both = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert constrain.strict_objects(both) == both                            # each names part of the keys
    defs = constrain.strict_objects({"$defs": {"P": {"properties": {"a": {}}}}, "$ref": "#/$defs/P"})
    assert defs["$defs"]["P"]["additionalProperties"] is False
    assert PET.get("additionalProperties") is None                          # the caller's schema is not changed


def test_pydantic_schema_from_random_weights_has_only_its_keys(tmp_path_factory, engine):
    ref = write(tmp_path_factory, "org/f8-random", factory.tiny_model_files())
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}}
    for seed in (1, 2, 3):
        events = collect(engine.submit(GenerateRequest(id="t", model=ref, kind="chat", messages=HI, params=Params(
            max_tokens=80, temperature=1.0, seed=seed, response_format=fmt))))
        assert events[-1]["finish_reason"] == "stop", (events[-1], text_of(events))
        pairs = json.loads(text_of(events), object_pairs_hook=lambda kv: kv)
        assert [k for k, _ in pairs] == list(dict.fromkeys(k for k, _ in pairs))   # no duplicate key
        assert {k for k, _ in pairs} <= set(PET["properties"])
        jsonschema.validate(dict(pairs), PET)


# ---- F7: parallel_tool_calls false -----------------------------------------------------------------------------


def submit(engine, ref, **params):
    return collect(engine.submit(GenerateRequest(id="t", model=ref, kind="chat", messages=HI, params=Params(
        **{"tools": [WEATHER, TIME], **params}))))


def test_parallel_false_ends_the_reply_after_one_auto_call(tmp_path_factory, engine):
    """The model opens a call after every call (only max_tokens would end it); with parallel_tool_calls false
    only EOS may follow the first."""
    files = scripted(factory.tiny_model_files(tools=True), qwen_style_forever, 4)
    ref = write(tmp_path_factory, "org/f7-forever", files)
    events = submit(engine, ref, max_tokens=100, parallel_tool_calls=False)
    assert events[-1]["finish_reason"] == "tool_calls", events[-1]
    (call,) = calls_of(events)
    assert_valid(call)
    assert text_of(events) == ""


@pytest.mark.parametrize("tool_choice", [None, "required"])
def test_parallel_false_holds_mistral_to_one_call(tmp_path_factory, engine, tool_choice):
    files = scripted(family_base("mistral-v0.3"), lambda t, p: {p[-1]: t.convert_tokens_to_ids("[TOOL_CALLS]")}, 7)
    ref = write(tmp_path_factory, f"mistralai/Mistral-f7-{tool_choice}", files)
    events = submit(engine, ref, max_tokens=150, tool_choice=tool_choice, parallel_tool_calls=False)
    assert events[-1]["finish_reason"] == "tool_calls", events[-1]
    (call,) = calls_of(events)
    assert_valid(call)


def test_parallel_false_grammar_for_mistral_is_one_item():
    spec = constrain.spec_from(None, [WEATHER], "required", parallel_tool_calls=False)
    assert '"maxItems": 1' in constrain.lark_grammar(spec, constrain.FORMAT_MISTRAL, ((1,), ()))
    spec = constrain.spec_from(None, [WEATHER], "required")
    assert "maxItems" not in constrain.lark_grammar(spec, constrain.FORMAT_MISTRAL, ((1,), ()))


# ---- F3 / F2: template inputs, normalized in the worker --------------------------------------------------------


def test_tools_get_the_optional_fields_templates_dereference():
    bare = [{"type": "function", "function": {"name": "f"}},
            {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}}]
    tools = _effective_tools(Params(tools=bare, tool_choice="auto"))
    assert [t["function"]["description"] for t in tools] == ["", ""]
    assert [t["function"]["parameters"] for t in tools] == [{"type": "object", "properties": {}}] * 2
    assert bare[0]["function"] == {"name": "f"}   # the request's own tools are not changed


def test_only_runs_of_system_messages_merge():
    msgs = [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "u"},
            {"role": "system", "content": "c"}]
    assert _merge_system_runs(msgs) == [{"role": "system", "content": "a\n\nb"}, msgs[2], msgs[3]]
    assert _merge_system_runs(msgs[1:]) is None


GEMMA_ID, OSS_ID, FOREVER_ID, QWEN_ID = ("google/gemma-3-f2", "openai/gpt-oss-f3", "org/f7-forever-http",
                                         "Qwen/Qwen3-f2")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fx1-server")
    cache = root / "hf" / "hub"
    cache.mkdir(parents=True)
    factory.write_repo(cache, FOREVER_ID, scripted(factory.tiny_model_files(tools=True), qwen_style_forever, 4))
    for family, repo_id, script in (("gemma3", GEMMA_ID, None), ("gpt-oss", OSS_ID, harmony_call),
                                    ("qwen3", QWEN_ID, None)):
        if (REALMODELS / family).is_dir():
            base = family_base(family)
            factory.write_repo(cache, repo_id, scripted(base, script or (lambda t, p: {}), 5))
    srv = spawn_server(root, api_key=API_KEY)
    yield srv
    srv.stop()


def need(family: str):
    if not (REALMODELS / family).is_dir():
        pytest.skip(f"{REALMODELS / family} is not on this machine")


def test_http_parallel_false_in_every_dialect_gives_one_call(server):
    anthropic_tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
                        "input_schema": t["function"]["parameters"]} for t in (WEATHER, TIME)]
    with server.http(timeout=180) as http:
        r = http.post("/v1/chat/completions", json={"model": FOREVER_ID, "messages": HI, "tools": [WEATHER, TIME],
                                                    "max_tokens": 100, "parallel_tool_calls": False})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1, choice

        r = http.post("/v1/responses", json={"model": FOREVER_ID, "max_output_tokens": 100, "input": HI,
                                             "parallel_tool_calls": False,
                                             "tools": [{"type": "function", **t["function"]} for t in (WEATHER, TIME)]})
        assert r.status_code == 200, r.text
        assert r.json()["parallel_tool_calls"] is False
        assert len([o for o in r.json()["output"] if o["type"] == "function_call"]) == 1, r.json()["output"]

        r = http.post("/v1/messages", json={"model": FOREVER_ID, "max_tokens": 100, "messages": HI,
                                            "tools": anthropic_tools,
                                            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}})
        assert r.status_code == 200, r.text
        uses = [b for b in r.json()["content"] if b["type"] == "tool_use"]
        assert len(uses) == 1 and r.json()["stop_reason"] == "tool_use", r.json()
        assert_valid({"function": {"name": uses[0]["name"], "arguments": json.dumps(uses[0]["input"])}})


def test_http_gpt_oss_tool_without_description(server):
    need("gpt-oss")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMAS["get_weather"]}}
    with server.http(timeout=180) as http:
        r = http.post("/v1/chat/completions", json={"model": OSS_ID, "messages": HI, "tools": [tool],
                                                    "max_tokens": 60})
        assert r.status_code == 200, r.text
        r = http.post("/v1/chat/completions", json={"model": OSS_ID, "messages": HI, "max_tokens": 60,
                                                    "tools": [{"type": "function", "function": {"name": "ping"}}]})
        assert r.status_code == 200, r.text
        r = http.post("/api/chat", json={"model": OSS_ID, "messages": HI, "stream": False, "tools": [tool],
                                         "options": {"num_predict": 60}})
        assert r.status_code == 200, r.text


def test_http_gemma_system_next_to_developer_and_two_systems(server):
    need("gemma3")
    sys_dev = [{"role": "system", "content": "a"}, {"role": "developer", "content": "be brief"},
               {"role": "user", "content": "hi"}]
    with server.http(timeout=180) as http:
        r = http.post("/v1/chat/completions", json={"model": GEMMA_ID, "messages": sys_dev, "max_tokens": 2})
        assert r.status_code == 200, r.text
        merged = http.post("/v1/chat/completions", json={
            "model": GEMMA_ID, "max_tokens": 2,
            "messages": [{"role": "system", "content": "a\n\nbe brief"}, {"role": "user", "content": "hi"}]})
        assert r.json()["usage"]["prompt_tokens"] == merged.json()["usage"]["prompt_tokens"]
        r = http.post("/v1/responses", json={"model": GEMMA_ID, "max_output_tokens": 2, "instructions": "a",
                                             "input": [{"role": "developer", "content": "be brief"},
                                                       {"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        r = http.post("/api/chat", json={"model": GEMMA_ID, "stream": False, "options": {"num_predict": 2},
                                         "messages": [{"role": "system", "content": "a"},
                                                      {"role": "system", "content": "b"},
                                                      {"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text


def test_http_templates_that_take_two_system_messages_render_both(server):
    """Merging is only the fallback: Qwen's template renders each system message as its own block, as sent."""
    need("qwen3")
    two = [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "hi"}]
    one = [{"role": "system", "content": "a\n\nb"}, {"role": "user", "content": "hi"}]
    with server.http(timeout=180) as http:
        n2 = http.post("/v1/chat/completions", json={"model": QWEN_ID, "messages": two, "max_tokens": 1}).json()
        n1 = http.post("/v1/chat/completions", json={"model": QWEN_ID, "messages": one, "max_tokens": 1}).json()
    assert n2["usage"]["prompt_tokens"] > n1["usage"]["prompt_tokens"], (n2, n1)
