"""`mlxk run MODEL` as a person uses it: in a pseudo-terminal (pexpect), against a real `mlxk serve` with a tiny
scripted model. Arrow keys edit the line (never `^[[A` in the message), history survives the session in MLXK_HOME,
triple-quoted blocks span lines, Ctrl-C clears the line or stops the reply, and a conversation that outgrows the
context drops its oldest turns (said once) instead of failing every message.

pexpect is not a terminal emulator: it cannot answer prompt_toolkit's cursor-position request, so the chat runs
with PROMPT_TOOLKIT_NO_CPR=1 (prompt_toolkit's own setting for such terminals), as it would in one that cannot.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from tests.fixtures.cli import MLXK  # noqa: E402
from tests.fixtures.server import SCRIPTED_ID, SCRIPTED_REPLY, spawn_server  # noqa: E402

LEFT, UP, CTRL_C, CTRL_D = "\x1b[D", "\x1b[A", "\x03", "\x04"
# Small enough that a few turns fill it, large enough for one short turn (the tiny tokenizer: ~1 token a char).
MAX_PROMPT_TOKENS = 160


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    srv = spawn_server(tmp_path_factory.mktemp("chat"), models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}},
                       env={"MLXK_MAX_PROMPT_TOKENS": str(MAX_PROMPT_TOKENS)})
    yield srv
    srv.stop()


def chat(server, *args: str):
    env = {**server.env, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm"}
    child = pexpect.spawn(MLXK[0], [*MLXK[1:], "run", SCRIPTED_ID, *args], env=env, encoding="utf-8",
                          dimensions=(40, 200), timeout=60)
    child.expect_exact(">>>")
    return child


def say(child, keys: str, expect: str) -> str:
    """Type keys (Enter included), wait for `expect`, return what the terminal showed up to it."""
    child.send(keys)
    child.expect_exact(expect)
    return child.before


def bye(child) -> None:
    child.send("/bye\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def history_entries(server) -> list[str]:
    """prompt_toolkit's FileHistory: each entry is its lines prefixed by '+'."""
    entries, current = [], None
    for line in (Path(server.env["MLXK_HOME"]) / "chat_history").read_text().splitlines():
        if line.startswith("+"):
            current = line[1:] if current is None else current + "\n" + line[1:]
        elif current is not None:
            entries.append(current)
            current = None
    if current is not None:
        entries.append(current)
    return entries


def test_arrow_keys_edit_the_line_and_history_outlives_the_session(chat_server):
    child = chat(chat_server)
    # "/cear", three steps left, "l": the command only works if the arrows moved the cursor
    shown = say(child, "/cear" + LEFT * 3 + "l\r", "Cleared the conversation.")
    shown += say(child, "hi\r", SCRIPTED_REPLY)
    shown += say(child, UP + UP + "\r", "Cleared the conversation.")   # up, up: "/clear" again
    assert "^[" not in shown
    bye(child)

    path = Path(chat_server.env["MLXK_HOME"]) / "chat_history"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert history_entries(chat_server)[-4:] == ["/clear", "hi", "/clear", "/bye"]

    child = chat(chat_server)   # a new session: up recalls the last one's lines
    say(child, UP + UP + "\r", "Cleared the conversation.")
    bye(child)


def test_triple_quotes_span_lines_and_ctrl_c_clears_the_line(chat_server):
    child = chat(chat_server)
    say(child, '"""\rline one\rline two\r"""\r', SCRIPTED_REPLY)
    assert '"""\nline one\nline two\n"""' in history_entries(chat_server)
    say(child, "half a thought" + CTRL_C, "Use Ctrl-D or /bye to leave.")
    child.expect_exact(">>>")
    say(child, "/clear\r", "Cleared the conversation.")
    child.send(CTRL_D)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_conversation_that_outgrows_the_context_drops_its_oldest_turns_once(chat_server):
    child = chat(chat_server)
    shown = ""
    for turn in range(8):
        shown += say(child, f"message number {turn} with a few more words in it\r", SCRIPTED_REPLY)
    child.expect_exact(">>>")
    shown += child.before
    assert shown.count("no longer fits") == 1, shown
    assert "maximum context length" not in shown
    # a single message longer than the context: the server's reason, and the chat goes on
    say(child, "x" * 400 + "\r", "maximum context length")
    say(child, "short again\r", SCRIPTED_REPLY)
    bye(child)


def test_json_without_a_prompt_in_a_terminal_is_a_usage_error(chat_server):
    import json

    child = pexpect.spawn(MLXK[0], [*MLXK[1:], "run", SCRIPTED_ID, "--json"], env=chat_server.env, encoding="utf-8",
                          timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    doc = json.loads(child.before.replace("\r\n", "\n"))
    assert child.exitstatus == 2 and doc["error"]["code"] == "usage" and "needs a PROMPT" in doc["error"]["message"]
