"""`mlxk serve`, `run`, `ps`, `stop`: the server in the foreground, and the commands that are its clients."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from mlxk.commands import log_options
from mlxk.config import parse_duration
from mlxk.output import Output, json_command
from mlxk.output import json_mode


class _Duration(click.ParamType):
    """Seconds or an ollama-style duration ("10m", "1h30m"); negative = forever (config.parse_duration)."""
    name = "duration"

    def convert(self, value, param, ctx):
        try:
            return parse_duration(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


@click.command("serve")
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1; others need an API key).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default 8000, MLXK_PORT).")
@click.option("--api-key", default=None,
              help="Require 'Authorization: Bearer KEY'. Prefer MLXK_API_KEY or --api-key-file: the flag is wiped "
                   "from the process list at start, but other users may see it until then.")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Read the API key from this file (its first line).")
@click.option("--max-loaded", type=click.IntRange(min=1), default=None, help="Models kept loaded at once.")
@click.option("--keep-alive", type=_Duration(), default=None,
              help="How long an idle model stays loaded: seconds or a duration (10m, 1h30m); -1 = forever.")
@click.option("--idle-exit", type=click.FloatRange(min=1), default=None, hidden=True,
              help="Exit after this many seconds without a request.")
@log_options
@json_command
def serve_command(host, port, api_key, api_key_file, max_loaded, keep_alive, idle_exit, log_level, log_json):
    """Serve the OpenAI-compatible API in the foreground."""
    from mlxk.server.deps import ServerConfig  # lazy: keeps `mlxk --help` light
    from mlxk.server.main import hide_from_process_list, read_key_file, run_server  # lazy: keeps `mlxk --help` light

    if api_key is not None and api_key_file is not None:
        raise click.UsageError("give --api-key or --api-key-file, not both")
    if api_key is not None:
        hide_from_process_list(api_key)  # at once: the key is in /proc/<pid>/cmdline until this line
    if api_key_file is not None:
        api_key = read_key_file(api_key_file)
    config = ServerConfig.from_settings(host=host, port=port, api_key=api_key, max_loaded=max_loaded,
                                        keep_alive_s=keep_alive, idle_exit_s=idle_exit)
    stopped_by = run_server(config, log_level=log_level, log_json=log_json)
    return Output({"host": config.host, "port": config.port, "url": f"http://{config.host}:{config.port}",
                   "stopped": True, "signal": stopped_by})


@click.command("run")
@click.argument("model")
@click.argument("words", nargs=-1)
@click.option("--prompt", "prompt_option", default=None, help="The prompt (the same as PROMPT words).")
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Most tokens to generate.")
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="Sampling temperature.")
@json_command
def run_command(model, words, prompt_option, system, max_tokens, temperature):
    """Chat with MODEL, or answer PROMPT once (stdin is appended); starts a server if none is up."""
    from mlxk.client import repl  # lazy: keeps `mlxk --help` light

    if words and prompt_option is not None:
        raise click.UsageError("give the prompt once: as words after MODEL or with --prompt, not both.")
    prompt = prompt_option if prompt_option is not None else (" ".join(words) or None)  # unquoted words: one prompt
    params = {"max_tokens": max_tokens, "temperature": temperature}
    stdin_text = None if sys.stdin.isatty() else sys.stdin.read()
    if prompt is None and stdin_text is None:
        if json_mode():
            raise click.UsageError("--json needs a PROMPT (or text on stdin): the chat is for a terminal")
        return repl.interactive(model, system=system, params=params)
    text = "\n\n".join(part for part in (prompt, stdin_text) if part)
    if json_mode():
        return Output(repl.answer(model, text, system=system, params=params))  # mlx-knife's run fields included
    return repl.stream_answer(model, text, system=system, params=params)


@click.command("embed")
@click.argument("model")
@click.argument("texts", nargs=-1, required=True)
@json_command
def embed_command(model, texts):
    """Print the embedding vector of each TEXT (one JSON array a line) from an embedding MODEL."""
    from mlxk.client import repl  # lazy: keeps `mlxk --help` light

    return repl.embed(model, list(texts))


@click.command("ps")
@json_command
def ps_command():
    """Show loaded models, their memory and keep-alive, and queued requests."""
    from mlxk.client import repl  # lazy: keeps `mlxk --help` light

    return repl.ps()


@click.command("stop")
@click.argument("model", required=False)
@click.option("--all", "stop_all", is_flag=True, help="Unload every model.")
@json_command
def stop_command(model, stop_all):
    """Unload MODEL (or --all) from the running server."""
    from mlxk.client import repl  # lazy: keeps `mlxk --help` light

    if bool(model) == bool(stop_all):
        raise click.UsageError("give a MODEL or --all")
    return repl.stop(None if stop_all else model)
