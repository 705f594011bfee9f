"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

A generation is one request to the inference worker; its events become either one JSON response or a stream of
SSE chunks. Deltas are forwarded exactly as the worker produced them: stop-string holding, EOS and template-token
filtering happen in the worker, and splitting or re-joining text here could reintroduce what it held back.
Errors before the first token (unknown model, prompt too long, busy) are real HTTP errors; once streaming has
begun, an error is sent as a final `data: {"error": ...}` chunk, which OpenAI's clients raise.

Every body follows OpenAI's published schemas (tests validate them): `system_fingerprint` is a string naming the
weights and the software, `message.refusal` is present (null), and a completion chunk carries `usage` only when it
has one. The one deviation is OpenAI's own: a streamed completion chunk before the last has `finish_reason: null`.
A 400 names the request field at fault in `param`. Routes also answer with a trailing slash (no 307 redirect).

The worker exchange itself (resolution, the generate request, hang-up cancels) is mlxk.server.generation, which
the other dialects share.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
import time
from importlib import metadata
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mlxk import __version__, catalog
from mlxk.errors import MlxkError
from mlxk.clock import iso_utc, parse_iso
from mlxk.server.deps import Model, RequestId, State, ServerState, check_supported, parse_body, require_api_key
from mlxk.server.errors import InvalidRequest, openai_error_body
from mlxk.server.generation import SSE_HEADERS, Run, collect, naming, open_run, resolve, respond
from mlxk.server.openai_types import READ_ERRORS, WRITE_ERRORS, ChatCompletionRequest, CompletionRequest, \
    error_responses, keep_alive_seconds, request_body
from mlxk.workers.inference import protocol

log = logging.getLogger("mlxk.server.openai")

router = APIRouter(dependencies=[Depends(require_api_key)], responses=error_responses(*READ_ERRORS))



# ---------------------------------------------------------------- models

LISTED_TYPES = catalog.SERVABLE_TYPES + catalog.EMBEDDING_TYPES


def _model_object(row: dict) -> dict:
    """OpenAI's model object, plus the fields of Anthropic's (type, display_name, created_at), so both SDKs'
    models.list() read the one route."""
    created = int(parse_iso(row.get("last_modified")) or 0)
    return {"id": row["repo_id"], "object": "model", "created": created, "owned_by": row["repo_id"].split("/")[0],
            "context_length": row.get("context_length"),  # extra field, as LM Studio and OpenRouter name it
            "type": "model", "display_name": row["repo_id"], "created_at": iso_utc(created)}


@router.get("/v1/models")
@router.get("/v1/models/", include_in_schema=False)
async def list_models(state: State) -> dict:
    """Every servable model in one page, embedding models included (OpenAI lists text-embedding-3-small too; the
    chat routes refuse them by name): `has_more: false` (with first_id, last_id) ends Anthropic's pager."""
    data = [_model_object(row) for row in catalog.runnable(await state.model_rows(), LISTED_TYPES)]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: State) -> dict:
    with naming("model"):
        row, _ = catalog.resolve_row(model_id.removesuffix("/"), await state.model_rows(), LISTED_TYPES)
    return _model_object(row)


@functools.lru_cache(maxsize=64)
def system_fingerprint(revision: str) -> str:
    """OpenAI's system_fingerprint: changes when the weights (revision) or the software that runs them change."""
    try:
        mlx_lm = metadata.version("mlx-lm")
    except metadata.PackageNotFoundError:
        mlx_lm = "?"
    return "fp_" + hashlib.sha256(f"{revision}|{__version__}|{mlx_lm}".encode()).hexdigest()[:10]


# ---------------------------------------------------------------- generation


@dataclass
class Generation:
    """What one generation request needs to shape its responses."""
    kind: str                 # "chat" | "completion"
    model: str                # the resolved repo id, echoed as `model`
    stream: bool
    include_usage: bool
    started: float            # perf_counter at the start of the request, for time to first token
    fingerprint: str = ""     # system_fingerprint
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{secrets.token_hex(12)}"

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def chunk(self, choice: dict | None, usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": [choice] if choice is not None else []}
        if self.include_usage and (usage is not None or self.kind == "chat"):  # null is valid in chat chunks only
            body["usage"] = usage
        return body

    def delta_choice(self, event: dict, finish_reason: str | None = None) -> dict | None:
        if self.kind == "completion":
            text = event.get("content") or ""
            if not text and finish_reason is None:
                return None
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        delta = {}
        if event.get("role"):
            delta["role"] = event["role"]
        if "content" in event:
            delta["content"] = event["content"]
        if event.get("reasoning"):
            delta["reasoning_content"] = event["reasoning"]
        if event.get("tool_calls"):
            delta["tool_calls"] = event["tool_calls"]
        if not delta and finish_reason is None:
            return None
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _worker_params(body, max_tokens: int | None) -> protocol.Params:
    return protocol.Params(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=body.seed, stop=body.stop_list(),
        keep_alive=keep_alive_seconds(body.keep_alive))


def _usage(done: dict) -> dict:
    usage = dict(done.get("usage") or {})
    usage.setdefault("prompt_tokens", 0)
    usage.setdefault("completion_tokens", 0)
    usage.setdefault("total_tokens", usage["prompt_tokens"] + usage["completion_tokens"])
    return usage


async def _generate(request: Request, state: ServerState, gen: Generation, run: Run):
    async def exchange():
        await run.accepted()
        if gen.stream:  # from here on Starlette itself stops the stream when the client leaves
            return StreamingResponse(_sse(run, gen), media_type="text/event-stream", headers=SSE_HEADERS)
        return JSONResponse(await _collect(run, gen))

    return await respond(request, run, exchange())


async def _collect(run: Run, gen: Generation) -> dict:
    reply = await collect(run)
    done, calls = reply.done, reply.calls
    body = {"id": gen.id, "created": gen.created, "model": gen.model, "system_fingerprint": gen.fingerprint,
            "usage": _usage(done)}
    finish = done.get("finish_reason") or "stop"
    if gen.kind == "completion":
        body["object"] = "text_completion"
        body["choices"] = [{"index": 0, "text": reply.content, "logprobs": None, "finish_reason": finish}]
        return body
    message = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
        message["content"] = message["content"] or None
    body["object"] = "chat.completion"
    body["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}]
    return body


async def _sse(run: Run, gen: Generation) -> AsyncIterator[bytes]:
    status = 200
    try:
        if gen.kind == "chat":
            yield _format(gen.chunk(gen.delta_choice({"role": "assistant", "content": ""})))
        async for event in run.rest():
            if event.get("event") == protocol.EV_DELTA:
                choice = gen.delta_choice(event)
                if choice is not None:
                    yield _format(gen.chunk(choice))
            elif event.get("event") == protocol.EV_DONE:
                finish = event.get("finish_reason") or "stop"
                yield _format(gen.chunk(gen.delta_choice({}, finish_reason=finish)))
                if gen.include_usage:
                    yield _format(gen.chunk(None, usage=_usage(event)))
                yield _format("[DONE]")
    except MlxkError as error:
        status = error.http_status
        log.warning("stream %s ended with %s: %s", gen.id, error.type, error.message)
        yield _format(openai_error_body(error))
    finally:
        await run.close(status=status)


def _format(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def _handle(request: Request, state: ServerState, rid: str, kind: str, body_type: type[Model],
                  worker_input: Callable[[Model], tuple[protocol.Params, list | None, str | None]]):
    """What both endpoints do: parse and check the body, resolve its model, and send the worker one generate
    request, whose params, messages and prompt `worker_input` makes from the body."""
    started = time.perf_counter()  # time to first token counts from the request, as the client sees it
    body = await parse_body(request, body_type)
    if (found := body.invalid()) is not None:
        param, message = found
        raise InvalidRequest(message if param in message else f"{param}: {message}", param=param,
                             code="invalid_value")
    check_supported(body)
    servable = await resolve(state, body.model)
    params, messages, prompt = worker_input(body)
    stream = bool(body.stream)
    gen = Generation(kind, servable.repo_id, stream, body.include_usage() and stream, started,
                     system_fingerprint(servable.revision))
    run = open_run(state, rid, servable, kind=kind, messages=messages, prompt=prompt, params=params, endpoint=kind,
                   started=started, label=gen.id)
    with naming("messages" if kind == "chat" else "prompt"):
        return await _generate(request, state, gen, run)


def _chat_input(body: ChatCompletionRequest) -> tuple[protocol.Params, list, None]:
    params = _worker_params(body, body.token_limit())
    if body.tools and body.tool_choice != "none":
        params.tools, params.tool_choice = body.tools, body.tool_choice
        params.parallel_tool_calls = body.parallel_tool_calls
    params.chat_template_kwargs = body.template_kwargs()
    if body.response_format and body.response_format.get("type", "text") != "text":
        params.response_format = body.response_format
    return params, body.messages, None


def _completion_input(body: CompletionRequest) -> tuple[protocol.Params, None, str]:
    return _worker_params(body, body.max_tokens), None, body.prompt_text()


GENERATION_ERRORS = error_responses(*WRITE_ERRORS, 503)


@router.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest), responses=GENERATION_ERRORS)
@router.post("/v1/chat/completions/", include_in_schema=False)
async def chat_completions(request: Request, state: State, rid: RequestId):
    return await _handle(request, state, rid, "chat", ChatCompletionRequest, _chat_input)


@router.post("/v1/completions", openapi_extra=request_body(CompletionRequest), responses=GENERATION_ERRORS)
@router.post("/v1/completions/", include_in_schema=False)
async def completions(request: Request, state: State, rid: RequestId):
    return await _handle(request, state, rid, "completion", CompletionRequest, _completion_input)
