"""The inference engine in-process: real tiny MLX models on the CPU backend, real BatchGenerator."""
from __future__ import annotations

import json
import time

import pytest

from tests import factory
from mlxk.workers.inference.engine import Engine
from mlxk.workers.inference.protocol import GenerateRequest, ModelRef, Params
from tests.fixtures.engine import HELLO, chat, collect, model_ref, text_of
from tests.fixtures.engine import no_compile_off_main_thread  # noqa: F401 (autouse here)
from mlxk.workers.inference.textout import OutputRouter, StopFilter

PROMPTS = [
    HELLO,
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Count with me"}],
    [{"role": "user", "content": "def add(a, b):"}],
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models written once for the module (the per-test HF cache would rebuild them each time)."""
    cache = tmp_path_factory.mktemp("hub")
    repos = {
        "chat": factory.write_repo(cache, "mlx-community/tiny-chat", factory.tiny_model_files()),
        "other": factory.write_repo(cache, "mlx-community/tiny-chat-b",
                                    factory.tiny_model_files(factory.ModelSpec(seed=1))),
        "hello": factory.write_repo(cache, "org/hello", factory.tiny_model_files(reply="Hello world!")),
        "think": factory.write_repo(cache, "org/think",
                                    factory.tiny_model_files(reasoning=True, reply="Paris</think>The capital")),
        "tools": factory.write_repo(cache, "org/tools",
                                    factory.tiny_model_files(tools=True, reply='<tool_call>{"name": "f"}</tool_call>')),
    }
    return {name: model_ref(repo) for name, repo in repos.items()}


@pytest.fixture
def engine():
    made = []

    def make(**kwargs) -> Engine:
        e = Engine(**kwargs)
        made.append(e)
        return e

    yield make
    for e in made:
        e.stop()


def run(engine, request) -> list[dict]:
    return collect(engine.submit(request))


def reference_text(ref, messages, max_tokens) -> tuple[str, int]:
    from mlx_lm import load, stream_generate

    model, tokenizer = load(ref.path)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    pieces = [r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)]
    return "".join(pieces), len(prompt)


def prompt_len(ref, messages=HELLO) -> int:
    from mlx_lm import load

    _, tokenizer = load(ref.path)
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# ---- generation ---------------------------------------------------------------------------------------------


def test_greedy_matches_mlx_lm_generate_with_real_usage(models, engine):
    e = engine().start()
    expected, prompt_tokens = reference_text(models["chat"], HELLO, 24)
    events = run(e, chat(models["chat"], max_tokens=24))
    assert events[0] == {"event": "accepted", "prompt_tokens": prompt_tokens, "cached_tokens": 0}
    assert text_of(events) == expected
    done = events[-1]
    assert done["finish_reason"] == "length"
    assert done["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 24,
                             "total_tokens": prompt_tokens + 24, "prompt_tokens_details": {"cached_tokens": 0},
                             "completion_tokens_details": {"reasoning_tokens": 0}}
    assert done["timings"]["ttft_s"] > 0 and done["timings"]["decode_tokens_per_s"] > 0
    assert len([ev for ev in events if ev["event"] == "delta"]) > 1  # streamed, not one lump


def test_completion_kind_tokenizes_prompt_as_is(models, engine):
    from mlx_lm import load

    _, tokenizer = load(models["chat"].path)
    e = engine().start()
    events = run(e, GenerateRequest(id="c", model=models["chat"], kind="completion", prompt="The capital of",
                                    params=Params(max_tokens=3)))
    assert events[0]["prompt_tokens"] == len(tokenizer.encode("The capital of"))
    assert events[-1]["usage"]["completion_tokens"] == 3


def test_scripted_reply_ends_at_eos_with_exact_text_and_counts(models, engine):
    e = engine().start()
    events = run(e, chat(models["hello"], max_tokens=50))
    assert text_of(events) == "Hello world!"
    assert events[-1]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == 4  # "Hello", " world", "!", <|im_end|>
    assert all("<|im_end|>" not in ev.get("content", "") for ev in events)


@pytest.mark.parametrize("stops, expected", [
    (["lo wo"], "Hel"),            # spans the tokens "Hello" | " world": only the text filter sees it
    ([" world"], "Hello"),         # exactly one token: the token-level matcher ends it
    (["xyz", "d!"], "Hello worl"),  # second of two stops, spans " world" | "!"
    (["Hello world!"], ""),        # the whole reply
])
def test_stop_strings_never_leak(models, engine, stops, expected):
    e = engine().start()
    events = run(e, chat(models["hello"], max_tokens=50, stop=stops))
    assert text_of(events) == expected
    assert events[-1]["finish_reason"] == "stop"
    for stop in stops:
        assert all(stop not in ev.get("content", "") for ev in events)


def test_partial_stop_prefix_is_released_when_no_stop_follows(models, engine):
    e = engine().start()
    events = run(e, chat(models["hello"], max_tokens=50, stop=["Hello there"]))
    assert text_of(events) == "Hello world!"  # "Hello" was held back, then released
    assert events[-1]["finish_reason"] == "stop"


def test_every_eos_id_of_generation_config_stops(tmp_path, models, engine):
    # Make "!" an extra EOS id in generation_config.json: the reply must end before it.
    from mlx_lm import load

    _, tokenizer = load(models["hello"].path)
    (bang,) = tokenizer.encode("!", add_special_tokens=False)
    files = factory.tiny_model_files(reply="Hello world!")
    files["generation_config.json"] = json.dumps({"eos_token_id": [1, 4, bang]}).encode()
    repo = factory.write_repo(tmp_path / "hub", "org/eos", files)
    ref = ModelRef(f"org/eos@{repo.revision}", str(repo.snapshot_dir))
    e = engine().start()
    events = run(e, chat(ref, max_tokens=60))
    assert text_of(events) == "Hello world"
    assert events[-1]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == 3


def test_max_tokens_gives_length(models, engine):
    e = engine().start()
    done = run(e, chat(models["chat"], max_tokens=5))[-1]
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 5


def test_seed_makes_sampling_repeatable(models, engine):
    e = engine().start()
    a = text_of(run(e, chat(models["chat"], max_tokens=16, temperature=1.5, seed=7)))
    b = text_of(run(e, chat(models["chat"], max_tokens=16, temperature=1.5, seed=7)))
    c = text_of(run(e, chat(models["chat"], max_tokens=16, temperature=1.5, seed=8)))
    assert a == b
    assert a != c


def test_reasoning_goes_to_its_own_field(models, engine):
    # The template opens "<think>\n", the model writes "Paris</think>The capital": thinking, then the answer.
    e = engine().start()
    events = run(e, chat(models["think"], max_tokens=20))
    assert text_of(events, "reasoning") == "Paris"
    assert text_of(events, "content") == "The capital"
    assert events[-1]["finish_reason"] == "stop"


def test_tool_calls_are_parsed_with_finish_reason_tool_calls(models, engine):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    e = engine().start()
    events = run(e, chat(models["tools"], max_tokens=20, tools=tools))
    calls = [c for ev in events for c in ev.get("tool_calls", [])]
    assert [c["function"] for c in calls] == [{"name": "f", "arguments": "{}"}]
    assert calls[0]["index"] == 0 and calls[0]["type"] == "function" and calls[0]["id"]
    assert text_of(events) == ""
    assert events[-1]["finish_reason"] == "tool_calls"


def test_tool_markup_is_plain_text_without_tools(models, engine):
    e = engine().start()
    events = run(e, chat(models["tools"], max_tokens=20))
    assert text_of(events) == '<tool_call>{"name": "f"}</tool_call>'
    assert events[-1]["finish_reason"] == "stop"


# ---- batching -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_requests_share_one_batch_and_match_solo_output(models, engine, n):
    e = engine().start()
    solo = [text_of(run(e, chat(models["chat"], messages, max_tokens=16))) for messages in PROMPTS[:n]]
    assert len(set(solo)) > 1  # the prompts really differ

    batched = engine()  # queued before its loop starts, so all n join the first batch
    tickets = [batched.submit(chat(models["chat"], messages, max_tokens=16)) for messages in PROMPTS[:n]]
    batched.start()
    results = [collect(t) for t in tickets]
    assert [text_of(r) for r in results] == solo
    assert batched.peak_batch_rows == n
    assert all(r[-1]["usage"]["completion_tokens"] == 16 for r in results)


def test_request_joins_a_running_batch(models, engine):
    e = engine().start()
    long = e.submit(chat(models["chat"], max_tokens=300))
    assert long.events.get(timeout=30)["event"] == "accepted"
    assert long.events.get(timeout=30)["event"] == "delta"
    short = collect(e.submit(chat(models["chat"], PROMPTS[1], max_tokens=8)))
    assert short[-1]["finish_reason"] == "length"
    assert e.status()["running"] == 1  # the long one is still going: the short one joined and left
    assert e.peak_batch_rows == 2
    e.cancel(long)


def _first_token_steps(engine, ref, stagger_s: float) -> set:
    """Submit three requests stagger_s apart to an idle engine; the times their first tokens came (one per step)."""
    tickets = []
    for messages in PROMPTS[1:4]:  # not the warm-up's HELLO: a cache hit would skip its prefill
        tickets.append(engine.submit(chat(ref, messages, max_tokens=4)))
        time.sleep(stagger_s)
    done = [collect(t)[-1] for t in tickets]
    return {round(t.submitted_at + d["timings"]["ttft_s"], 4) for t, d in zip(tickets, done)}


@pytest.mark.parametrize("gap_s, steps", [(0.0, 3), (0.5, 1)])
def test_requests_arriving_close_together_share_the_first_prefill(models, engine, gap_s, steps):
    """A batch starting from nothing waits for a burst whose requests arrive a little apart (the api forwards
    parallel requests one after another); without the window each one gets its own prefill and first step."""
    e = engine(coalesce_gap_s=gap_s, coalesce_max_s=5.0).start()
    run(e, chat(models["chat"], max_tokens=1))   # loaded and warm: nothing else slows the first request
    assert len(_first_token_steps(e, models["chat"], stagger_s=0.05)) == steps


def test_one_at_a_time_clients_do_not_pay_the_window(models, engine):
    """The window only opens while traffic comes in bursts: lone requests after a lone request start at once."""
    e = engine(coalesce_gap_s=0.3, coalesce_max_s=0.3).start()
    first = run(e, chat(models["chat"], max_tokens=1))
    assert first[-1]["timings"]["ttft_s"] >= 0.3   # nothing learned yet: the very first one waits for company
    lone = []
    for messages in PROMPTS[1:3]:
        time.sleep(0.4)
        lone.append(run(e, chat(models["chat"], messages, max_tokens=1))[-1]["timings"]["ttft_s"])
    assert max(lone) < 0.25, lone


def test_cancel_frees_the_row(models, engine):
    e = engine().start()
    ticket = e.submit(chat(models["chat"], max_tokens=1500))
    assert ticket.events.get(timeout=30)["event"] == "accepted"
    ticket.events.get(timeout=30)
    e.cancel(ticket)
    assert wait_for(lambda: e.status()["running"] == 0)
    generated = e.counters.generation_tokens_total
    assert generated < 1500
    time.sleep(0.2)
    assert e.counters.generation_tokens_total == generated  # nothing decodes for it any more
    assert run(e, chat(models["chat"], max_tokens=3))[-1]["finish_reason"] == "length"


def test_busy_when_waiting_queue_is_full(models, engine):
    from mlxk.workers.inference.errors import WorkerBusy

    e = engine(max_waiting=2)  # not started: nothing leaves the waiting queue
    e.submit(chat(models["chat"], max_tokens=2))
    e.submit(chat(models["chat"], max_tokens=2))
    with pytest.raises(WorkerBusy) as info:
        e.submit(chat(models["chat"], max_tokens=2))
    assert info.value.to_event()["status"] == 503 and info.value.to_event()["retryable"] is True


# ---- prompt cache -------------------------------------------------------------------------------------------


def test_prompt_cache_reused_on_second_turn(models, engine):
    e = engine().start()
    first = run(e, chat(models["chat"], max_tokens=8))
    assert first[0]["cached_tokens"] == 0
    turn2 = HELLO + [{"role": "assistant", "content": text_of(first)}, {"role": "user", "content": "and you?"}]
    second = run(e, chat(models["chat"], turn2, max_tokens=8))
    cached = second[0]["cached_tokens"]
    assert cached >= first[0]["prompt_tokens"]
    assert second[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    assert e.status()["counters"]["cached_prompt_tokens_total"] == cached


def test_exact_prompt_repeat_hits_cache_and_still_generates_the_same(models, engine):
    e = engine().start()
    a = run(e, chat(models["chat"], max_tokens=8))
    b = run(e, chat(models["chat"], max_tokens=8))
    assert b[0]["cached_tokens"] == b[0]["prompt_tokens"] - 1  # one token given back to seed decoding
    assert text_of(a) == text_of(b)


# ---- models -------------------------------------------------------------------------------------------------


def test_keep_alive_zero_unloads_after_reply(models, engine):
    e = engine().start()
    run(e, chat(models["chat"], max_tokens=2, keep_alive=0))
    assert wait_for(lambda: e.status()["models"] == [])


def test_keep_alive_expiry_unloads(models, engine):
    e = engine().start()
    run(e, chat(models["chat"], max_tokens=2, keep_alive=0.3))
    (model,) = e.status()["models"]
    assert model["keep_alive_s"] == 0.3 and model["expires_at"] is not None
    assert wait_for(lambda: e.status()["models"] == [], timeout=5)


def test_max_loaded_evicts_least_recently_used(models, engine):
    e = engine(max_loaded=1).start()
    run(e, chat(models["chat"], max_tokens=2))
    assert [m["key"] for m in e.status()["models"]] == [models["chat"].key]
    assert run(e, chat(models["other"], max_tokens=2))[-1]["event"] == "done"
    assert [m["key"] for m in e.status()["models"]] == [models["other"].key]


def test_two_models_requests_switch_after_drain(models, engine):
    e = engine(max_loaded=2)
    a = e.submit(chat(models["chat"], max_tokens=6))
    b = e.submit(chat(models["other"], max_tokens=6))
    e.start()
    assert collect(a)[-1]["event"] == "done" and collect(b)[-1]["event"] == "done"
    assert {m["key"] for m in e.status()["models"]} == {models["chat"].key, models["other"].key}


def test_load_and_unload_ops_release_memory(models, engine):
    import mlx.core as mx

    e = engine(max_loaded=2).start()
    assert e.load(models["chat"], 60).result(30) == {"event": "loaded", "key": models["chat"].key}
    (model,) = e.status()["models"]
    assert model["keep_alive_s"] == 60 and model["memory_bytes"] > 0
    loaded = mx.get_active_memory()
    assert e.unload("mlx-community/tiny-chat").result(30) == {"event": "unloaded", "models": [models["chat"].key]}
    assert e.status()["models"] == []
    assert mx.get_active_memory() <= loaded - model["memory_bytes"]


def test_tool_choice_none_hides_tools(models, engine):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    e = engine().start()
    with_tools = run(e, chat(models["tools"], max_tokens=20, tools=tools))
    without = run(e, chat(models["tools"], max_tokens=20, tools=tools, tool_choice="none"))
    assert without[0]["prompt_tokens"] < with_tools[0]["prompt_tokens"]  # the template did not render them
    assert without[-1]["finish_reason"] == "stop" and text_of(without).startswith("<tool_call>")


def test_prompt_too_long_names_limit_and_count(models, engine):
    e = engine(max_prompt_tokens=8).start()
    (error,) = run(e, chat(models["chat"]))
    assert error["type"] == "context_length_exceeded" and error["status"] == 400
    assert f"resulted in {prompt_len(models['chat'])} tokens" in error["message"]
    assert "maximum context length is 8 tokens on this server (MLXK_MAX_PROMPT_TOKENS)" in error["message"]


def test_prompt_beyond_context_length(models, engine):
    e = engine().start()
    prompt = "hello " * 2100  # the tiny model's context is 2048 tokens
    (error,) = run(e, GenerateRequest(id="x", model=models["chat"], kind="completion", prompt=prompt))
    assert error["type"] == "context_length_exceeded"
    assert "This model's maximum context length is 2048 tokens" in error["message"]


@pytest.mark.parametrize("setup, type, status", [
    ("missing", "load_failed", 400),       # not a model folder: the caller's mistake
    ("garbage", "model_failed", 422),      # a model folder mlx-lm cannot load: that model's failure
])
def test_bad_model_path_fails_in_one_line(tmp_path, engine, setup, type, status):
    path = tmp_path / "snap"
    if setup == "garbage":
        path.mkdir()
        (path / "config.json").write_text('{"model_type": "no-such-arch"}')
    e = engine().start()
    (error,) = run(e, chat(ModelRef("org/broken@" + "0" * 40, str(path))))
    assert (error["type"], error["status"]) == (type, status)
    assert "\n" not in error["message"] and "org/broken" in error["message"]
    assert e.status()["models"] == [] and e.alive


def test_bad_messages_are_bad_request(models, engine):
    e = engine().start()
    (error,) = run(e, chat(models["chat"], [{"role": "user", "content": [{"type": "image_url"}]}]))
    assert error["type"] == "bad_request" and error["status"] == 400


def test_status_counts(models, engine):
    e = engine().start()
    run(e, chat(models["chat"], max_tokens=3))
    status = e.status()
    assert status["counters"]["requests_total"] == 1
    assert status["counters"]["generation_tokens_total"] == 3
    assert status["counters"]["prompt_tokens_total"] == prompt_len(models["chat"])
    assert status["running"] == 0 and status["waiting"] == 0 and status["peak_memory_bytes"] > 0


# ---- text routing (pure) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks, stops, emitted, matched", [
    (["hel", "lo wor", "ld"], ["lo w"], "hel", True),
    (["ab", "c"], ["abd"], "ab", False),          # "ab" held, then released by "c"... see flush below
    (["x", "END"], ["END"], "x", True),
    (["a<", "/s", ">b"], ["</s>"], "a", True),
    (["no stops here"], [], "no stops here", False),
])
def test_stop_filter(chunks, stops, emitted, matched):
    f = StopFilter(stops)
    out, hit = "", False
    for chunk in chunks:
        text, hit = f.push(chunk)
        out += text
        if hit:
            break
    if not hit:
        out += f.flush()
    assert hit is matched
    assert out == (emitted if matched else "".join(chunks))


def test_router_parses_tool_calls():
    from mlx_lm.generate import TextStateMachine
    from mlx_lm.tool_parsers import json_tools

    sm = TextStateMachine({"normal": [("<tool_call>", "tool")], "tool": [("</tool_call>", "normal")]})
    router = OutputRouter(sm, "normal", json_tools.parse_tool_call, tools=[{"type": "function"}])
    deltas = [router.feed(t) for t in ["Sure. <tool", '_call>{"name": "get_weather", "argu',
                                       'ments": {"city": "Berlin"}}</tool_call>']]
    deltas.append(router.finish())
    assert "".join(d.get("content", "") for d in deltas) == "Sure. "
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls == [{"index": 0, "id": calls[0]["id"], "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Berlin"}'}}]
    assert router.made_tool_call
