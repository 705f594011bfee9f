"""The worker's text stages alone (pure Python, mlx-lm's own TextStateMachine and json_tools parser, no model): stop
strings over any split of the text, and tool calls that end unusually. The server tests (test_openai_conformance.py)
cover what a tiny scripted model can say; these cover what it cannot (two calls in one reply: a scripted model
needs distinct tokens), each fed as one piece and as one character at a time, which is how a stream arrives.
"""
from __future__ import annotations

import pytest

from mlxk.workers.inference.textout import OutputRouter, StopFilter

TEXT = "Hi 😀 café, and more"


def run_stops(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    stop_filter, out = StopFilter(stops), []
    for piece in pieces:
        text, matched = stop_filter.push(piece)
        out.append(text)
        if matched:
            return "".join(out), True
    return "".join(out) + stop_filter.flush(), False


@pytest.mark.parametrize("split", ["whole", "chars"])
@pytest.mark.parametrize("stops, expected", [
    (["caf", "zzz"], ("Hi 😀 ", True)),          # a match followed in the list by a stop that never matches
    (["zzz", "caf"], ("Hi 😀 ", True)),
    (["and", "é", "😀"], ("Hi ", True)),         # several match: the earliest in the text wins, not the first listed
    (["é, a", "café"], ("Hi 😀 ", True)),        # overlapping: the one that starts first
    (["zzz", "ü"], (TEXT, False)),               # none matches: everything, the held-back tail included
])
def test_stop_filter(stops, expected, split):
    pieces = [TEXT] if split == "whole" else list(TEXT)
    assert run_stops(stops, pieces) == expected


def _router(parser=None) -> OutputRouter:
    from mlx_lm.generate import TextStateMachine
    from mlx_lm.tool_parsers import json_tools

    machine = TextStateMachine({"normal": [("<tool_call>", "tool")], "tool": [("</tool_call>", "normal")]})
    return OutputRouter(machine, "normal", parser or json_tools.parse_tool_call, [{"type": "function"}],
                        ("<tool_call>", "</tool_call>"))


def route(text: str, split: str, parser=None) -> tuple[str, list]:
    router, content, calls = _router(parser), [], []
    for piece in ([text] if split == "whole" else list(text)):
        delta = router.feed(piece)
        content.append(delta.get("content", ""))
        calls += delta.get("tool_calls", [])
    delta = router.finish()
    content.append(delta.get("content", ""))
    calls += delta.get("tool_calls", [])
    return "".join(content), [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls]


SPLITS = pytest.mark.parametrize("split", ["whole", "chars"])


@SPLITS
def test_two_calls_get_their_own_indices(split):
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n<tool_call>{"name": "g"}</tool_call>'
    content, calls = route(text, split)
    assert content.strip() == ""
    assert calls == [(0, "f", '{"a": 1}'), (1, "g", "{}")]


@SPLITS
def test_call_open_when_generation_ends_is_parsed(split):
    assert route('<tool_call>{"name": "f"}', split) == ("", [(0, "f", "{}")])


@SPLITS
def test_call_cut_short_comes_back_as_text(split):
    text = 'Sure. <tool_call>{"name": "f", "argu'
    assert route(text, split) == (text, [])


@SPLITS
@pytest.mark.parametrize("text", ["Sure. <tool_call>", "<tool_call>\n"])
def test_call_cut_right_after_its_opening_marker_keeps_the_marker(split, text):
    """max_tokens can end a reply on the marker itself (a model that opens call after call): its text is kept."""
    assert route(text, split) == (text, [])


@SPLITS
@pytest.mark.parametrize("error", [ValueError, IndexError, RuntimeError])
def test_parser_that_raises_gives_the_text_back(split, error):
    def parser(text, tools):
        raise error("cannot parse")

    text = 'A <tool_call>{"name": "f"}</tool_call> B'
    assert route(text, split, parser) == (text, [])


@SPLITS
def test_a_good_call_after_a_bad_one_keeps_index_zero(split):
    text = '<tool_call>not json</tool_call><tool_call>{"name": "g"}</tool_call>'
    assert route(text, split) == ("<tool_call>not json</tool_call>", [(0, "g", "{}")])


@pytest.mark.parametrize("stops, pieces, matched", [
    (["world", "lo"], ["Hel", "lo world"], "lo"),          # the earliest match in the text wins, not the list order
    (["zzz", "world"], ["Hello wor", "ld!"], "world"),     # a match across pieces
    (["zzz"], ["Hello"], None),
])
def test_stop_filter_names_the_stop_that_matched(stops, pieces, matched):
    stop_filter = StopFilter(stops)
    for piece in pieces:
        stop_filter.push(piece)
    assert stop_filter.matched == matched


def test_stop_matched_on_tokens_is_named_from_the_held_text():
    stop_filter = StopFilter(["STOP", "END"])
    assert stop_filter.push("Hello EN") == ("Hello ", False)
    stop_filter.matched_on_tokens()
    assert stop_filter.matched == "END" and stop_filter.flush() == ""


# ---- model-family quirks --------------------------------------------------------------------------------------

WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def drive(router: OutputRouter, text: str, split: str) -> tuple[str, str, list]:
    deltas = [router.feed(piece) for piece in ([text] if split == "whole" else list(text))] + [router.finish()]
    joined = lambda field: "".join(d.get(field, "") for d in deltas)  # noqa: E731
    calls = [(c["index"], c["function"]["name"], c["function"]["arguments"]) for d in deltas
             for c in d.get("tool_calls", [])]
    return joined("reasoning"), joined("content"), calls


@SPLITS
@pytest.mark.parametrize("text, expected", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', ("", [(0, "get_weather", '{"city": "Paris"}')])),
    ('  {"name": "get_weather", "parameters": {}}', ("", [(0, "get_weather", "{}")])),
    ('{"name": "get_tide", "parameters": {}}', ('{"name": "get_tide", "parameters": {}}', [])),  # not a tool
    ('{"name": "get_weather", "parameters": {"city": "Par', ('{"name": "get_weather", "parameters": {"city": "Par', [])),
    ('{"a": 1}', ('{"a": 1}', [])),
    ('Sunny {"name": "get_weather", "parameters": {}}', ('Sunny {"name": "get_weather", "parameters": {}}', [])),
])
def test_llama3_bare_json_calls(text, expected, split):
    """Llama 3.2 answers a tool prompt with bare JSON: a whole call to a known tool is a tool call, the rest text."""
    router = OutputRouter(None, "normal", None, WEATHER, bare_json_calls=True)
    _, content, calls = drive(router, text, split)
    assert (content, calls) == expected
    assert router.made_tool_call == bool(expected[1])


@SPLITS
@pytest.mark.parametrize("text, reasoning, content", [
    ("Hm.</think>\n\nHello", "Hm.", "Hello"),
    ("Hm.</think>\n\n", "Hm.", ""),
    ("Hm.</think>Hello\n\nworld", "Hm.", "Hello\n\nworld"),   # only the blank lines right after </think> go
])
def test_blank_lines_after_think_are_not_content(text, reasoning, content, split):
    from mlx_lm.generate import TextStateMachine

    machine = TextStateMachine({"normal": [("<think>", "reasoning")], "reasoning": [("</think>", "normal")]})
    assert drive(OutputRouter(machine, "reasoning"), text, split)[:2] == (reasoning, content)


HARMONY = ("<|channel|>analysis<|message|>User wants weather.<|end|><|start|>assistant<|channel|>commentary "
           'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>')


@SPLITS
@pytest.mark.parametrize("text, expected", [
    ("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Hello world!",
     ("Think.", "Hello world!", [])),
    (HARMONY, ("User wants weather.", "", [(0, "get_weather", '{"city": "Paris"}')])),
    ('<|channel|>analysis<|message|>a<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary json'
     '<|message|>{"city": "Rome"}<|call|>', ("a", "", [(0, "get_weather", '{"city": "Rome"}')])),
    ("<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>final<|message|>Done",
     ("", "Checking.Done", [])),     # a preamble to the user is content
    ('<|channel|>commentary to=functions.get_weather<|message|>{"city": "Par',   # cut by max_tokens: text back
     ("", '{"city": "Par', [])),
    ("Plain text, no channels", ("", "Plain text, no channels", [])),
])
def test_harmony(text, expected, split):
    from mlxk.workers.inference.textout import HarmonyRouter

    router = HarmonyRouter([{"type": "function", "function": {"name": "get_weather"}}])
    assert drive(router, text, split) == expected
    assert router.made_tool_call == bool(expected[2])
