"""The one generation interface every dialect speaks through (OpenAI chat/completions, Anthropic Messages, OpenAI
Responses): a resolved model, one generate request to the inference worker, and its events.

A dialect route is a translation: it turns its body into worker messages and `protocol.Params`, calls `open_run`,
waits for `Run.accepted()` inside `respond()` (which cancels the worker row when the client hangs up), and shapes
`Run.rest()`'s events into its own JSON or stream. Name resolution, warm models, batching and worker errors are
therefore the same code for all of them; only the shapes differ. The shared translation helpers live here too
(`text_of` for content parts, `sse_event`, `collect`), so no adapter keeps its own copy.

Layering of the serving path, each layer talking only to the one below: adapters (mlxk/server/routes/*) ->
this module -> the supervisor (supervisor.py) speaking workers/inference/protocol.py -> the worker's socket server
(workers/inference/server.py) -> the engine's batching loop (engine.py; embed.py for embeddings) -> residency
(residency.py: loaded models, eviction, keep-alive).

A client that hangs up cancels its generation in the worker (closing the worker connection is the cancel). A
streamed response notices through Starlette, which stops the body iterator; a non-streamed one (and a request
still waiting to be accepted) would not notice at all, because its handler never writes until the end, so
`respond` watches the ASGI receive channel for `http.disconnect` beside the worker exchange.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from mlxk import catalog
from mlxk.errors import MlxkError
from mlxk.server.deps import ServerState
from mlxk.server.errors import InvalidRequest, WorkerError
from mlxk.workers.inference import protocol

log = logging.getLogger("mlxk.server.generation")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED = 499  # nginx's "client closed request": what metrics record for a request whose client left


@contextlib.contextmanager
def naming(param: str):
    """Name `param` in any 400 raised inside (a model name that is invalid or ambiguous, a prompt the worker
    refuses), unless the error names a field already."""
    try:
        yield
    except MlxkError as error:
        if error.http_status == 400:
            error.details.setdefault("param", param)
        raise


async def resolve(state: ServerState, name: str) -> catalog.Servable:
    """The runnable model a request names (one resolver for every dialect); a 400 names `model`."""
    with naming("model"):
        return await state.resolve(name)


class Run:
    """One generation in flight: the worker's events, with metrics and the first-token clock."""

    def __init__(self, state: ServerState, payload: dict, endpoint: str, *, started: float, label: str):
        self.state, self.endpoint, self.started, self.label = state, endpoint, started, label
        self.events = state.supervisor.generate(payload)
        self._first_token_seen = False
        self._closed = False
        state.metrics.started()

    async def accepted(self) -> dict:
        """Wait for the worker to accept the request (its `accepted` event: prompt_tokens, cached_tokens); its
        refusal becomes a real HTTP error."""
        try:
            return await self._next()
        except StopAsyncIteration:
            await self.close(status=500)
            raise WorkerError(protocol.error_event(protocol.ERR_INTERNAL, "the inference worker sent no reply",
                                                   500)) from None
        except BaseException as error:
            await self.close(status=error_status(error))
            raise

    async def _next(self) -> dict:
        event = await self.events.__anext__()
        kind = event.get("event")
        if kind == protocol.EV_ERROR:
            raise WorkerError(event)
        if kind == protocol.EV_DELTA and not self._first_token_seen:
            self._first_token_seen = True
            self.state.metrics.first_token(time.perf_counter() - self.started)
        elif kind == protocol.EV_DONE:
            self.state.metrics.done(event)
        return event

    async def rest(self) -> AsyncIterator[dict]:
        """The delta events, then the done event; a worker error raises WorkerError."""
        while True:
            try:
                event = await self._next()
            except StopAsyncIteration:
                raise WorkerError(protocol.error_event(protocol.ERR_INTERNAL,
                                                       "the inference worker ended the reply early", 500)) from None
            yield event
            if event.get("event") == protocol.EV_DONE:
                return

    async def close(self, *, status: int = 200) -> None:
        if self._closed:
            return
        self._closed = True
        await self.events.aclose()
        self.state.metrics.finished(self.endpoint, status)

    @contextlib.asynccontextmanager
    async def closing(self):
        """Close the run when the block ends: with the error's status (499 for a hang-up) when it raised."""
        try:
            yield self
        except BaseException as error:
            await self.close(status=error_status(error))
            raise
        await self.close()


@dataclass
class Collected:
    """A non-streamed generation, whole: its text and reasoning joined, its tool calls merged, its done event."""
    content: str = ""
    reasoning: str = ""
    calls: dict = field(default_factory=dict)   # index -> OpenAI-shaped tool call (merge_tool_calls)
    done: dict = field(default_factory=dict)    # the worker's done event (finish_reason, usage, timings)


async def collect(run: Run, on_event: Callable[[dict], None] | None = None) -> Collected:
    """Drain `run` (after `accepted()`) into a Collected and close it; `on_event` sees every event on the way."""
    content, reasoning, out = [], [], Collected()
    async with run.closing():
        async for event in run.rest():
            if on_event is not None:
                on_event(event)
            if event.get("event") == protocol.EV_DELTA:
                content.append(event.get("content") or "")
                reasoning.append(event.get("reasoning") or "")
                merge_tool_calls(out.calls, event.get("tool_calls") or [])
            elif event.get("event") == protocol.EV_DONE:
                out.done = event
    out.content, out.reasoning = "".join(content), "".join(reasoning)
    return out


def open_run(state: ServerState, rid: str, servable: catalog.Servable, *, kind: str, params: protocol.Params,
             messages: list | None = None, prompt: str | None = None, endpoint: str, started: float,
             label: str = "") -> Run:
    """Send the worker one generate request for `servable`; the Run yields its events."""
    payload = protocol.generate_message(protocol.GenerateRequest(
        id=rid, model=protocol.ModelRef(servable.key, servable.path), kind=kind, messages=messages, prompt=prompt,
        params=params))
    return Run(state, payload, endpoint, started=started, label=label or rid)


def sse_event(event: dict) -> bytes:
    """One server-sent event named by the event's own "type" (how Anthropic and the Responses API stream)."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def error_status(error: BaseException) -> int:
    if isinstance(error, asyncio.CancelledError):
        return CLIENT_CLOSED
    return error.http_status if isinstance(error, MlxkError) else 500


async def _until_disconnected(request: Request) -> None:
    """Return once the HTTP client has hung up.

    The body was read already, so the ASGI server's next message on the receive channel is `http.disconnect`,
    sent when the connection closes (uvicorn answers it at once if that happened before we asked).
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


HUNG_UP = object()   # what unless_hung_up gives when the client left first


async def unless_hung_up(request: Request, exchange: Awaitable):
    """exchange's result; HUNG_UP (with exchange cancelled) if the HTTP client hangs up first. A non-streamed
    handler never writes before the end, so nothing else would notice the hang-up."""
    work = asyncio.ensure_future(exchange)
    hangup = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down this handler: the exchange goes with it
        work.cancel()  # (its own error path cleans up)
        raise
    finally:
        hangup.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.wait({work})
    if not work.cancelled():
        work.exception()  # mark it retrieved: whatever it ended with, nobody is left to receive it
    return HUNG_UP


async def respond(request: Request, run: Run, exchange: Awaitable[Response]) -> Response:
    """Run the worker exchange; if the client hangs up first, cancel it (which cancels the worker's row)."""
    result = await unless_hung_up(request, exchange)
    if result is not HUNG_UP:
        return result
    await run.close(status=CLIENT_CLOSED)  # closes the worker connection: the worker drops the row at its next step
    log.info("client of %s hung up before the reply: generation cancelled", run.label)
    return Response(status_code=CLIENT_CLOSED)  # nobody is left to read it


async def count_prompt_tokens(state: ServerState, rid: str, servable: catalog.Servable, *, messages: list,
                              params: protocol.Params, endpoint: str) -> int:
    """The prompt's token count exactly as a generation would see it (chat template, tools): the worker's
    `accepted` event, after which the request is cancelled before it decodes more than a token. A prompt over the
    model's context is still counted (the worker's refusal carries its count): counting is not generating."""
    params.max_tokens = 1
    run = open_run(state, rid, servable, kind="chat", messages=messages, params=params, endpoint=endpoint,
                   started=time.perf_counter())
    try:
        accepted = await run.accepted()
    except WorkerError as error:
        if isinstance(getattr(error, "prompt_tokens", None), int):
            return error.prompt_tokens
        raise
    finally:
        await run.close()
    return int(accepted.get("prompt_tokens") or 0)


def merge_tool_calls(calls: dict[int, dict], deltas: list[dict]) -> None:
    """Accumulate streamed tool-call pieces by index (OpenAI streams arguments in fragments)."""
    for piece in deltas:
        index = piece.get("index", len(calls))
        call = calls.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if piece.get("id"):
            call["id"] = piece["id"]
        function = piece.get("function") or {}
        if function.get("name"):
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] += function.get("arguments") or ""


@dataclass(frozen=True)
class ContentParts:
    """How a dialect writes message content as a list: which part types carry text (and in which field), which
    are refused because this server runs text models, and how the texts join."""
    unit: str                    # the dialect's word for one part: "block" (Anthropic), "part" (Responses)
    text_fields: dict            # part type -> the field holding its text
    refused: tuple               # part types answered with a 400 naming what to send instead
    send_instead: str            # the part type to send instead
    joiner: str


# Anthropic Messages: text blocks joined by newlines (tool_result content, system blocks, system messages).
ANTHROPIC_BLOCKS = ContentParts("block", {"text": "text"}, ("image",), "text", "\n")
# OpenAI Responses: input/output text and refusals, joined as they are.
RESPONSES_PARTS = ContentParts("part", {"input_text": "text", "output_text": "text", "text": "text",
                                        "refusal": "refusal"}, ("input_image", "input_file"), "input_text", "")


def text_of(content: Any, where: str, parts: ContentParts) -> str:
    """A string, or the text of a list of content parts in `parts`' dialect; None is "". Other part types are
    skipped (they carry no text the model could read). A 400 names `where` (the request field at fault)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}: must be a string or a list of content {parts.unit}s", param=where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise InvalidRequest(f"{where}[{j}]: a content {parts.unit} must be an object with a 'type'",
                                 param=f"{where}[{j}]")
        kind = part.get("type")
        if kind in parts.text_fields:
            texts.append(str(part.get(parts.text_fields[kind]) or ""))
        elif kind in parts.refused:
            raise InvalidRequest(f"{where}[{j}]: {kind} {parts.unit}s are not supported: this server runs text "
                                 f"models; send {parts.send_instead}", param=f"{where}[{j}]")
    return parts.joiner.join(texts)
