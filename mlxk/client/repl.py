"""What `mlxk run`, `ps` and `stop` do, as a client of the server: one-shot answers, the interactive chat, status.

Model names are resolved locally first (the same index and rules the server uses), so a typo or a model that
cannot run fails at once with the index's reason, without starting a server.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
from prompt_toolkit import PromptSession
from prompt_toolkit.application.current import get_app
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import FileHistory

from mlxk.config import settings as load_settings
from mlxk.output import Output, human_duration, human_size, say, table
from mlxk import catalog
from mlxk.errors import MlxkError
from mlxk.client.connection import Client, ensure_server, find_server

HELP = """Commands:
  /clear         forget the conversation
  /system TEXT   set the system prompt (and clear)
  /bye           leave (Ctrl-D too)
  \"\"\"            start or end a multi-line message
Arrow keys edit the line; up/down (and Ctrl-R) recall what you typed, also in earlier chats.
Ctrl-C stops the current reply (or clears the line).
When the conversation outgrows the model's context, the oldest turns are dropped."""


def _model_name(name: str) -> str:
    """The repo id (with @revision if one was asked for) after local resolution; raises the index's reason.

    A workspace folder (`./dir`, `/abs/dir`, `~/dir`, as mlx-knife runs one) is checked and registered in state.db
    here, by the user's own command line, and named to the server by its id (`workspace:<16 hex>`): the server never
    takes a folder path from a request."""
    from mlxk import names

    if names.is_workspace_path(name):
        return catalog.register_workspace(name, load_settings())
    servable = catalog.find(name, load_settings())
    return f"{servable.repo_id}@{servable.revision}" if "@" in name else servable.repo_id


def _messages(text: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def _body(model: str, messages: list[dict], params: dict) -> dict:
    return {"model": model, "messages": messages, **{k: v for k, v in params.items() if v is not None}}


def _client() -> Client:
    return Client(ensure_server(load_settings()))


def answer(model: str, text: str, *, system: str | None, params: dict) -> dict:
    """One non-streamed answer, as the data of the --json envelope: mlx-knife's `model, prompt, response,
    tokens_generated, generation_time_s`, then mlxk's own (`content` is `response`, as the OpenAI API names it)."""
    name = _model_name(model)
    started = time.monotonic()
    with _client() as client:
        reply = client.post("/v1/chat/completions", _body(name, _messages(text, system), params))
    took = round(time.monotonic() - started, 3)
    choice = reply["choices"][0]
    message = choice.get("message") or {}
    usage = reply.get("usage") or {}
    workspace = {"workspace_id": name} if catalog.is_workspace_id(name) else {}
    return {"model": model if workspace else reply.get("model"), "prompt": text,
            "response": message.get("content") or "",
            "tokens_generated": usage.get("completion_tokens"), "generation_time_s": took,
            "content": message.get("content") or "",
            "reasoning_content": message.get("reasoning_content"), "tool_calls": message.get("tool_calls"),
            "finish_reason": choice.get("finish_reason"), "usage": reply.get("usage"), **workspace}


def _stream(client: Client, body: dict) -> tuple[str, str | None]:
    """Print the reply as it arrives (thinking dimmed on stderr); returns (text, finish_reason)."""
    parts, finish = [], None
    for chunk in client.chat_stream(body):
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                click.secho(delta["reasoning_content"], err=True, dim=True, nl=False)
            if delta.get("content"):
                parts.append(delta["content"])
                sys.stdout.write(delta["content"])
                sys.stdout.flush()
            finish = choice.get("finish_reason") or finish
    return "".join(parts), finish


def stream_answer(model: str, text: str, *, system: str | None, params: dict) -> Output:
    name = _model_name(model)
    with _client() as client:
        content, finish = _stream(client, _body(name, _messages(text, system), params))
    sys.stdout.write("\n")
    if finish == "length":
        say("[stopped at the token limit; raise it with --max-tokens]")
    return Output({"model": model if catalog.is_workspace_id(name) else name, "content": content,
                   "finish_reason": finish})


def open_block(text: str) -> bool:
    """Is this a multi-line message still being typed? One that starts with three double quotes goes on, Enter
    adding lines, until a line ends with three double quotes."""
    stripped = text.lstrip()
    return stripped.startswith('"""') and not stripped[3:].rstrip().endswith('"""')


def message_text(typed: str) -> str:
    """The message a typed entry stands for: a triple-quoted block without its quotes, anything else as typed."""
    stripped = typed.strip()
    if not stripped.startswith('"""'):
        return typed
    body = stripped[3:].rstrip()
    return (body[:-3] if body.endswith('"""') else body).strip("\n")


class LineReader:
    """The chat's input line: prompt_toolkit's line editing (arrows, Home/End, Ctrl-R search), its history kept in
    MLXK_HOME across sessions, Enter inside an open triple-quoted block adding a line. Ctrl-C raises
    KeyboardInterrupt and Ctrl-D on an empty line EOFError, as input() does. Without a terminal on both ends
    (a pipe) it is plain input()."""

    def __init__(self, history_path: Path):
        self.session = None
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            return

        history_path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(history_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # private: what you typed
        self.session = PromptSession(
            history=FileHistory(str(history_path)),
            multiline=Condition(lambda: open_block(get_app().current_buffer.text)),
            prompt_continuation=lambda width, line_number, wrap_count: "... ",
        )

    def read(self) -> str:
        if self.session is not None:
            return self.session.prompt(">>> ")
        typed = input(">>> ")
        while open_block(typed):
            typed += "\n" + input("... ")
        return typed


def _send(client: Client, name: str, system: str | None, history: list[dict], params: dict,
          notice: dict) -> str | None:
    """Stream the answer to the conversation so far. When it no longer fits the model's context, the oldest turns
    are dropped from `history` (said once per chat) until it fits; None when even the last message alone does not
    fit (it is dropped too, with the server's message)."""
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            reply, _ = _stream(client, _body(name, messages, params))
            return reply
        except MlxkError as error:
            if error.type != "context_length_exceeded":
                raise
            if len(history) <= 1:
                history.pop()
                say(f"[{error.message} Shorten the message.]")
                return None
            del history[:2]   # the oldest user message and its answer
            if not notice.get("said"):
                notice["said"] = True
                say(f"[The conversation no longer fits {name}'s context: the oldest turns are dropped from now on. "
                    "/clear starts afresh.]")


def interactive(model: str, *, system: str | None, params: dict) -> Output:
    name = _model_name(model)
    reader = LineReader(load_settings().chat_history)
    say(f"Chatting with {model if catalog.is_workspace_id(name) else name}. /? for help, /bye or Ctrl-D to leave.")
    history: list[dict] = []
    notice: dict = {}
    with _client() as client:
        while True:
            try:
                typed = reader.read()
            except EOFError:
                break
            except KeyboardInterrupt:
                say("Use Ctrl-D or /bye to leave.")
                continue
            text = message_text(typed)
            command = text.strip()
            if command in ("/bye", "/exit", "/quit"):
                break
            if command in ("/?", "/help"):
                say(HELP)
                continue
            if command == "/clear":
                history = []
                say("Cleared the conversation.")
                continue
            if command.startswith("/system"):
                system = command[len("/system"):].strip() or None
                history = []
                say(f"System prompt {'set' if system else 'removed'}; conversation cleared.")
                continue
            if not command:
                continue
            history.append({"role": "user", "content": text})
            try:
                reply = _send(client, name, system, history, params, notice)
            except KeyboardInterrupt:
                reply = None
                history.pop()  # the question stays unanswered: do not send half a turn next time
                say("\n[reply stopped]")
            sys.stdout.write("\n")
            if reply is not None:
                history.append({"role": "assistant", "content": reply})
    return Output({"model": name, "turns": len(history) // 2})


# ---------------------------------------------------------------- embed


def embed(model: str, texts: list[str]) -> Output:
    """One vector per text from the embedding model (resolved locally first, like `run`), one JSON array a line."""
    servable = catalog.find(model, load_settings(), catalog.EMBEDDING_TYPES)
    with _client() as client:
        reply = client.post("/v1/embeddings", {"model": servable.repo_id, "input": texts})
    vectors = [item["embedding"] for item in reply["data"]]
    data = {"model": reply["model"], "embeddings": vectors, "dimensions": len(vectors[0]), "usage": reply["usage"]}
    return Output(data, lambda: "\n".join(json.dumps(v) for v in vectors))


# ---------------------------------------------------------------- ps / stop


def _until(model: dict) -> str:
    if model.get("expires_in_s") is not None:
        return human_duration(model["expires_in_s"])
    return "running" if model.get("running") else "forever"  # idle with no expiry: keep_alive -1


def _ps_text(data: dict) -> str:
    from mlxk.index import HASH_DISPLAY  # here, not at the top: `ps --json` never pays for the index's import

    if data.get("server") is None:
        return "No server is running."
    rows = [[m["name"], (m.get("revision") or "")[:HASH_DISPLAY], human_size(m.get("memory_bytes")),
             m.get("running", 0), _until(m)] for m in data["models"]]
    lines = [table(rows, ["NAME", "HASH", "MEMORY", "RUNNING", "UNTIL"], right={2, 3})] if rows else \
        ["No model is loaded."]
    lines.append(f"requests running: {data.get('running', 0)}, waiting: {data.get('waiting', 0)} ({data['server']})")
    if prefix := data.get("prefix_cache"):
        lines.append(_prefix_cache_line(prefix))
    return "\n".join(lines)


def _prefix_cache_line(prefix: dict) -> str:
    """`prefix cache on disk: 12.3 MB of 10.0 GB (42 blocks), hit ratio 75% (3/4), 1,792 tokens restored`."""
    if not prefix.get("enabled"):
        return "prefix cache on disk: off"
    ratio = prefix.get("hit_ratio")
    hits = "no lookups yet" if ratio is None else \
        f"hit ratio {ratio:.0%} ({prefix.get('hits', 0)}/{prefix.get('lookups', 0)})"
    return (f"prefix cache on disk: {human_size(prefix.get('bytes'))} of {human_size(prefix.get('max_bytes'))} "
            f"({prefix.get('entries', 0)} blocks), {hits}, {prefix.get('restored_tokens', 0):,} tokens restored")


_PS_FIELDS = ("name", "revision", "key", "path", "memory_bytes", "loaded_at", "last_used", "keep_alive_s",
              "expires_at", "expires_in_s", "running")


def _ps_model(model: dict) -> dict:
    """mlxk's view of a loaded model from /api/ps, whose Ollama fields (`name` tagged, `expires_at` RFC 3339) come
    first: `name` is the repo id and `expires_at` unix seconds (null: never), as `mlxk ps --json` always said."""
    mine = {**model, "name": model.get("repo_id", model.get("name")), "expires_at": model.get("expires_ts")}
    return {key: mine.get(key) for key in _PS_FIELDS}


def ps() -> Output:
    endpoint = find_server(load_settings())
    if endpoint is None:
        data = {"server": None, "models": [], "running": 0, "waiting": 0}
        return Output(data, _ps_text(data))
    with Client(endpoint, timeout=30) as client:
        reply = client.get("/api/ps")
    data = {"server": endpoint.url, **reply, "models": [_ps_model(m) for m in reply.get("models") or []]}
    return Output(data, lambda: _ps_text(data))


def stop(model: str | None) -> Output:
    endpoint = find_server(load_settings())
    if endpoint is None:
        return Output({"server": None, "unloaded": []}, "No server is running; nothing is loaded.")
    with Client(endpoint, timeout=30) as client:
        reply = client.post("/api/stop", {"model": model})
    unloaded = reply.get("models") or []
    text = f"Unloaded {', '.join(unloaded)}." if unloaded else "Nothing was loaded."
    return Output({"server": endpoint.url, "unloaded": unloaded}, text)
