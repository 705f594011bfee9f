"""The OpenAI Responses API (`openai` SDK `responses.*`, Codex CLI): POST/GET/DELETE /v1/responses.

A translation over mlxk.server.generation: input items become chat messages and worker params (the internal
request fields /v1/chat/completions fills), the worker's events become output items. Wire facts:
../shared/reference/dialects.md §2, schemas in ../shared/reference/openai-schemas.json.

- `input` is a string (one user message) or items: messages (string or parts), `function_call` (the assistant's
  call, replayed), `function_call_output` (a tool message), `reasoning` (replayed as the next assistant turn's
  reasoning_content). Items a text model cannot use (built-in tool calls, item references) are skipped; an image
  part is refused with a 400 naming it.
- `instructions` is this request's system message; it is not carried over by `previous_response_id`.
- Function tools use the flat shape; other tool types are skipped rather than refused (Codex sends several).
- `text.format` (json_schema, json_object) and `tool_choice` travel in the worker fields the chat route fills
  (`response_format`, `tool_choice`), so they are constrained exactly when /v1/chat/completions constrains them.
- With `store` (the default) the Response and its conversation are kept in state.db (db.responses, KEEP_DAYS), so
  `previous_response_id` continues a conversation across requests and server restarts.
Stream events carry `sequence_number` from 0, in the documented order; an error after the 200 is a
`response.failed` event. Errors before it are OpenAI's error shape.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import closing
from typing import Any, AsyncIterator, Optional, Union

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mlxk import db
from mlxk.db import responses as stored
from mlxk.errors import MlxkError, ResponseNotFound
from mlxk.server.deps import RequestId, ServerState, State, parse_body, require_api_key
from mlxk.server.errors import InvalidRequest
from mlxk.server.generation import RESPONSES_PARTS, SSE_HEADERS, Run, naming, open_run, resolve, respond, \
    sse_event, text_of
from mlxk.server.openai_types import READ_ERRORS, WRITE_ERRORS, error_responses, request_body
from mlxk.workers.inference import protocol

log = logging.getLogger("mlxk.server.responses")

router = APIRouter(dependencies=[Depends(require_api_key)], responses=error_responses(*READ_ERRORS))


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str
    input: Union[str, list[dict[str, Any]], None] = None
    instructions: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    stream: Optional[bool] = False
    store: Optional[bool] = True
    previous_response_id: Optional[str] = None
    text: Optional[dict[str, Any]] = None
    reasoning: Optional[dict[str, Any]] = None
    metadata: Optional[dict[str, Any]] = None


# ---------------------------------------------------------------- request → worker


def _assistant(messages: list[dict]) -> dict:
    """The assistant message a replayed function_call or reasoning item belongs to (the last one, unless a tool
    result or a user turn came after it)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[-1]
    messages.append({"role": "assistant", "content": ""})
    return messages[-1]


def input_messages(items: Union[str, list, None]) -> list[dict]:
    """The request's input as chat messages."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    reasoning: list[str] = []
    for i, item in enumerate(items):
        kind = item.get("type") or ("message" if "role" in item else None)
        where = f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(f"{where}.role: must be user, assistant, system or developer; got {role!r}",
                                     param=f"{where}.role")
            messages.append({"role": role, "content": text_of(item.get("content"), f"{where}.content", RESPONSES_PARTS)})
            if role == "assistant" and reasoning:
                messages[-1]["reasoning_content"], reasoning = "\n".join(reasoning), []
        elif kind == "function_call":
            message = _assistant(messages)
            message.setdefault("tool_calls", []).append({
                "id": str(item.get("call_id") or ""), "type": "function",
                "function": {"name": str(item.get("name") or ""), "arguments": str(item.get("arguments") or "{}")}})
            if reasoning:
                message["reasoning_content"], reasoning = "\n".join(reasoning), []
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""),
                             "content": text_of(item.get("output"), f"{where}.output", RESPONSES_PARTS)})
        elif kind == "reasoning":
            texts = [p.get("text", "") for p in (item.get("content") or item.get("summary") or ())
                     if isinstance(p, dict)]
            reasoning.append("\n".join(t for t in texts if t))
        # anything else (built-in tool calls, item references) is skipped: nothing here can use it
    return messages


def chat_tools(body: ResponsesRequest) -> tuple[list | None, Any]:
    tools = [{"type": "function", "function": {"name": t["name"], "description": t.get("description") or "",
                                               "parameters": t.get("parameters") or {"type": "object"}}}
             for t in body.tools or () if t.get("type") == "function" and isinstance(t.get("name"), str)]
    choice = body.tool_choice
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise InvalidRequest(f"tool_choice {choice!r} must be 'none', 'auto', 'required' or an object",
                             param="tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        elif choice.get("type") == "allowed_tools":
            choice = choice.get("mode") or "auto"
        else:
            choice = "auto"
    if not tools or choice == "none":
        return None, None
    return tools, choice or "auto"


def response_format(text: dict | None) -> dict | None:
    """`text.format` as the chat route's `response_format` (the worker field that constrains decoding)."""
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {key: fmt[key] for key in ("name", "schema", "strict",
                                                                                  "description") if key in fmt}}
    raise InvalidRequest(f"text.format.type must be text, json_schema or json_object; got {fmt.get('type')!r}",
                         param="text.format.type")


def worker_params(body: ResponsesRequest) -> protocol.Params:
    params = protocol.Params(max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p)
    params.tools, params.tool_choice = chat_tools(body)
    params.parallel_tool_calls = body.parallel_tool_calls
    params.response_format = response_format(body.text)
    if (body.reasoning or {}).get("effort") == "none":
        params.chat_template_kwargs = {"enable_thinking": False}
    return params


# ---------------------------------------------------------------- worker events → output items


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class Items:
    """Worker deltas as Responses stream events: one output item open at a time, output_index in order."""

    def __init__(self):
        self.output: list[dict] = []   # finished items
        self.open: dict | None = None
        self.text = ""

    @property
    def index(self) -> int:
        return len(self.output)

    def _start(self, item: dict, *extra: dict) -> list[dict]:
        events = self.close()
        self.open, self.text = item, ""
        return events + [{"type": "response.output_item.added", "output_index": self.index, "item": dict(item)},
                         *extra]

    def _where(self, **more) -> dict:
        return {"item_id": self.open["id"], "output_index": self.index, **more}

    def close(self) -> list[dict]:
        item, text = self.open, self.text
        if item is None:
            return []
        events = []
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": text}
            item["summary"] = [part]
            events += [{"type": "response.reasoning_summary_text.done", **self._where(summary_index=0), "text": text},
                       {"type": "response.reasoning_summary_part.done", **self._where(summary_index=0), "part": part}]
        elif item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item.update(status="completed", content=[part])
            events += [{"type": "response.output_text.done", **self._where(content_index=0), "text": text,
                        "logprobs": []},
                       {"type": "response.content_part.done", **self._where(content_index=0),
                        "part": dict(part)}]
        events.append({"type": "response.output_item.done", "output_index": self.index, "item": item})
        self.output.append(item)
        self.open = None
        return events

    def feed(self, event: dict) -> list[dict]:
        events = []
        if event.get("reasoning"):
            if (self.open or {}).get("type") != "reasoning":
                item = {"id": _id("rs"), "type": "reasoning", "summary": []}
                events += self._start(item)
                events.append({"type": "response.reasoning_summary_part.added", **self._where(summary_index=0),
                               "part": {"type": "summary_text", "text": ""}})
            self.text += event["reasoning"]
            events.append({"type": "response.reasoning_summary_text.delta", **self._where(summary_index=0),
                           "delta": event["reasoning"]})
        if event.get("content"):
            if (self.open or {}).get("type") != "message":
                item = {"id": _id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}
                events += self._start(item)
                events.append({"type": "response.content_part.added", **self._where(content_index=0),
                               "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
            self.text += event["content"]
            events.append({"type": "response.output_text.delta", **self._where(content_index=0),
                           "delta": event["content"], "logprobs": []})
        for call in event.get("tool_calls") or ():
            function = call.get("function") or {}
            name, arguments = function.get("name") or "", function.get("arguments") or "{}"
            item = {"id": _id("fc"), "type": "function_call", "status": "in_progress",
                    "call_id": call.get("id") or _id("call"), "name": name, "arguments": ""}
            events += self._start(item)
            events += [{"type": "response.function_call_arguments.delta", **self._where(), "delta": arguments},
                       {"type": "response.function_call_arguments.done", **self._where(), "name": name,
                        "arguments": arguments}]
            item.update(status="completed", arguments=arguments)
            events += self.close()
        return events


def echoed_tools(tools: list[dict] | None) -> list[dict]:
    """The request's tools as a Response echoes them: a function tool with the fields OpenAI's FunctionTool
    requires (`strict`, `parameters`), each null when the request left it out."""
    return [{**tool, "strict": tool.get("strict"), "parameters": tool.get("parameters")}
            if isinstance(tool, dict) and tool.get("type") == "function" else tool for tool in tools or ()]


def assistant_message(output: list[dict]) -> dict:
    """The output items as the one assistant chat message a continuation replays."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item["type"] == "message":
            message["content"] += "".join(p["text"] for p in item["content"])
        elif item["type"] == "reasoning":
            message["reasoning_content"] = "".join(p["text"] for p in item["summary"])
        elif item["type"] == "function_call":
            message.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": item["arguments"]}})
    return message


class Reply:
    """One /v1/responses answer: the Response object, its events with sequence numbers, its storage."""

    def __init__(self, body: ResponsesRequest, model: str, history: list[dict], messages: list[dict]):
        self.body, self.model, self.history, self.messages = body, model, history, messages
        self.id = _id("resp")
        self.created_at = int(time.time())
        self.items = Items()
        self.sequence = 0

    def response(self, status: str, usage: dict | None = None, **more) -> dict:
        body = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "status": status, "error": None, "incomplete_details": None, "model": self.model,
            "instructions": body.instructions, "output": list(self.items.output) if status != "in_progress" else [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "top_p": body.top_p if body.top_p is not None else 1.0,
            "tool_choice": body.tool_choice or "auto", "tools": echoed_tools(body.tools),
            "metadata": body.metadata or {},
            "text": body.text or {"format": {"type": "text"}}, "reasoning": body.reasoning,
            "store": body.store is not False, "previous_response_id": body.previous_response_id,
            "max_output_tokens": body.max_output_tokens, "truncation": "disabled",
            **({"usage": usage} if usage is not None else {}), **more}   # the schema's usage is never null

    def _event(self, event: dict) -> dict:
        event["sequence_number"] = self.sequence
        self.sequence += 1
        return event

    async def events(self, run: Run, state: ServerState) -> AsyncIterator[dict]:
        for kind in ("response.created", "response.in_progress"):
            yield self._event({"type": kind, "response": self.response("in_progress")})
        try:
            async for event in run.rest():
                if event.get("event") == protocol.EV_DELTA:
                    for out in self.items.feed(event):
                        yield self._event(out)
                elif event.get("event") == protocol.EV_DONE:
                    for out in self.items.close():
                        yield self._event(out)
                    final = self.final(event)
                    await self.keep(state, final)
                    kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
                    yield self._event({"type": kind, "response": final})
        except MlxkError as error:
            log.warning("response %s failed with %s: %s", self.id, error.type, error.message)
            failed = self.response("failed", error={"code": error.type, "message": error.message})
            try:  # kept as OpenAI keeps one: GET /v1/responses/{id} answers status "failed" with the error
                await self.keep(state, failed)
            except Exception:  # noqa: BLE001 — a state.db that cannot take it must not hide the model's error
                log.exception("could not store failed response %s", self.id)
            yield self._event({"type": "response.failed", "response": failed})
            raise

    def final(self, done: dict) -> dict:
        usage = done.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
        # cache_write_tokens (required by OpenAI's ResponseUsage): the prefix cache's writes are not counted per
        # request, and OpenAI's own cache bills no writes either: 0
        shaped = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                  "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
                  "total_tokens": prompt + completion}
        if done.get("finish_reason") == protocol.FINISH_LENGTH:
            return self.response("incomplete", shaped, incomplete_details={"reason": "max_output_tokens"})
        return self.response("completed", shaped)

    async def keep(self, state: ServerState, final: dict) -> None:
        """Store the Response and its conversation (without instructions, which a continuation does not carry)."""
        if self.body.store is False:
            return
        conversation = self.history + self.messages + [assistant_message(final["output"])]
        await asyncio.to_thread(_save, state, id=self.id, model=self.model, created_at=self.created_at,
                                body=final, messages=conversation)


def _save(state: ServerState, **row) -> None:
    with closing(db.connect(state.config.settings.state_db)) as conn:
        stored.save_response(conn, **row)


def _load(state: ServerState, response_id: str, param: str = "previous_response_id") -> dict:
    with closing(db.connect(state.config.settings.state_db)) as conn:
        row = stored.get_response(conn, response_id)
    if row is None:
        raise ResponseNotFound(f"no stored response {response_id!r}: it was never stored (store: false), was "
                               f"deleted, or is older than {stored.KEEP_DAYS} days", param=param)
    return row


async def _collect(run: Run, reply: Reply, state: ServerState) -> dict:
    final = None
    async with run.closing():
        async for event in reply.events(run, state):
            if event["type"] in ("response.completed", "response.incomplete"):
                final = event["response"]
    return final


async def _stream(run: Run, reply: Reply, state: ServerState) -> AsyncIterator[bytes]:
    status = 200
    events = reply.events(run, state)
    try:
        async for event in events:
            yield sse_event(event)
    except MlxkError as error:  # its response.failed event went out already
        status = error.http_status
    finally:
        await run.close(status=status)


# ---------------------------------------------------------------- routes


@router.post("/v1/responses", openapi_extra=request_body(ResponsesRequest),
             responses=error_responses(*WRITE_ERRORS, 503))
@router.post("/v1/responses/", include_in_schema=False)
async def create_response(request: Request, state: State, rid: RequestId):
    started = time.perf_counter()
    body = await parse_body(request, ResponsesRequest)
    history = (await asyncio.to_thread(_load, state, body.previous_response_id))["messages"] \
        if body.previous_response_id else []
    messages = input_messages(body.input)
    if not history and not messages:
        raise InvalidRequest("input: give at least one input item (or a previous_response_id)", param="input")
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    servable = await resolve(state, body.model)
    run = open_run(state, rid, servable, kind="chat", messages=system + history + messages,
                   params=worker_params(body), endpoint="responses", started=started)
    reply = Reply(body, servable.repo_id, history, messages)

    async def exchange():
        await run.accepted()
        if body.stream:
            return StreamingResponse(_stream(run, reply, state), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return JSONResponse(await _collect(run, reply, state))

    with naming("input"):
        return await respond(request, run, exchange())


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, state: State) -> dict:
    return (await asyncio.to_thread(_load, state, response_id, "response_id"))["body"]


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, state: State) -> dict:
    def delete() -> bool:
        with closing(db.connect(state.config.settings.state_db)) as conn:
            return stored.delete_response(conn, response_id)

    if not await asyncio.to_thread(delete):
        raise ResponseNotFound(f"no stored response {response_id!r}", param="response_id")
    return {"id": response_id, "object": "response.deleted", "deleted": True}
