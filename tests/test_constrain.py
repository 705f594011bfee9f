"""Structured output and tool choice by grammar-constrained decoding (workers/inference/constrain.py), in the real
engine on random-weight tiny models: whatever the weights, the output must parse and validate against the schema."""
from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from tests import factory
from mlxk.workers.inference import constrain
from tests.fixtures.engine import calls_of, chat, collect, model_ref, text_of
from tests.fixtures.engine import engine, no_compile_off_main_thread  # noqa: F401 (fixtures)

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 150},
                   "pet": {"enum": ["cat", "dog"]}},
    "required": ["name", "age", "pet"], "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer",
                                                                                          "maximum": 9}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    repos = {
        "random": factory.write_repo(cache, "mlx-community/tiny-chat", factory.tiny_model_files()),
        "tools": factory.write_repo(cache, "org/tools-random", factory.tiny_model_files(tools=True)),
        "think": factory.write_repo(cache, "org/think",
                                    factory.tiny_model_files(reasoning=True, reply="Paris</think>The capital")),
    }
    return {name: model_ref(repo) for name, repo in repos.items()}


def schema_format(schema, strict=True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": strict}}


# ---- response_format ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates_from_random_weights(models, engine, temperature):
    events = collect(engine.submit(chat(models["random"], max_tokens=80, temperature=temperature, seed=3,
                                        response_format=schema_format(PERSON))))
    assert events[-1]["event"] == "done" and events[-1]["finish_reason"] == "stop", events[-1]
    jsonschema.validate(json.loads(text_of(events)), PERSON)


def test_unconstrained_random_model_does_not_produce_json(models, engine):
    """The control: without the grammar the same model and prompt write no JSON (so the test above can fail)."""
    events = collect(engine.submit(chat(models["random"], max_tokens=30)))
    with pytest.raises(ValueError):
        json.loads(text_of(events))


def test_json_object_gives_an_object(models, engine):
    events = collect(engine.submit(chat(models["random"], max_tokens=200,
                                        response_format={"type": "json_object"})))
    if events[-1]["finish_reason"] == "stop":
        assert isinstance(json.loads(text_of(events)), dict)
    else:  # a random model may keep a string open: honest "length", and the text so far is a JSON prefix
        assert events[-1]["finish_reason"] == "length" and text_of(events).startswith("{")


def test_cut_off_json_says_length(models, engine):
    events = collect(engine.submit(chat(models["random"], max_tokens=3, response_format=schema_format(PERSON))))
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 3
    text = text_of(events).replace(" ", "")   # at most one space per gap may come between the tokens
    assert '{"name'.startswith(text) or text.startswith('{"name')


def test_constrained_and_free_rows_share_one_batch(models, engine):
    solo = text_of(collect(engine.submit(chat(models["random"], max_tokens=12))))
    before = engine.peak_batch_rows
    tickets = []
    barrier = threading.Barrier(4)

    def submit(request):
        barrier.wait()
        tickets.append((request, engine.submit(request)))

    requests = [chat(models["random"], max_tokens=12) if i % 2 else
                chat(models["random"], max_tokens=80, response_format=schema_format(PERSON)) for i in range(4)]
    threads = [threading.Thread(target=submit, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for request, ticket in tickets:
        events = collect(ticket)
        if request.params.response_format:
            jsonschema.validate(json.loads(text_of(events)), PERSON)
        else:
            assert text_of(events) == solo  # the neighbours' masks never touch a free row
    assert engine.peak_batch_rows >= 2 or before >= 2


# ---- tool_choice ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool_choice, names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
])
def test_tool_choice_forces_a_valid_call(models, engine, tool_choice, names):
    events = collect(engine.submit(chat(models["tools"], max_tokens=80, tools=[WEATHER, TIME],
                                        tool_choice=tool_choice)))
    assert events[-1]["finish_reason"] == "tool_calls", events
    (call,) = calls_of(events)
    assert call["function"]["name"] in names
    schema = {"get_weather": WEATHER, "get_time": TIME}[call["function"]["name"]]["function"]["parameters"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    assert text_of(events) == ""


def test_tool_choice_auto_stays_free(models, engine):
    events = collect(engine.submit(chat(models["tools"], max_tokens=10, tools=[WEATHER], tool_choice="auto")))
    assert calls_of(events) == [] and events[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("params, words", [
    ({"response_format": schema_format({"type": "nonsense"})}, "response_format.json_schema.schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"response_format": schema_format({"type": "string", "pattern": "("})}, "regex"),
])
def test_bad_constraints_are_bad_requests(models, engine, params, words):
    events = collect(engine.submit(chat(models["random"], max_tokens=5, **params)))
    assert events[-1]["event"] == "error" and events[-1]["status"] == 400
    assert words in events[-1]["message"]


def test_schema_with_odd_llguidance_options_still_constrains(models, engine):
    """A client's own "x-guidance" that is not an object is ignored, not a crash (it once made a 500)."""
    schema = {**PERSON, "x-guidance": 5}
    events = collect(engine.submit(chat(models["random"], max_tokens=80, response_format=schema_format(schema))))
    assert events[-1]["event"] == "done", events[-1]
    jsonschema.validate(json.loads(text_of(events)), PERSON)


def test_model_without_a_call_format_refuses_required(models, engine):
    events = collect(engine.submit(chat(models["random"], max_tokens=5, tools=[WEATHER], tool_choice="required")))
    assert events[-1]["event"] == "error" and events[-1]["status"] == 400
    assert "tool_choice" in events[-1]["message"]


def test_grammar_starts_after_the_think_block(models, engine):
    """A thinking model thinks freely; the schema applies to the answer after </think>."""
    events = collect(engine.submit(chat(models["think"], max_tokens=60, response_format={"type": "json_object"})))
    assert text_of(events, "reasoning") == "Paris"
    content = text_of(events)
    assert content.startswith("{") and "The capital" not in content


# ---- the module without a model -------------------------------------------------------------------------------


def test_spec_names_the_field_at_fault():
    with pytest.raises(constrain.ConstraintError) as info:
        constrain.spec_from(None, [WEATHER], {"type": "function", "function": {"name": "nope"}})
    assert info.value.param == "tool_choice.function.name" and "get_weather" in info.value.message
    with pytest.raises(constrain.ConstraintError) as info:
        constrain.spec_from(None, [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}],
                            "required")
    assert info.value.param == "tools[0].function.parameters"
    assert constrain.spec_from({"type": "text"}, [WEATHER], "none") is None
    for choice in ("auto", None):   # OpenAI's default with tools: free text, but a call the model opens is held
        spec = constrain.spec_from({"type": "text"}, [WEATHER], choice)
        assert spec.auto and [f["name"] for f in spec.tools] == ["get_weather"]
    assert constrain.spec_from(schema_format(PERSON), [WEATHER], "auto").tools == ()   # the response format wins
