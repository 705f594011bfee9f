"""What `mlxk run`, `ps` and `stop` do, as a client of the server: one-shot answers, the interactive chat, status.

Model names are resolved locally first (the same index and rules the server uses), so a typo or a model that
cannot run fails at once with the index's reason, without starting a server.
"""
from __future__ import annotations

import sys

import click

from mlxk.config import settings as load_settings
from mlxk.output import Output, human_duration, human_size, say, table
from mlxk.server import catalog
from mlxk.server.client import Client, ensure_server, find_server

HELP = """Commands:
  /clear         forget the conversation
  /system TEXT   set the system prompt (and clear)
  /bye           leave (Ctrl-D too)
  \"\"\"            start or end a multi-line message
Ctrl-C stops the current reply."""


def _model_name(name: str) -> str:
    """The repo id (with @revision if one was asked for) after local resolution; raises the index's reason."""
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
    import time

    name = _model_name(model)
    started = time.monotonic()
    with _client() as client:
        reply = client.post("/v1/chat/completions", _body(name, _messages(text, system), params))
    took = round(time.monotonic() - started, 3)
    choice = reply["choices"][0]
    message = choice.get("message") or {}
    usage = reply.get("usage") or {}
    return {"model": reply.get("model"), "prompt": text, "response": message.get("content") or "",
            "tokens_generated": usage.get("completion_tokens"), "generation_time_s": took,
            "content": message.get("content") or "",
            "reasoning_content": message.get("reasoning_content"), "tool_calls": message.get("tool_calls"),
            "finish_reason": choice.get("finish_reason"), "usage": reply.get("usage")}


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
    return Output({"model": name, "content": content, "finish_reason": finish})


def _read_message() -> str:
    """One user message; a line of three double quotes opens and closes a multi-line block."""
    line = input(">>> ")
    if line.strip() != '"""':
        if line.startswith('"""'):
            rest = line[3:]
            lines = [rest] if rest else []
            while True:
                more = input("... ")
                if more.rstrip().endswith('"""'):
                    lines.append(more.rstrip()[:-3])
                    return "\n".join(lines)
                lines.append(more)
        return line
    lines = []
    while True:
        more = input("... ")
        if more.strip() == '"""':
            return "\n".join(lines)
        lines.append(more)


def interactive(model: str, *, system: str | None, params: dict) -> Output:
    name = _model_name(model)
    say(f"Chatting with {name}. /? for help, /bye or Ctrl-D to leave.")
    history: list[dict] = []
    with _client() as client:
        while True:
            try:
                text = _read_message()
            except EOFError:
                break
            except KeyboardInterrupt:
                say("\nUse Ctrl-D or /bye to leave.")
                continue
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
            messages = ([{"role": "system", "content": system}] if system else []) + history
            try:
                reply, _ = _stream(client, _body(name, messages, params))
            except KeyboardInterrupt:
                reply = None
                say("\n[reply stopped]")
            sys.stdout.write("\n")
            if reply is None:
                history.pop()  # the question stays unanswered: do not send half a turn next time
            else:
                history.append({"role": "assistant", "content": reply})
    return Output({"model": name, "turns": len(history) // 2})


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
    return "\n".join(lines)


def ps() -> Output:
    endpoint = find_server(load_settings())
    if endpoint is None:
        data = {"server": None, "models": [], "running": 0, "waiting": 0}
        return Output(data, _ps_text(data))
    with Client(endpoint, timeout=30) as client:
        reply = client.get("/api/ps")
    data = {"server": endpoint.url, **reply}
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
