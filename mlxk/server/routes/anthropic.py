"""The Anthropic Messages API (`anthropic` SDK, Claude Code): POST /v1/messages and /v1/messages/count_tokens.

A translation over mlxk.server.generation, nothing more: the body becomes OpenAI-style chat messages and worker
params (the same internal request fields /v1/chat/completions fills), and the worker's events become Anthropic
content blocks. Wire facts: ../shared/reference/dialects.md §1.

- system (string or text blocks) becomes the system message; a leading Claude Code attribution block
  (`x-anthropic-billing-header: …`, a fresh nonce per request) is dropped, since it would defeat the prompt cache.
- tool_result blocks become `tool` messages placed before the user text of the same turn (chat templates want them
  right after the assistant's call); tool_use blocks become the assistant's tool_calls; thinking blocks are replayed
  as `reasoning_content`. Blocks a text model cannot use (documents, server tool results) are skipped; an image is
  refused with a 400 naming it.
- The worker's reasoning becomes thinking blocks, its content text blocks, each tool call a tool_use block; blocks
  are opened and closed one at a time with indexes 0, 1, 2…, which the SDK's accumulator needs.
- tool_choice (any → required, tool → named) and `output_config.format` (→ response_format) travel in the worker
  fields the chat route fills, so they are constrained exactly when /v1/chat/completions constrains them.
- Query strings (`?beta=true`), `anthropic-version`, `anthropic-beta` and unknown body fields are ignored.
Errors, before or after the 200, are in Anthropic's shape (errors.error_body picks it for these paths).
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any, AsyncIterator, Optional, Union

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mlxk.errors import MlxkError
from mlxk.server.deps import RequestId, State, parse_body, require_api_key
from mlxk.server.errors import ANTHROPIC_PATH, InvalidRequest, anthropic_error_type
from mlxk.server.generation import ANTHROPIC_BLOCKS, SSE_HEADERS, Run, count_prompt_tokens, naming, open_run, \
    resolve, respond, sse_event, text_of
from mlxk.server.openai_types import WRITE_ERRORS, AnthropicErrorResponse, error_responses, request_body
from mlxk.workers.inference import protocol

log = logging.getLogger("mlxk.server.anthropic")

router = APIRouter(dependencies=[Depends(require_api_key)],
                   responses=error_responses(*WRITE_ERRORS, 503, model=AnthropicErrorResponse))

PATH = ANTHROPIC_PATH
ATTRIBUTION_PREFIX = "x-anthropic-billing-header:"
STOP_REASONS = {protocol.FINISH_STOP: "end_turn", protocol.FINISH_LENGTH: "max_tokens",
                protocol.FINISH_TOOL_CALLS: "tool_use"}
SIGNATURE = "mlxk"  # thinking blocks need a non-empty opaque signature; any comes back and is accepted


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: Union[str, list[dict[str, Any]], None] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[dict[str, Any]] = None
    thinking: Optional[dict[str, Any]] = None
    output_config: Optional[dict[str, Any]] = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[float] = Field(default=None, ge=0, le=1)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    stream: Optional[bool] = False
    metadata: Optional[dict[str, Any]] = None


# ---------------------------------------------------------------- request → worker


def _system_text(system: Union[str, list, None]) -> str:
    if isinstance(system, list):
        system = [b for i, b in enumerate(system)
                  if not (i == 0 and isinstance(b, dict) and str(b.get("text", "")).startswith(ATTRIBUTION_PREFIX))]
    return text_of(system, "system", ANTHROPIC_BLOCKS)


def _turn(role: str, content: Any, where: str) -> list[dict]:
    """One Anthropic message as OpenAI chat messages: a user turn's tool results first, then its text."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content: must be a string or a list of content blocks", param=f"{where}.content")
    tools, texts, thinking, calls = [], [], [], []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "image":
            raise InvalidRequest(f"{where}.content[{j}]: image blocks are not supported: this server runs text "
                                 "models; send text", param=f"{where}.content[{j}]")
        elif kind == "tool_result":
            text = text_of(block.get("content"), f"{where}.content[{j}].content", ANTHROPIC_BLOCKS)
            tools.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id") or ""),
                          "content": ("Error: " + text) if block.get("is_error") else text})
        elif kind == "tool_use":
            calls.append({"id": str(block.get("id") or ""), "type": "function",
                          "function": {"name": str(block.get("name") or ""),
                                       "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
        elif kind == "thinking":
            thinking.append(str(block.get("thinking") or ""))
        elif kind is None:
            raise InvalidRequest(f"{where}.content[{j}]: a content block must be an object with a 'type'",
                                 param=f"{where}.content[{j}]")
    message: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "\n".join(thinking)
    return tools + ([message] if texts or calls or not tools else [])


def chat_messages(body: CountTokensRequest) -> list[dict]:
    """The conversation as the OpenAI chat messages the worker renders with the model's template."""
    messages = []
    system = _system_text(body.system)
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(body.messages):
        role = message.get("role")
        if role not in ("user", "assistant", "system"):
            raise InvalidRequest(f"messages[{i}].role: must be 'user' or 'assistant'; got {role!r}",
                                 param=f"messages[{i}].role")
        if role == "system":
            messages.append({"role": "system", "content": text_of(message.get("content"), f"messages[{i}].content", ANTHROPIC_BLOCKS)})
        else:
            for turn in _turn(role, message.get("content"), f"messages[{i}]"):
                _append_merging(messages, turn)
    return messages


def _append_merging(messages: list[dict], turn: dict) -> None:
    """Consecutive turns of one role are one turn (Anthropic's rule; templates that insist on alternating roles
    would refuse them otherwise). Tool results and tool calls stay where they are."""
    last = messages[-1] if messages else None
    if (last and last["role"] == turn["role"] and turn["role"] in ("user", "assistant")
            and not last.get("tool_calls") and not turn.get("tool_calls")):
        last["content"] = "\n\n".join(part for part in (last["content"], turn["content"]) if part)
    else:
        messages.append(turn)


def chat_tools(body: CountTokensRequest) -> tuple[list | None, Any]:
    """Anthropic tools and tool_choice as the worker's (OpenAI's) tools and tool_choice; server tools (a dated
    `type` such as web_search_20250305) are skipped, since nothing here runs them."""
    tools = []
    for i, tool in enumerate(body.tools or ()):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"tools[{i}]: a tool needs a 'name' and an 'input_schema'", param=f"tools[{i}]")
        if tool.get("type") not in (None, "custom"):
            continue
        tools.append({"type": "function", "function": {
            "name": tool["name"], "description": tool.get("description") or "",
            "parameters": tool.get("input_schema") or {"type": "object"}}})
    choice = body.tool_choice or {"type": "auto"}
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise InvalidRequest(f"tool_choice.type: must be auto, any, tool or none; got {kind!r}", param="tool_choice")
    if kind == "tool" and not any(t["function"]["name"] == choice.get("name") for t in tools):
        raise InvalidRequest(f"tool_choice names the tool {choice.get('name')!r}, which is not in tools",
                             param="tool_choice.name")
    if not tools or kind == "none":
        return None, None
    mapped = {"auto": "auto", "any": "required"}.get(kind) or {"type": "function", "function": {"name": choice["name"]}}
    return tools, mapped


def worker_params(body: CountTokensRequest) -> protocol.Params:
    params = protocol.Params()
    if isinstance(body, MessagesRequest):
        params = protocol.Params(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                 top_k=body.top_k, stop=[s for s in body.stop_sequences or () if s])
    params.tools, params.tool_choice = chat_tools(body)
    if (body.tool_choice or {}).get("disable_parallel_tool_use") is True:
        params.parallel_tool_calls = False   # Anthropic's name for parallel_tool_calls false: at most one call
    if (body.thinking or {}).get("type") == "disabled":
        params.chat_template_kwargs = {"enable_thinking": False}
    fmt = (body.output_config or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":   # the chat route's field for it
        params.response_format = {"type": "json_schema", "json_schema": {"name": "output",
                                                                          "schema": fmt.get("schema") or {}}}
    return params


# ---------------------------------------------------------------- worker events → content blocks


def _usage(input_tokens: int, cached: int, output_tokens: int) -> dict:
    return {"input_tokens": max(input_tokens - cached, 0), "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _tool_input(arguments: str) -> dict:
    """tool_use.input is an object, never a string: the worker's JSON arguments, parsed."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


class Blocks:
    """Worker deltas as Anthropic stream events: one block open at a time, indexes in start order."""

    def __init__(self):
        self.index = -1
        self.open: str | None = None

    def _start(self, block: dict) -> list[dict]:
        events = self.close()
        self.index += 1
        self.open = block["type"]
        return events + [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def close(self) -> list[dict]:
        if self.open is None:
            return []
        events = [self._delta({"type": "signature_delta", "signature": SIGNATURE})] if self.open == "thinking" else []
        self.open = None
        return events + [{"type": "content_block_stop", "index": self.index}]

    def feed(self, event: dict) -> list[dict]:
        events = []
        if event.get("reasoning"):
            if self.open != "thinking":
                events += self._start({"type": "thinking", "thinking": "", "signature": ""})
            events.append(self._delta({"type": "thinking_delta", "thinking": event["reasoning"]}))
        if event.get("content"):
            if self.open != "text":
                events += self._start({"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": event["content"]}))
        for call in event.get("tool_calls") or ():
            function = call.get("function") or {}
            tool_id = "toolu_" + str(call.get("id") or secrets.token_hex(12)).removeprefix("call_")
            events += self._start({"type": "tool_use", "id": tool_id, "name": function.get("name", ""), "input": {}})
            events.append(self._delta({"type": "input_json_delta", "partial_json": json.dumps(
                _tool_input(function.get("arguments") or ""), ensure_ascii=False)}))
            events += self.close()
        return events


def apply(message: dict, event: dict) -> None:
    """Fold one stream event into the message, as the SDK's accumulator does (the non-streamed reply is built
    from the very events a stream would carry)."""
    kind = event["type"]
    if kind == "content_block_start":
        message["content"].append(dict(event["content_block"]))
    elif kind == "content_block_delta":
        block, delta = message["content"][event["index"]], event["delta"]
        if delta["type"] == "text_delta":
            block["text"] += delta["text"]
        elif delta["type"] == "thinking_delta":
            block["thinking"] += delta["thinking"]
        elif delta["type"] == "signature_delta":
            block["signature"] = delta["signature"]
        elif delta["type"] == "input_json_delta":
            block["input"] = json.loads(delta["partial_json"])


class Reply:
    """One /v1/messages answer: the message_start snapshot, then block events, then the stop."""

    def __init__(self, model: str, accepted: dict):
        self.id = f"msg_{secrets.token_hex(12)}"
        self.model = model
        self.input_tokens = int(accepted.get("prompt_tokens") or 0)
        self.cached = int(accepted.get("cached_tokens") or 0)
        self.blocks = Blocks()

    def start(self) -> dict:
        return {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": _usage(self.input_tokens, self.cached, 1)}}

    async def events(self, run: Run) -> AsyncIterator[dict]:
        yield self.start()
        async for event in run.rest():
            if event.get("event") == protocol.EV_DELTA:
                for out in self.blocks.feed(event):
                    yield out
            elif event.get("event") == protocol.EV_DONE:
                for out in self.blocks.close():
                    yield out
                yield self.stop(event)
                yield {"type": "message_stop"}

    def stop(self, done: dict) -> dict:
        usage = done.get("usage") or {}
        matched = done.get("stop_sequence")
        reason = "stop_sequence" if matched else STOP_REASONS.get(done.get("finish_reason"), "end_turn")
        return {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": matched},
                "usage": _usage(self.input_tokens, self.cached, int(usage.get("completion_tokens") or 0))}


async def _collect(run: Run, reply: Reply) -> dict:
    message = None
    async with run.closing():
        async for event in reply.events(run):
            if event["type"] == "message_start":
                message = event["message"]
            elif event["type"] == "message_delta":
                message.update(event["delta"])
                message["usage"] = event["usage"]
            else:
                apply(message, event)
    return message


async def _stream(run: Run, reply: Reply) -> AsyncIterator[bytes]:
    status = 200
    try:
        async for event in reply.events(run):
            yield sse_event(event)
            if event["type"] == "content_block_start" and event["index"] == 0:
                yield sse_event({"type": "ping"})
    except MlxkError as error:
        status = error.http_status
        log.warning("stream %s ended with %s: %s", reply.id, error.type, error.message)
        yield sse_event({"type": "error", "error": {"type": anthropic_error_type(status), "message": error.message}})
    finally:
        await run.close(status=status)


# ---------------------------------------------------------------- routes

# The worker words its refusals in OpenAI's terms (the fields /v1/chat/completions has); an Anthropic client sent these.
_OPENAI_TERMS = (("tool_choice 'required' or a named function", 'tool_choice {"type": "any"} or {"type": "tool"}'),
                 ("use tool_choice 'auto'", 'use tool_choice {"type": "auto"}'))


def in_anthropic_terms(error: MlxkError) -> MlxkError:
    """`error` with a worker refusal of an OpenAI field reworded as the Anthropic field the client sent."""
    for openai, anthropic in _OPENAI_TERMS:
        error.message = error.message.replace(openai, anthropic)
    return error



@router.post(PATH, openapi_extra=request_body(MessagesRequest))
@router.post(PATH + "/", include_in_schema=False)
async def messages(request: Request, state: State, rid: RequestId):
    started = time.perf_counter()
    body = await parse_body(request, MessagesRequest)
    messages, params = chat_messages(body), worker_params(body)
    servable = await resolve(state, body.model)
    run = open_run(state, rid, servable, kind="chat", messages=messages, params=params, endpoint="messages",
                   started=started)

    async def exchange():
        try:
            accepted = await run.accepted()
        except MlxkError as error:
            raise in_anthropic_terms(error)
        reply = Reply(body.model, accepted)
        if body.stream:
            return StreamingResponse(_stream(run, reply), media_type="text/event-stream", headers=SSE_HEADERS)
        return JSONResponse(await _collect(run, reply))

    with naming("messages"):
        return await respond(request, run, exchange())


@router.post(PATH + "/count_tokens", openapi_extra=request_body(CountTokensRequest))
async def count_tokens(request: Request, state: State, rid: RequestId) -> dict:
    body = await parse_body(request, CountTokensRequest)
    messages, params = chat_messages(body), worker_params(body)
    servable = await resolve(state, body.model)
    with naming("messages"):
        return {"input_tokens": await count_prompt_tokens(state, rid, servable, messages=messages, params=params,
                                                          endpoint="count_tokens")}
