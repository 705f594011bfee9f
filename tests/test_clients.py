"""The clients people point at a local server, against a real `mlxk serve` on random-weight tiny models: the official
`openai` SDK, simonw's `llm`, `langchain-openai` and `litellm`. Structured output and forced tool calls must come back
valid from weights that know nothing, because decoding is grammar-constrained (workers/inference/constrain.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.fixtures.server import API_KEY, RANDOM_ID, spawn_server

TOOLS_ID = "mlx-community/tiny-tools-random"
MODELS = {RANDOM_ID: {}, TOOLS_ID: {"tools": True}}
HI = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
                   "additionalProperties": False}}}


class Pet(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = spawn_server(tmp_path_factory.mktemp("clients"), models=MODELS, api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


# ---- openai ---------------------------------------------------------------------------------------------------


def test_openai_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(model=RANDOM_ID, messages=HI, response_format=Pet, max_tokens=80)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Pet)


def test_openai_json_object_streamed(client):
    chunks = list(client.chat.completions.create(
        model=RANDOM_ID, messages=HI, max_tokens=80, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    Pet.model_validate_json(text)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


@pytest.mark.parametrize("tool_choice, names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
])
def test_openai_tool_choice_required_and_named(client, tool_choice, names):
    reply = client.chat.completions.create(model=TOOLS_ID, messages=HI, tools=[WEATHER, TIME],
                                           tool_choice=tool_choice, max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name in names
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_openai_tool_choice_required_streamed(client):
    chunks = list(client.chat.completions.create(model=TOOLS_ID, messages=HI, tools=[WEATHER], stream=True,
                                                 tool_choice="required", max_tokens=80))
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]
    json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_unknown_tool_name_is_a_400_naming_it(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TOOLS_ID, messages=HI, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_tide"}})
    assert info.value.body["param"] == "tool_choice.function.name"
    assert "'get_tide'" in info.value.body["message"] and "get_weather" in info.value.body["message"]


def test_openai_forced_call_on_a_model_without_a_call_format_is_a_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=RANDOM_ID, messages=HI, tools=[WEATHER], tool_choice="required")
    assert info.value.body["param"] == "tool_choice" and "tool_choice 'auto'" in info.value.body["message"]


# ---- llm ------------------------------------------------------------------------------------------------------


def test_llm_prompt_with_schema(server, tmp_path):
    pytest.importorskip("llm")
    user = tmp_path / "llm"
    user.mkdir()
    (user / "extra-openai-models.yaml").write_text(
        f"- model_id: tiny\n  model_name: {RANDOM_ID}\n  api_base: {server.url}/v1\n  api_key_name: mlxk\n"
        "  supports_schema: true\n")
    (user / "keys.json").write_text(json.dumps({"mlxk": API_KEY}))
    env = {**os.environ, "LLM_USER_PATH": str(user)}
    # bounded fields: a random model would otherwise fill max_tokens with one string (an honest "length" cut)
    schema = json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                                          "age": {"type": "integer", "maximum": 30}},
                         "required": ["name", "age"]})
    result = subprocess.run([sys.executable, "-m", "llm", "-m", "tiny", "--schema", schema, "-o",
                             "max_tokens", "80", "hi"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


# ---- langchain-openai -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return lambda model: langchain_openai.ChatOpenAI(model=model, base_url=f"{server.url}/v1", api_key=API_KEY,
                                                     max_tokens=80, temperature=0)


def test_langchain_with_structured_output(chat_model):
    pet = chat_model(RANDOM_ID).with_structured_output(Pet).invoke("hi")
    assert isinstance(pet, Pet)


def test_langchain_with_structured_output_json_mode(chat_model):
    data = chat_model(RANDOM_ID).with_structured_output(Pet.model_json_schema(), method="json_mode").invoke("hi")
    assert isinstance(data, dict)


def test_langchain_bind_tools_named(chat_model):
    message = chat_model(TOOLS_ID).bind_tools([WEATHER, TIME], tool_choice="get_weather").invoke("hi")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    assert isinstance(message.tool_calls[0]["args"]["city"], str)


def test_langchain_stream(chat_model):
    pieces = [chunk.content for chunk in chat_model(RANDOM_ID).bind(max_tokens=8).stream("hi")]
    assert len(pieces) > 1 and "".join(pieces)


# ---- litellm --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm(server):
    # litellm fetches its model price map from GitHub at import unless told to use the copy it ships
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    return pytest.importorskip("litellm")


def test_litellm_completion_with_response_format(server, litellm):
    reply = litellm.completion(model=f"openai/{RANDOM_ID}", api_base=f"{server.url}/v1", api_key=API_KEY,
                               messages=HI, max_tokens=80, response_format=Pet)
    Pet.model_validate_json(reply.choices[0].message.content)


def test_litellm_context_window_error_class(server, litellm):
    too_long = [{"role": "user", "content": "hello world " * 2100}]
    with pytest.raises(litellm.ContextWindowExceededError) as info:
        litellm.completion(model=f"openai/{RANDOM_ID}", api_base=f"{server.url}/v1", api_key=API_KEY,
                           messages=too_long, max_tokens=5)
    assert "maximum context length is 2048 tokens" in str(info.value)
