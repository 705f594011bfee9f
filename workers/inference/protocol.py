"""The wire protocol between the api process and the inference worker.

This docstring is the spec; the api (mlxk/server) and the worker code against exactly this.

Transport
    A Unix domain socket. One request per connection: the client sends one JSON object on one line
    (UTF-8, ending in "\\n"), then reads JSON lines until a terminal event. A client that closes its
    connection cancels its request: the row leaves the batch at once (its prompt cache may be kept).
    EOF on the worker's read side counts as closing, so a client must not shut down its write side.
    A live worker, starting or serving, holds an exclusive flock on `<socket>.lock` (socket_lock_path).

Requests
    {"op": "generate", "id": str,
     "model": {"key": "org/name@<40-hex>", "path": "/abs/snapshot/dir"},
     "kind": "chat" | "completion", "messages": [...] | null, "prompt": str | null,
     "params": {"max_tokens": int|null, "temperature": float|null, "top_p": float|null,
                "top_k": int|null, "min_p": float|null, "repetition_penalty": float|null,
                "presence_penalty": float|null, "frequency_penalty": float|null, "seed": int|null, "stop": [str], "keep_alive": float|null,
                "tools": [...]|null, "tool_choice": ...|null, "chat_template_kwargs": {...}|null,
                "response_format": {...}|null, "parallel_tool_calls": bool|null}}
        chat: OpenAI messages, rendered with the model's chat template (add_generation_prompt=True,
        tools= when given, unless tool_choice is "none"). completion: `prompt` is tokenized as is.
        response_format (OpenAI's json_object / json_schema) and tool_choice "required" / {"type": "function",
        "function": {"name"}} constrain decoding by grammar (constrain.py); a schema that does not compile, a
        name not in tools, or a model whose tool-call format has no grammar -> bad_request. parallel_tool_calls
        false: at most one tool call (the grammar allows only the end after it).
        temperature null = 0 (greedy, as mlx_lm.server). repetition_penalty uses the last 20 tokens;
        presence_penalty and frequency_penalty (OpenAI's, additive) the last PENALTY_CONTEXT tokens.
        A chat message of role "developer" is rendered as "system" when the template has no "developer".
        keep_alive: seconds the model stays loaded after this request; 0 unloads after the reply;
        negative = never unloaded for idleness (ollama's -1); null = the worker's default.
        max_tokens null: min(DEFAULT_MAX_TOKENS, context length - prompt tokens).
        seed: each seeded row samples from its own key stream, so the same seed gives the same text
        when the request runs alone; in a batch its draws are still its own, but batched arithmetic
        may differ in the last bits from a lone run, so equal text is likely, not guaranteed.
    {"op": "status"}
        -> {"event": "status", "pid", "models": [{"key", "path", "memory_bytes", "loaded_at",
            "last_used", "keep_alive_s", "expires_at" (unix s or null), "running"}],
            "running", "waiting", "counters": {"requests_total", "prompt_tokens_total",
            "generation_tokens_total", "cached_prompt_tokens_total"}, "peak_memory_bytes",
            "peak_batch_rows" (most rows that decoded together: evidence of batching),
            "prefix_cache"?: the disk tier's stats (prefixcache.PrefixCache.stats: "enabled", "dir", "bytes",
            "max_bytes", "entries", "hit_ratio", "lookups", "hits", "restored_tokens", "writes", "evictions",
            "corrupt"...), present when the worker has one}
    {"op": "unload", "model": key | repo id | null (all)} -> {"event": "unloaded", "models": [keys]}
        a model with live rows is unloaded as soon as they finish (it is listed all the same).
    {"op": "load", "model": {"key", "path"}, "keep_alive": float|null}
        -> {"event": "loaded", "key"} or an error event
    {"op": "ping"} -> {"event": "pong", "pid"}
    {"op": "embed", "model": {"key", "path"}, "inputs": [str | [int]], "dimensions": int|null,
     "keep_alive": float|null}
        -> {"event": "embeddings", "embeddings": [[float]], "prompt_tokens": int} or an error event
        (embed.py: last-token pooling, L2-normalized; `dimensions` truncates first). Requests that arrive
        while the MLX thread is busy run in one batch. The status reply adds "embed_batches_total",
        "embed_peak_batch_inputs" and "embed_waiting" (requests waiting for the next batch).

Events of a generate request, in order
    {"event": "accepted", "prompt_tokens": int, "cached_tokens": int}
        once the prompt is tokenized and queued; errors found before (bad request, prompt too long,
        load failure) come as an `error` event instead.
    {"event": "delta", "content"?: str, "reasoning"?: str, "tool_calls"?: [{"index", "id",
        "type": "function", "function": {"name", "arguments"}}]}
        zero or more; only the keys that carry something are present.
    {"event": "done", "finish_reason": "stop" | "length" | "tool_calls",
     "stop_sequence"?: str (present when a request stop string ended the text: the one that matched),
     "usage": {"prompt_tokens", "completion_tokens", "total_tokens",
               "prompt_tokens_details": {"cached_tokens"},
               "completion_tokens_details": {"reasoning_tokens"}},
     "timings": {"ttft_s", "decode_tokens_per_s"}}
    {"event": "error", "type": str, "message": str, "status": int, "retryable": bool, "param"?: str}
        types: bad_request (400), context_length_exceeded (400, OpenAI's code: the prompt is longer than
        the model's context or the server's prompt limit; the message says "maximum context length is N
        tokens"), load_failed (400: the path is not a model folder), model_failed (422: the model failed
        while loading or generating; the worker unloaded it and serves other models on), busy (503,
        retryable: the waiting queue is full, memory ran out, or the worker is shutting down), internal (500).
        A model_failed event also carries "model" (the key) and "reason" (one line), which the api
        records in the index as the model's runtime verdict.
"""
from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

OP_GENERATE = "generate"
OP_STATUS = "status"
OP_UNLOAD = "unload"
OP_LOAD = "load"
OP_PING = "ping"
OP_EMBED = "embed"
OPS = (OP_GENERATE, OP_STATUS, OP_UNLOAD, OP_LOAD, OP_PING, OP_EMBED)

EV_ACCEPTED = "accepted"
EV_DELTA = "delta"
EV_DONE = "done"
EV_ERROR = "error"
EV_STATUS = "status"
EV_UNLOADED = "unloaded"
EV_LOADED = "loaded"
EV_PONG = "pong"
EV_EMBEDDINGS = "embeddings"
TERMINAL_EVENTS = frozenset({EV_DONE, EV_ERROR, EV_STATUS, EV_UNLOADED, EV_LOADED, EV_PONG, EV_EMBEDDINGS})

ERR_BAD_REQUEST = "bad_request"
ERR_CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
ERR_LOAD_FAILED = "load_failed"
ERR_MODEL_FAILED = "model_failed"
ERR_BUSY = "busy"
ERR_INTERNAL = "internal"

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_TOOL_CALLS = "tool_calls"

DEFAULT_MAX_TOKENS = 2048
PENALTY_CONTEXT = 256  # tokens presence_penalty and frequency_penalty look back over
# One request line may carry a long conversation; asyncio's default 64 KiB line limit is too small.
MAX_LINE_BYTES = 64 * 1024 * 1024


def socket_lock_path(socket_path: str | Path) -> Path:
    """The lock file a live worker holds for its socket (the worker takes it, the api's supervisor probes it)."""
    return Path(f"{socket_path}.lock")


@dataclass(frozen=True)
class ModelRef:
    key: str   # "org/name@<40-hex>": identity of the weights (repo + revision)
    path: str  # absolute snapshot directory

    @property
    def repo_id(self) -> str:
        return self.key.split("@", 1)[0]


@dataclass
class Params:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    keep_alive: float | None = None
    tools: list | None = None
    tool_choice: Any = None
    chat_template_kwargs: dict | None = None
    response_format: dict | None = None
    parallel_tool_calls: bool | None = None   # false: at most one tool call (None: OpenAI's default, true)


@dataclass
class GenerateRequest:
    id: str
    model: ModelRef
    kind: str  # "chat" | "completion"
    messages: list | None = None
    prompt: str | None = None
    params: Params = field(default_factory=Params)


class ProtocolError(ValueError):
    """A request line that does not follow the protocol; answered with a bad_request error event."""


def encode(message: dict) -> bytes:
    """One protocol line. Raises ProtocolError when a string is not Unicode text (a lone surrogate): the api
    refuses such bodies with a 400 (deps.check_json_tree) before they get here."""
    try:
        return (json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    except UnicodeEncodeError as error:
        raise ProtocolError(f"a string in the message is not valid Unicode text: {error.reason}") from None


def decode(line: bytes | str) -> dict:
    try:
        message = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"request is not valid JSON: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError("request must be a JSON object")
    return message


def error_event(type: str, message: str, status: int, retryable: bool = False) -> dict:
    return {"event": EV_ERROR, "type": type, "message": message, "status": status, "retryable": retryable}


def parse_model_ref(value: Any) -> ModelRef:
    if not isinstance(value, dict) or not isinstance(value.get("key"), str) or not isinstance(value.get("path"), str):
        raise ProtocolError('"model" must be an object with string "key" and "path"')
    if not value["key"] or not value["path"]:
        raise ProtocolError('"model.key" and "model.path" must not be empty')
    return ModelRef(key=value["key"], path=value["path"])


def _optional(params: dict, name: str, kind: type | tuple) -> Any:
    value = params.get(name)
    if value is None:
        return None
    # bool is an int in Python; a JSON true is never a valid number here.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError(f'"params.{name}" has the wrong type: {value!r}')
    return value


def parse_params(raw: Any) -> Params:
    if raw is None:
        return Params()
    if not isinstance(raw, dict):
        raise ProtocolError('"params" must be an object')
    stop = raw.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ProtocolError('"params.stop" must be a list of strings')
    number = (int, float)
    params = Params(
        max_tokens=_optional(raw, "max_tokens", int),
        temperature=_optional(raw, "temperature", number),
        top_p=_optional(raw, "top_p", number),
        top_k=_optional(raw, "top_k", int),
        min_p=_optional(raw, "min_p", number),
        repetition_penalty=_optional(raw, "repetition_penalty", number),
        presence_penalty=_optional(raw, "presence_penalty", number),
        frequency_penalty=_optional(raw, "frequency_penalty", number),
        seed=_optional(raw, "seed", int),
        stop=[s for s in stop if s],
        keep_alive=_optional(raw, "keep_alive", number),
        tools=_optional(raw, "tools", list),
        tool_choice=raw.get("tool_choice"),
        chat_template_kwargs=_optional(raw, "chat_template_kwargs", dict),
        response_format=_optional(raw, "response_format", dict),
        parallel_tool_calls=raw.get("parallel_tool_calls"),
    )
    if params.parallel_tool_calls not in (None, True, False):
        raise ProtocolError(f'"params.parallel_tool_calls" has the wrong type: {params.parallel_tool_calls!r}')
    if params.max_tokens is not None and params.max_tokens < 1:
        raise ProtocolError('"params.max_tokens" must be at least 1')
    if params.temperature is not None and params.temperature < 0:
        raise ProtocolError('"params.temperature" must not be negative')
    return params


def parse_generate(message: dict) -> GenerateRequest:
    kind = message.get("kind")
    if kind not in ("chat", "completion"):
        raise ProtocolError('"kind" must be "chat" or "completion"')
    messages, prompt = message.get("messages"), message.get("prompt")
    if kind == "chat" and (not isinstance(messages, list) or not messages):
        raise ProtocolError('a chat request needs a non-empty "messages" list')
    if kind == "completion" and not isinstance(prompt, str):
        raise ProtocolError('a completion request needs a string "prompt"')
    return GenerateRequest(
        id=str(message.get("id") or ""),
        model=parse_model_ref(message.get("model")),
        kind=kind,
        messages=messages if kind == "chat" else None,
        prompt=prompt if kind == "completion" else None,
        params=parse_params(message.get("params")),
    )


def generate_message(request: GenerateRequest) -> dict:
    """The wire form of a GenerateRequest (what the api sends)."""
    p = request.params
    return {
        "op": OP_GENERATE, "id": request.id,
        "model": {"key": request.model.key, "path": request.model.path},
        "kind": request.kind, "messages": request.messages, "prompt": request.prompt,
        "params": {
            "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
            "min_p": p.min_p, "repetition_penalty": p.repetition_penalty, "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty, "seed": p.seed, "stop": list(p.stop),
            "keep_alive": p.keep_alive, "tools": p.tools, "tool_choice": p.tool_choice,
            "chat_template_kwargs": p.chat_template_kwargs, "response_format": p.response_format,
            "parallel_tool_calls": p.parallel_tool_calls,
        },
    }


# ---- clients -------------------------------------------------------------------------------------------------


async def request(socket_path: str, payload: dict, *,
                  opened: Callable[[asyncio.StreamWriter], None] | None = None) -> AsyncIterator[dict]:
    """Send one request and yield every event up to and including the terminal one.

    `opened(writer)` is called once the connection is up (the api's supervisor keeps it, to abort the
    connections of a worker that stopped answering).

    Closing the iterator early closes the connection, which cancels the request. Close it explicitly
    (`async with contextlib.aclosing(request(...)) as events:`): after a bare `break` the connection
    stays open until the garbage collector finalizes the generator.
    Raises OSError (ConnectionError, FileNotFoundError) when the worker is unreachable or hangs up
    before a terminal event.
    """
    reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=MAX_LINE_BYTES)
    if opened is not None:
        opened(writer)
    try:
        writer.write(encode(payload))
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("inference worker closed the connection before the reply ended")
            event = json.loads(line)
            yield event
            if event.get("event") in TERMINAL_EVENTS:
                return
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def call(socket_path: str, payload: dict, timeout: float | None = 30.0) -> dict:
    """Send a single-reply op (status, unload, load, ping) and return its one reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(encode(payload))
        with sock.makefile("rb") as f:
            while True:
                line = f.readline()
                if not line:
                    raise ConnectionError("inference worker closed the connection before replying")
                event = json.loads(line)
                if event.get("event") in TERMINAL_EVENTS:
                    return event
