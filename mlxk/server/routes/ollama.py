"""The Ollama API (`/api/tags`, `/api/chat`, `/api/pull`, ...): a translation over the same parts as /v1.

Names resolve through mlxk.names (the one resolver: `org/name:latest`, `qwen3:0.6b-4bit`, `org/name:<commit>`),
generation goes through mlxk.server.generation's `Run` (one worker request, metrics, a client that hangs up cancels it),
pull and delete are mlxk jobs (mlxk.jobs), so `mlxk jobs` shows them. What differs is only the wire: NDJSON
streams (on by default), a final chunk with counts and nanosecond durations, tool-call arguments as objects, and
errors as `{"error": "..."}` (errors.error_body picks that shape for these paths; after the 200 an
error is the stream's last line). Wire facts: ../shared/reference/dialects.md §3.

`/api/ps` is shared with `mlxk ps` and the web page: a compatible superset (Ollama's fields, then mlxk's).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import threading
import time
from contextlib import closing
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Optional, Union

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mlxk import catalog, db, index, jobs, names
from mlxk.clock import parse_iso
from mlxk.errors import Conflict, MlxkError
from mlxk.server import generation
from mlxk.server.deps import ServerState, State, RequestId, parse_body, require_api_key
from mlxk.server.errors import InvalidRequest, ollama_error_body
from mlxk.server.openai_types import READ_ERRORS, WRITE_ERRORS, KeepAlive, error_responses, keep_alive_seconds, \
    request_body
from mlxk.server.routes import embeddings as embedding_routes
from mlxk.workers.inference import protocol

log = logging.getLogger("mlxk.server.ollama")

# What /api/version answers: clients parse it as plain X.Y.Z and some refuse anything older than 0.6.4 (VS Code
# Copilot). It is the Ollama API level mlxk speaks, not mlxk's own version (that is in /health).
OLLAMA_API_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
# mlxk capability names (mlxk.detect) -> Ollama's (types/model/capability.go)
CAPABILITIES = {"text-generation": "completion", "tools": "tools", "reasoning": "thinking", "vision": "vision",
                "embeddings": "embedding"}


class OllamaError(BaseModel):
    error: str


def _errors(*statuses: int) -> dict:
    """error_responses with Ollama's body (errors.error_body picks it for these paths, the middleware's refusals
    included)."""
    return {status: {**meaning, "model": OllamaError} for status, meaning in error_responses(*statuses).items()}


WRITE = _errors(*WRITE_ERRORS)
GENERATION_ERRORS = _errors(*WRITE_ERRORS, 503)
router = APIRouter(dependencies=[Depends(require_api_key)], responses=_errors(*READ_ERRORS))


def _now() -> str:
    """RFC 3339 with nanoseconds' worth of digits, as Ollama writes `created_at` (Python parses it)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _rfc3339(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- models


def _listed(row: dict) -> bool:
    """What Ollama clients see: models that generate, and embedding models (served by /api/embed)."""
    return catalog.why_not_runnable(row) is None or catalog.why_not_runnable(row, catalog.EMBEDDING_TYPES) is None


def _digest(row: dict) -> str:
    """A 64-hex digest that changes with the weights: sha256 of `repo@revision` (HF has no manifest digest)."""
    return hashlib.sha256(f"{row['repo_id']}@{row['revision']}".encode()).hexdigest()


def _details(row: dict) -> dict:
    family = row.get("architecture") or ""
    details = {"parent_model": "", "format": "mlx", "family": family, "families": [family] if family else None,
               "parameter_size": "", "quantization_level": row.get("quantization") or ""}
    if row.get("context_length"):
        details["context_length"] = row["context_length"]
    return details


def _capabilities(row: dict) -> list[str]:
    return [CAPABILITIES[c] for c in row.get("capabilities") or [] if c in CAPABILITIES]


def _tag(row: dict) -> dict:
    name = names.tagged(row["repo_id"])
    modified = parse_iso(row.get("last_modified"))
    return {"name": name, "model": name, "modified_at": _rfc3339(modified) or _now(), "size": row.get("size_bytes"),
            "digest": _digest(row), "details": _details(row), "capabilities": _capabilities(row)}


@router.api_route("/api/version", methods=["GET", "HEAD"])
async def version() -> dict:
    return {"version": OLLAMA_API_VERSION}


@router.api_route("/api/tags", methods=["GET", "HEAD"])
async def tags(state: State) -> dict:
    rows = sorted((r for r in (await state.get_catalog(fresh=True)).rows if _listed(r)),
                  key=lambda r: r["repo_id"].lower())
    return {"models": [entry for row in rows for entry in _tags_of(row)]}


def _tags_of(row: dict) -> list[dict]:
    """The model under its own name, then under each alias (as Ollama lists a copy beside its source)."""
    tag = _tag(row)
    return [tag] + [{**tag, "name": f"{alias}:latest", "model": f"{alias}:latest"} for alias in row.get("aliases") or []]


class NameRequest(BaseModel):
    """`model`, or `name` as older clients send it (Continue)."""
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model: Optional[str] = None
    name: Optional[str] = None

    def target(self) -> str:
        value = self.model or self.name
        if not value or not value.strip():
            raise InvalidRequest("model is required", param="model")
        return value.strip()


async def _row(state: ServerState, name: str) -> dict:
    """The index row `name` means (any listed model; generation checks runnability itself)."""
    return index.resolve_in((await state.get_catalog()).rows, names.parse(name)).row


def _parameters(row: dict) -> str:
    lines = []
    if row.get("context_length"):
        lines.append(f"num_ctx {row['context_length']}")
    return "\n".join(lines)


@router.post("/api/show", openapi_extra=request_body(NameRequest), responses=WRITE)
async def show(request: Request, state: State) -> dict:
    row = await _row(state, (await parse_body(request, NameRequest)).target())
    arch = row.get("architecture") or "unknown"
    info = {"general.architecture": arch, "general.basename": row["repo_id"].split("/")[-1]}
    if row.get("context_length"):
        info[f"{arch}.context_length"] = row["context_length"]
    return {"modelfile": f"FROM {row['repo_id']}\n", "parameters": _parameters(row), "template": "{{ .Prompt }}",
            "details": _details(row), "model_info": info, "capabilities": _capabilities(row),
            "modified_at": _rfc3339(parse_iso(row.get("last_modified"))) or _now()}


@router.get("/api/ps")
async def ps(state: State) -> dict:
    """Loaded models, Ollama's fields (`name`/`model` tagged, `expires_at` RFC 3339, `size_vram`) then mlxk's
    (`repo_id`, `revision`, `key`, `memory_bytes`, `expires_ts` (unix s, null: never), `expires_in_s`,
    `running`...), the queue depth, and the prompt-prefix cache's stats (`prefix_cache`, null without a worker)."""
    status = await state.supervisor.call({"op": protocol.OP_STATUS}, start=False) or {}
    now = time.time()
    return {"models": [_loaded(m, now) for m in status.get("models") or []],
            "running": status.get("running", 0), "waiting": status.get("waiting", 0),
            "prefix_cache": status.get("prefix_cache"), "worker": state.supervisor.state()}


def _loaded(model: dict, now: float) -> dict:
    repo_id, _, revision = model.get("key", "").partition("@")
    expires = model.get("expires_at")
    tagged = names.tagged(repo_id)
    return {
        "name": tagged, "model": tagged, "size": model.get("memory_bytes") or 0,
        "digest": hashlib.sha256(model.get("key", "").encode()).hexdigest(), "details": {"format": "mlx"},
        # Ollama's "forever" is a far-future date; clients parse it with datetime.fromisoformat
        "expires_at": _rfc3339(expires) if expires is not None else "2318-01-01T00:00:00+00:00",
        "size_vram": model.get("memory_bytes") or 0,
        "repo_id": repo_id, "revision": revision, "key": model.get("key"), "path": model.get("path"),
        "memory_bytes": model.get("memory_bytes"), "loaded_at": model.get("loaded_at"),
        "last_used": model.get("last_used"), "keep_alive_s": model.get("keep_alive_s"),
        "expires_ts": expires, "expires_in_s": None if expires is None else max(0.0, round(expires - now, 1)),
        "running": model.get("running", 0),
    }


# ---------------------------------------------------------------- chat and generate


class Options(BaseModel):
    """The Ollama options mlxk uses; any other key (num_ctx, num_gpu, mirostat...) is accepted and ignored."""
    model_config = ConfigDict(extra="ignore")
    temperature: Optional[float] = Field(default=None, ge=0)
    top_k: Optional[int] = Field(default=None, ge=0)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    seed: Optional[int] = None
    repeat_penalty: Optional[float] = Field(default=None, gt=0)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stop: Union[str, list[str], None] = None
    num_predict: Optional[int] = None


class _Generate(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model: str
    stream: bool = True
    format: Union[str, dict[str, Any], None] = None
    options: Optional[Options] = None
    keep_alive: KeepAlive = None
    think: Union[bool, str, None] = None

    def params(self) -> protocol.Params:
        o = self.options or Options()
        stop = [o.stop] if isinstance(o.stop, str) else [s for s in o.stop or [] if s]
        keep_alive = _keep_alive(self.keep_alive)
        return protocol.Params(
            max_tokens=o.num_predict if o.num_predict and o.num_predict > 0 else None,  # -1, -2: as long as fits
            temperature=o.temperature, top_p=o.top_p, top_k=o.top_k or None, min_p=o.min_p, seed=o.seed,
            repetition_penalty=o.repeat_penalty, presence_penalty=o.presence_penalty,
            frequency_penalty=o.frequency_penalty, stop=stop, keep_alive=keep_alive,
            response_format=self.response_format())

    def response_format(self) -> dict | None:
        """Ollama's `format` as the chat route's response_format, which the worker enforces while decoding:
        "json" is a JSON object, a dict is a JSON schema (not strict: Ollama ignores keywords it cannot enforce)."""
        if self.format in (None, ""):
            return None
        if self.format == "json":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": self.format, "strict": False}}

    def check(self) -> None:
        if isinstance(self.format, str) and self.format not in ("", "json"):
            raise InvalidRequest(f"format must be \"json\" or a JSON schema object, not {self.format!r}",
                                 param="format")
        if isinstance(self.think, str) and self.think not in ("low", "medium", "high", "max"):
            raise InvalidRequest(f"think must be true, false or one of low, medium, high, max; not {self.think!r}",
                                 param="think")


class ChatRequest(_Generate):
    messages: Optional[list[dict[str, Any]]] = None
    tools: Optional[list[dict[str, Any]]] = None


class GenerateRequest(_Generate):
    prompt: str = ""
    system: Optional[str] = None
    suffix: Optional[str] = None
    raw: bool = False
    template: Optional[str] = None
    context: Optional[list[int]] = None


def _template_kwargs(body: _Generate, row: dict) -> dict | None:
    if body.think is None:
        return None
    if body.think is not False and "reasoning" not in (row.get("capabilities") or []):
        raise InvalidRequest(f'"{body.model}" does not support thinking', param="think")
    return {"enable_thinking": body.think is not False}


def _chat_messages(body: ChatRequest) -> list[dict]:
    """Ollama messages as the worker takes them (OpenAI's, arguments may be objects); images are dropped."""
    out = []
    for i, message in enumerate(body.messages or []):
        if not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{i}].role is required", param=f"messages[{i}].role")
        if message.get("content") is not None and not isinstance(message["content"], str):
            raise InvalidRequest(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        item = {"role": message["role"], "content": message.get("content") or ""}
        for key in ("tool_calls", "tool_call_id"):
            if message.get(key):
                item[key] = message[key]
        if message.get("tool_name"):
            item["name"] = message["tool_name"]
        out.append(item)
    return out


class Timing:
    """Ollama's durations (ns): load = request to the worker's acceptance (resolution, loading, queueing,
    tokenizing), prompt eval = acceptance to the first token, eval = first token to the end."""

    def __init__(self):
        self.started = time.perf_counter()
        self.accepted = self.first = None

    def mark(self, event: dict) -> None:
        if event.get("event") == protocol.EV_DELTA and self.first is None:
            self.first = time.perf_counter()

    def final(self, done: dict) -> dict:
        end = time.perf_counter()
        accepted = self.accepted or end
        first = self.first or end
        usage = done.get("usage") or {}
        ns = lambda s: max(0, int(s * 1e9))  # noqa: E731
        return {"done_reason": "length" if done.get("finish_reason") == "length" else "stop",
                "total_duration": ns(end - self.started), "load_duration": ns(accepted - self.started),
                "prompt_eval_count": usage.get("prompt_tokens", 0), "prompt_eval_duration": ns(first - accepted),
                "eval_count": usage.get("completion_tokens", 0), "eval_duration": ns(end - first)}


def _tool_calls(calls: dict[int, dict]) -> list[dict]:
    """OpenAI tool calls -> Ollama's, whose arguments are an object (never a string)."""
    out = []
    for i in sorted(calls):
        function = calls[i]["function"]
        try:
            arguments = json.loads(function["arguments"] or "{}")
        except ValueError:
            arguments = {}
        if not isinstance(arguments, dict):
            arguments = {"value": arguments}
        out.append({"id": calls[i].get("id") or f"call_{secrets.token_hex(4)}",
                    "function": {"index": i, "name": function["name"], "arguments": arguments}})
    return out


class Reply:
    """One chat or generate answer: chunks as Ollama shapes them."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model

    def chunk(self, content: str, thinking: str = "", tool_calls: list | None = None, *, done: bool = False) -> dict:
        body = {"model": self.model, "created_at": _now()}
        if self.kind == "chat":
            message = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            body["message"] = message
        else:
            body["response"] = content
            if thinking:
                body["thinking"] = thinking
        body["done"] = done
        return body


def _line(data: dict) -> bytes:
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


async def _stream(run: generation.Run, reply: Reply, timing: Timing) -> AsyncIterator[bytes]:
    calls: dict[int, dict] = {}
    status = 200
    try:
        async for event in run.rest():
            timing.mark(event)
            if event.get("event") == protocol.EV_DELTA:
                generation.merge_tool_calls(calls, event.get("tool_calls") or [])
                if event.get("content") or event.get("reasoning"):
                    yield _line(reply.chunk(event.get("content") or "", event.get("reasoning") or ""))
            elif event.get("event") == protocol.EV_DONE:
                if calls:  # complete calls in one chunk with blank content, as Ollama sends them
                    yield _line(reply.chunk("", tool_calls=_tool_calls(calls)))
                yield _line({**reply.chunk("", done=True), **timing.final(event)})
    except MlxkError as error:
        status = error.http_status
        log.warning("ollama stream of %s ended with %s: %s", reply.model, error.type, error.message)
        yield _line(ollama_error_body(error))
    finally:
        await run.close(status=status)


async def _collect(run: generation.Run, reply: Reply, timing: Timing) -> dict:
    whole = await generation.collect(run, on_event=timing.mark)
    body = reply.chunk(whole.content, whole.reasoning, _tool_calls(whole.calls) if whole.calls else None, done=True)
    return {**body, **timing.final(whole.done)}


async def _load_or_unload(state: ServerState, body: _Generate, servable: catalog.Servable, reply: Reply):
    """Empty input: load the model (or unload it with keep_alive 0) and answer one object."""
    params = body.params()
    if params.keep_alive == 0:
        await state.supervisor.call({"op": protocol.OP_UNLOAD, "model": servable.key}, start=False)
        reason = "unload"
    else:
        await state.supervisor.call({"op": protocol.OP_LOAD, "keep_alive": params.keep_alive,
                                     "model": {"key": servable.key, "path": servable.path}})
        reason = "load"
    return JSONResponse({**reply.chunk("", done=True), "done_reason": reason})


async def _answer(request: Request, state: ServerState, rid: str, kind: str, body: _Generate, row: dict,
                  servable: catalog.Servable, messages: list | None, prompt: str | None):
    """One generation: `kind` is the dialect's (chat | generate); the worker gets messages (a chat, rendered with
    the model's template) or a raw prompt."""
    params = body.params()
    params.chat_template_kwargs = _template_kwargs(body, row)
    if isinstance(body, ChatRequest) and body.tools:
        if "tools" not in (row.get("capabilities") or []):  # Ollama's 400 and words (its chat handler)
            raise InvalidRequest(f'"{body.model}" does not support tools', param="tools")
        params.tools, params.tool_choice = body.tools, "auto"
    timing = Timing()
    reply = Reply(kind, body.model)
    run = generation.open_run(state, rid, servable, kind="chat" if messages is not None else "completion",
                              params=params, messages=messages, prompt=prompt, endpoint=f"ollama_{kind}",
                              started=timing.started)

    async def exchange():
        await run.accepted()
        timing.accepted = time.perf_counter()
        if body.stream:
            return StreamingResponse(_stream(run, reply, timing), media_type=NDJSON,
                                     headers=generation.SSE_HEADERS)
        return JSONResponse(await _collect(run, reply, timing))

    return await generation.respond(request, run, exchange())


async def _resolve(state: ServerState, name: str) -> tuple[dict, catalog.Servable]:
    servable = await state.resolve(name)
    row = servable.row or next(r for r in await state.model_rows() if r["repo_id"] == servable.repo_id)
    return row, servable


@router.post("/api/chat", openapi_extra=request_body(ChatRequest), responses=GENERATION_ERRORS)
async def chat(request: Request, state: State, rid: RequestId):
    body = await parse_body(request, ChatRequest)
    body.check()
    row, servable = await _resolve(state, body.model)
    if not body.messages:
        return await _load_or_unload(state, body, servable, Reply("chat", body.model))
    return await _answer(request, state, rid, "chat", body, row, servable, _chat_messages(body), None)


@router.post("/api/generate", openapi_extra=request_body(GenerateRequest), responses=GENERATION_ERRORS)
async def generate(request: Request, state: State, rid: RequestId):
    body = await parse_body(request, GenerateRequest)
    body.check()
    if body.raw and (body.template or body.system or body.context):
        raise InvalidRequest("raw mode does not support template, system, or context", param="raw")
    if body.suffix:
        raise InvalidRequest("suffix (fill-in-the-middle) is not supported by mlxk; leave out 'suffix'",
                             param="suffix")
    row, servable = await _resolve(state, body.model)
    if not body.prompt:
        return await _load_or_unload(state, body, servable, Reply("generate", body.model))
    if body.raw or "chat" not in (row.get("capabilities") or []):
        return await _answer(request, state, rid, "generate", body, row, servable, None, body.prompt)
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
        [{"role": "user", "content": body.prompt}]
    return await _answer(request, state, rid, "generate", body, row, servable, messages, None)


# ---------------------------------------------------------------- embeddings


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model: str
    input: Union[str, list[str]]
    truncate: bool = True
    dimensions: Optional[int] = Field(default=None, ge=1)
    keep_alive: KeepAlive = None


class LegacyEmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model: str
    prompt: str
    keep_alive: KeepAlive = None


def _keep_alive(value) -> float | None:
    try:
        return keep_alive_seconds(value)
    except ValueError as error:
        raise InvalidRequest(f"keep_alive: {error}", param="keep_alive") from None


@router.post("/api/embed", openapi_extra=request_body(EmbedRequest), responses=GENERATION_ERRORS)
async def embed(request: Request, state: State):
    body = await parse_body(request, EmbedRequest)
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs or any(not text for text in inputs):
        raise InvalidRequest("input must be a non-empty string or a list of non-empty strings", param="input")
    result = await embedding_routes.embed(request, state, body.model, inputs, dimensions=body.dimensions,
                                          keep_alive=_keep_alive(body.keep_alive), truncate=body.truncate)
    if result is None:
        return Response(status_code=generation.CLIENT_CLOSED)  # the client hung up: nobody reads this
    ns = int(result.total_s * 1e9)
    return {"model": body.model, "embeddings": result.vectors, "total_duration": ns, "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens}


@router.post("/api/embeddings", openapi_extra=request_body(LegacyEmbeddingsRequest), responses=GENERATION_ERRORS)
async def embeddings(request: Request, state: State):
    """The legacy route: one prompt, one vector; a prompt longer than the context is cut to it, as /api/embed's
    default `truncate: true` does."""
    body = await parse_body(request, LegacyEmbeddingsRequest)
    if not body.prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    result = await embedding_routes.embed(request, state, body.model, [body.prompt],
                                          keep_alive=_keep_alive(body.keep_alive), truncate=True)
    if result is None:
        return Response(status_code=generation.CLIENT_CLOSED)
    return {"embedding": result.vectors[0]}


# ---------------------------------------------------------------- pull, delete


class PullRequest(NameRequest):
    insecure: bool = False
    stream: bool = True


def _progress(job: dict) -> dict:
    progress = job["progress"]
    line = {"status": f"pulling {job['target']}"}
    if progress.get("bytes_total"):
        line.update(total=progress["bytes_total"], completed=progress.get("bytes_done") or 0)
    return line


def _ending(job: dict) -> dict:
    error = jobs.outcome_error(job)
    return {"status": "success"} if error is None else {"error": error.message}


class _StopFollowing(Exception):
    """Raised inside jobs.follow's callback once nobody reads the lines (the client left): the poll ends."""


async def _follow(job_id: str) -> AsyncIterator[dict]:
    """The job's progress lines (when they change), then its end: Ollama's pull statuses over an mlxk job.

    A client that hangs up stops only the following (the poll thread ends at its next update); the pull job goes on,
    as `mlxk pull` without --wait would."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    left = threading.Event()

    def update(job: dict) -> None:
        if left.is_set():
            raise _StopFollowing
        loop.call_soon_threadsafe(queue.put_nowait, job)

    follower = loop.run_in_executor(None, lambda: jobs.follow(job_id, update, poll_s=0.1))
    follower.add_done_callback(lambda f: f.cancelled() or f.exception())  # _StopFollowing is nobody's error
    try:
        last = None
        while not (follower.done() and queue.empty()):
            try:
                job = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                continue
            line = _progress(job)
            if job["state"] != "queued" and line != last:
                last = line
                yield line
        final = await follower
    finally:
        left.set()
    if final["state"] == "succeeded":
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
    yield _ending(final)


@router.post("/api/pull", openapi_extra=request_body(PullRequest), responses=WRITE)
async def pull(request: Request):
    """A pull job (as `mlxk pull` queues it); its progress streams as Ollama's NDJSON status lines."""
    body = await parse_body(request, PullRequest)
    outcome = await run_in_threadpool(jobs.enqueue_pull, body.target())
    job_id = outcome.job["id"]

    async def lines() -> AsyncIterator[bytes]:
        yield _line({"status": "pulling manifest"})
        async for line in _follow(job_id):
            yield _line(line)

    if body.stream:
        return StreamingResponse(lines(), media_type=NDJSON)
    last = {}
    async for last in _follow(job_id):
        pass
    if "error" in last:
        error = jobs.outcome_error(await run_in_threadpool(jobs.get, job_id))
        return JSONResponse(last, status_code=error.http_status if error else 500)
    return last


def _with_index(state: ServerState, work):
    """Run `work(conn)` on the index (state.db), in the threadpool."""
    def run():
        with closing(db.connect(state.config.settings.state_db)) as conn:
            return work(conn)

    return run_in_threadpool(run)


@router.delete("/api/delete", openapi_extra=request_body(NameRequest), responses=WRITE)
async def delete(request: Request, state: State):
    """An alias (from /api/copy) is forgotten, the model stays, as deleting an Ollama copy leaves its source;
    any other name is an rm job (exact names only, as `mlxk rm` without --force: a fuzzy name is 409, naming the
    model it matches). jobs.resolve_removal decides, for the CLI and every route alike. 200 with no body."""
    name = (await parse_body(request, NameRequest)).target()
    target = await run_in_threadpool(jobs.resolve_removal, name)
    if target.alias is not None:
        await run_in_threadpool(jobs.remove_alias, target)
    elif target.fuzzy:
        model = f"{target.repo_id}@{target.revision}" if target.revision else target.repo_id
        raise Conflict(f"{name!r} is not an exact name: it matches {model}; delete it by that name.", model=model)
    else:
        error = jobs.outcome_error((await run_in_threadpool(jobs.remove, target)).job)
        if error is not None:
            raise error
    await state.get_catalog(fresh=True)
    return Response(status_code=200)


class CopyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    source: str
    destination: str


@router.post("/api/copy", openapi_extra=request_body(CopyRequest), responses=WRITE)
async def copy(request: Request, state: State):
    """`destination` becomes an alias of the model `source` names (no files are copied): kept in state.db,
    resolved like any name, listed by /api/tags and `mlxk list`. 200 with no body."""
    body = await parse_body(request, CopyRequest)
    await state.get_catalog(fresh=True)  # the index knows what is cached now
    await _with_index(state, lambda conn: index.add_alias(conn, names.parse(body.source), body.destination))
    await state.get_catalog(fresh=True)
    return Response(status_code=200)
