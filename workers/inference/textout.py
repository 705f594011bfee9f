"""From detokenized text to protocol deltas: stop strings, reasoning and tool calls.

Pure Python (no MLX), one instance per request row, fed on the MLX thread after each token.
Order matters: stop strings are cut from the raw text first, so a stop string never leaks, whatever
state the text is in; the remaining text then goes through mlx-lm's TextStateMachine, which routes
think blocks to `reasoning` and tool-call markup to the tool parser. Both stages hold back only text
that could still be the start of a stop string or a marker, so safe text goes out at once (TTFT).
A tool call that does not parse (cut off by max_tokens, malformed, or a parser that raises) is never
dropped: its text, markup included, goes out as content, so the client sees what the model wrote.
Llama 3 calls tools with bare JSON (`{"name": ..., "parameters": {...}}`, no markers): with `bare_json_calls`, a
reply that starts with "{" is held to its end and becomes a tool call when it is exactly such a call to one of the
tools, otherwise it goes out as content; any other reply streams as usual. The blank lines a model writes after
`</think>` (Qwen3: "</think>\n\n") are not content: content after a think block starts at its first other character.
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any, Callable

log = logging.getLogger("mlxk.inference.textout")


class StopFilter:
    """Cut the output at the first request stop string; hold back a possible partial match."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the text (Anthropic reports it)

    def push(self, text: str) -> tuple[str, bool]:
        """Return (safe text, matched). After a match the text after the stop string is dropped."""
        if not self.stops:
            return text, False
        buf = self._held + text
        first = -1
        for stop in self.stops:
            i = buf.find(stop)
            if i >= 0 and (first < 0 or i < first):
                first, self.matched = i, stop
        if first >= 0:
            self._held = ""
            return buf[:first], True
        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def _partial_suffix(self, buf: str) -> int:
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def matched_on_tokens(self) -> None:
        """The generator stopped on a stop string's tokens before its text showed: name the stop the held text
        begins (else the only or first one)."""
        self.matched = next((s for s in self.stops if self._held and s.startswith(self._held)),
                            self.stops[0] if self.stops else None)
        self._held = ""

    def flush(self) -> str:
        """Text held back that turned out not to be a stop string (generation ended otherwise)."""
        held, self._held = self._held, ""
        return held


class OutputRouter:
    """Split safe text into content / reasoning / tool calls, as protocol delta fields."""

    def __init__(self, text_sm, initial_state: str = "normal", tool_parser: Callable | None = None,
                 tools: list | None = None, tool_markers: tuple[str | None, str | None] = (None, None),
                 bare_json_calls: bool = False):
        from mlx_lm.generate import TextStateMachine  # lazy: the api process imports this module, never MLX

        self._tsm = TextStateMachine
        self._sm_state = text_sm.make_state(initial_state) if text_sm is not None else None
        self._prev = initial_state
        self._tool_parser = tool_parser
        self._tools = tools
        self._tool_markers = (tool_markers[0] or "", tool_markers[1] or "")
        self._tool_text = ""
        self._tool_index = 0
        self.made_tool_call = False
        self._after_think = False
        self._bare_pending = bool(bare_json_calls and tools)   # still undecided: may be a bare JSON call
        self._bare_held = ""

    def feed(self, text: str) -> dict:
        if not text:
            return {}
        if self._sm_state is None:
            return self._route([("normal", text)])
        self._sm_state, segments = self._tsm.split(self._sm_state, text)
        return self._route(segments)

    def finish(self) -> dict:
        """Flush a held partial marker as text and parse an unterminated tool call."""
        delta: dict[str, Any] = {}
        if self._sm_state is not None:
            self._sm_state, held, state = self._tsm.flush(self._sm_state)
            delta = self._route([(state, held)])
            if self._prev == "tool":
                self._end_tool(delta, closed=False)
        if self._bare_held:
            self._end_bare_call(delta)
        return delta

    def _route(self, segments) -> dict:
        delta: dict[str, Any] = {}
        for state, text in segments:
            if state != "tool" and self._prev == "tool":
                self._end_tool(delta, closed=True)
            if state == "tool":
                self._tool_text += text
            elif state == "reasoning":
                self._append(delta, "reasoning", text)
            elif state is not None:
                if self._prev == "reasoning":
                    self._after_think = True
                self._content(delta, text)
            if state is not None:
                self._prev = state
        return delta

    def _content(self, delta: dict, text: str) -> None:
        if self._after_think:
            text = text.lstrip("\n")
            self._after_think = not text
        if self._bare_pending:
            self._bare_held += text
            head = self._bare_held.lstrip()
            if not head or head.startswith("{"):
                return  # nothing yet, or maybe a bare JSON call: decide at the end
            text, self._bare_held, self._bare_pending = self._bare_held, "", False
        self._append(delta, "content", text)

    def _end_bare_call(self, delta: dict) -> None:
        text, self._bare_held = self._bare_held, ""
        try:
            call = json.loads(text)
        except json.JSONDecodeError:
            call = None
        names = {(t.get("function") or {}).get("name") for t in self._tools or () if isinstance(t, dict)}
        if (isinstance(call, dict) and set(call) == {"name", "parameters"} and call["name"] in names
                and isinstance(call["parameters"], dict)):
            delta.setdefault("tool_calls", []).append(self._call(call["name"], call["parameters"], None))
            self.made_tool_call = True
            return
        self._append(delta, "content", text)

    def _call(self, name: str, arguments: Any, call_id: str | None) -> dict:
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call = {"index": self._tool_index, "id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": arguments}}
        self._tool_index += 1
        return call

    @staticmethod
    def _append(delta: dict, field: str, text: str) -> None:
        if text:
            delta[field] = delta.get(field, "") + text

    def _end_tool(self, delta: dict, *, closed: bool) -> None:
        """The call's text is complete (closed) or generation ended inside it: its calls, else its text as content."""
        text, self._tool_text = self._tool_text, ""
        if not text.strip():
            if not closed:   # cut right after the opening marker: the client still sees what the model wrote
                self._append(delta, "content", self._tool_markers[0] + text)
            return
        calls = self._parse_tools(text)
        if calls:
            delta.setdefault("tool_calls", []).extend(calls)
            return
        start, end = self._tool_markers
        self._append(delta, "content", start + text + (end if closed else ""))

    def _parse_tools(self, text: str) -> list:
        if self._tool_parser is None:
            return []
        try:
            parsed = self._tool_parser(text, self._tools)
        except Exception as e:  # noqa: BLE001 - model-family parsers raise anything on a cut or malformed call
            log.warning("could not parse a tool call (%s: %s); returning its text", type(e).__name__, e)
            return []
        calls = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(call, dict) or "name" not in call:
                continue
            calls.append(self._call(call["name"], call.get("arguments", {}), call.get("id")))
        if calls:
            self.made_tool_call = True
        return calls


HARMONY_MARKERS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")


def is_harmony(tokenizer) -> bool:
    """gpt-oss's harmony format: every reply message is `<|channel|>NAME[ to=RECIPIENT]<|message|>BODY<|end|>`."""
    return "<|channel|>" in str(getattr(tokenizer, "chat_template", "") or "")


class HarmonyRouter:
    """OutputRouter's counterpart for gpt-oss (harmony): analysis -> reasoning, final -> content, a commentary
    message addressed `to=functions.NAME` -> a tool call with its body as arguments, any other commentary (a
    preamble for the user) -> content. Fed the detokenized text, markers included; headers never reach the client.

    Why not the openai-harmony package: it parses token ids with its own o200k encoding, which it downloads from
    the internet on first use (an offline server cannot), and the engine already has the text."""

    def __init__(self, tools: list | None = None):
        self._tools = tools
        self._buf = ""
        self._in_body = False
        self._channel = ""
        self._recipient = ""
        self._call_text = ""
        self._tool_index = 0
        self.made_tool_call = False

    def feed(self, text: str) -> dict:
        delta: dict[str, Any] = {}
        self._buf += text
        while self._buf:
            if not self._in_body:
                i = self._buf.find("<|message|>")
                if i < 0:
                    return delta
                self._open(self._buf[:i])
                self._buf = self._buf[i + len("<|message|>"):]
                continue
            found = [(self._buf.find(m), m) for m in HARMONY_MARKERS if m in self._buf]
            if found:
                j, marker = min(found)
                self._body(delta, self._buf[:j])
                self._close(delta)
                self._buf = self._buf[j + len(marker):]
                continue
            keep = self._partial_marker()
            self._body(delta, self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return delta
        return delta

    def finish(self) -> dict:
        delta: dict[str, Any] = {}
        if self._in_body:
            self._body(delta, self._buf)
            self._close(delta)
        elif self._buf.strip() and "<|channel|>" not in self._buf:
            OutputRouter._append(delta, "content", self._buf)  # a reply that never used the format: keep its text
        self._buf = ""
        return delta

    def _partial_marker(self) -> int:
        i = self._buf.rfind("<")
        if i >= 0 and any(m.startswith(self._buf[i:]) for m in HARMONY_MARKERS):
            return len(self._buf) - i
        return 0

    def _open(self, header: str) -> None:
        channel = re.search(r"<\|channel\|>\s*(\w+)", header)
        recipient = re.search(r"to=([^\s<]+)", header)
        self._channel = channel.group(1) if channel else "final"
        self._recipient = recipient.group(1) if recipient else ""
        self._in_body = True
        self._call_text = ""

    def _body(self, delta: dict, text: str) -> None:
        if not text:
            return
        if self._recipient:
            self._call_text += text
        elif self._channel == "analysis":
            OutputRouter._append(delta, "reasoning", text)
        else:
            OutputRouter._append(delta, "content", text)

    def _close(self, delta: dict) -> None:
        self._in_body = False
        if not self._recipient:
            return
        name = self._recipient.split(".", 1)[1] if self._recipient.startswith("functions.") else self._recipient
        text, self._call_text = self._call_text.strip(), ""
        try:
            arguments = json.loads(text) if text else {}
        except json.JSONDecodeError:
            OutputRouter._append(delta, "content", text)  # not a call we can hand over: the client sees the text
            return
        delta.setdefault("tool_calls", []).append({
            "index": self._tool_index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
        self._tool_index += 1
        self.made_tool_call = True
