"""The inference engine: one MLX thread that owns every model and runs one continuous-batching loop.

Why this shape: MLX arrays, streams and the model weights belong to the thread that made them, and
batched decoding only pays off when one loop sees every live request. So other threads only talk to
the engine through a thread-safe inbox (`submit`, `cancel`, `call`) and receive events through a
`deliver` callback the engine calls once per decode step with every event of that step. The loop
follows mlx_lm.server: `BatchGenerator.next()` in a tight loop while rows are live, one shared
sampler object per distinct sampling setting (batched sampling), a streaming detokenizer per row,
prompt-cache reuse through `LRUPromptCache`, and a model switch only once the running batch drained.

Admission: requests of one burst (parallel clients) reach the worker a few ms apart, because the api handles
them one after another. A batch that starts from nothing therefore waits up to COALESCE_GAP_S after the latest
arrival (at most COALESCE_MAX_S after the first) before its first `next()`, so the burst is prefilled in one
forward pass instead of the first request alone and the rest one step later (which costs every row of the burst
an extra prefill and an extra first-token step). It waits only while traffic comes in bursts: when the last
batch that started from nothing had no company within COALESCE_MAX_S, the next one starts at once, so one-at-a-
time clients never pay the window (the first burst after such a quiet spell is split once, then the window is
back). While rows decode nothing waits: arrivals join at the next step, and the inbox is drained whole before
every `next()`.

Models: which are loaded, their loading, LRU eviction and keep-alive live in residency.py (`self.models`); this
module only switches the batch generator to the model a request needs (`_activate`). The layering from the HTTP
adapters down to here is written out in residency.py's docstring.

Defaults documented for the api: max_tokens null -> min(2048, context length - prompt tokens), and an
explicit max_tokens is also capped there; temperature null -> 0 (greedy, as mlx_lm.server); unload of
a model with live rows unloads it when they finish.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import mlx.core as mx
from mlx_lm.generate import TextStateMachine, make_stop_sequences, make_text_state_machine
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

from mlxk.faults import checkpoint

from . import constrain, protocol
from .constrain import FORMAT_LLAMA3, tool_format
from .errors import BadRequest, InferenceError, Internal, ModelFailed, PromptTooLong, WorkerBusy, one_line, out_of_memory
from .protocol import GenerateRequest, ModelRef, Params
from .residency import LoadedModel, Residency
from .textout import HarmonyRouter, OutputRouter, StopFilter, is_harmony

if TYPE_CHECKING:  # prefixcache imports mlx at the top; the engine imports it only where it runs (its own rule)
    from .prefixcache import PrefixCache

log = logging.getLogger("mlxk.inference.engine")

IDLE_POLL_S = 0.1          # how long the idle loop blocks on the inbox before checking keep-alive timers
STEP_BUDGET_S = 0.5        # longest run of decode steps before the loop looks at timers again
# A batch starting from nothing waits this long after the latest arrival for more requests to share its prefill,
# and never longer than COALESCE_MAX_S after the first one (see Engine._gather_arrivals). The api forwards the
# requests of a burst of parallel clients 0.1-6 ms apart on a busy 2-core machine.
COALESCE_GAP_S = 0.006
COALESCE_MAX_S = 0.025
REPETITION_CONTEXT = 20


@dataclass(eq=False)
class Ticket:
    """One generate request as the engine sees it; `events` receives its events when no custom deliver is used."""
    request: GenerateRequest
    events: "queue.Queue[dict]" = field(default_factory=queue.Queue)
    context: Any = None          # free slot for the caller (the server keeps its asyncio queue here)
    submitted_at: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    finished: bool = False


@dataclass(eq=False)
class Row:
    ticket: Ticket
    model: LoadedModel
    uid: int
    prompt_tokens: int
    cached_tokens: int
    detokenizer: Any
    stop_filter: StopFilter
    router: OutputRouter
    completion_tokens: int = 0
    first_token_at: float | None = None
    constraint: Any = None       # its GrammarProcessor when response_format or tool_choice constrains it
    reasoning_tokens: int = 0    # of completion_tokens, those inside the reasoning (usage's reasoning_tokens)
    in_reasoning: bool = False   # the last token was reasoning: a token that shows nothing (a held or hidden
                                 # marker, </think> itself) continues it


@dataclass
class Counters:
    requests_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    cached_prompt_tokens_total: int = 0


def _normalize_messages(messages: list) -> list:
    """OpenAI messages -> what chat templates expect: string content, tool-call arguments as objects."""
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("every message needs a string \"role\"")
        message = copy.deepcopy(message)
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequest("only text content parts are supported")
                parts.append(part["text"])
            message["content"] = "".join(parts)
        elif content is None:
            message["content"] = ""
        elif not isinstance(content, str):
            raise BadRequest("message content must be a string or a list of text parts")
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    pass  # leave it a string; a template that needs an object will say so
        out.append(message)
    return out


def _effective_tools(params: Params) -> list | None:
    """The tools as templates see them; tool_choice "none" means the model must not call tools: it does not even
    see them. Every dialect's tools pass through here, so the fields OpenAI's schema leaves optional and templates
    dereference (gpt-oss's `tool.description`, `tool.parameters.properties`) are filled: `description` "",
    `parameters` {"type": "object", "properties": {}}."""
    if not params.tools or params.tool_choice == "none":
        return None
    tools = []
    for tool in params.tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict):
            function = {**function, "description": function.get("description") or ""}
            parameters = function.get("parameters")
            if not isinstance(parameters, dict) or not parameters:
                parameters = {"type": "object", "properties": {}}
            elif parameters.get("type") == "object" and not isinstance(parameters.get("properties"), dict):
                parameters = {**parameters, "properties": {}}
            tool = {**tool, "function": {**function, "parameters": parameters}}
        tools.append(tool)
    return tools


def _merge_system_runs(messages: list) -> list | None:
    """`messages` with each run of consecutive system messages merged into one (their texts joined by a blank
    line), or None when there is no such run. For templates that know one system message and require the rest to
    alternate (Gemma: "Conversation roles must alternate"), after developer -> system or with Responses'
    `instructions` beside a developer item, or ollama's two system messages."""
    out: list = []
    for message in messages:
        if out and message["role"] == "system" and out[-1]["role"] == "system" \
                and set(message) <= {"role", "content"} and set(out[-1]) <= {"role", "content"}:
            out[-1] = {**out[-1], "content": "\n\n".join(t for t in (out[-1]["content"], message["content"]) if t)}
        else:
            out.append(message)
    return out if len(out) < len(messages) else None


def _seeded_sampler(temp: float, top_p: float, min_p: float, top_k: int, seed: int):
    """A sampler with its own PRNG key stream, so a seeded row's draws do not depend on its neighbours."""
    state = {"key": mx.random.key(seed)}

    def sampler(logprobs):
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p:
            logprobs = apply_min_p(logprobs, min_p, 1)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        key, state["key"] = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * (1 / temp), key=key)

    return sampler


class Engine:
    def __init__(
        self,
        *,
        max_loaded: int = 1,
        keep_alive_s: float = 300.0,
        max_waiting: int = 64,
        max_prompt_tokens: int | None = None,
        completion_batch_size: int = 32,
        prefill_batch_size: int = 8,
        prefill_step_size: int = 2048,
        prompt_cache_bytes: int = 4 << 30,
        coalesce_gap_s: float = COALESCE_GAP_S,
        coalesce_max_s: float = COALESCE_MAX_S,
        deliver: Callable[[list], None] | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        self.max_waiting = max_waiting
        self.max_prompt_tokens = max_prompt_tokens
        self.completion_batch_size = completion_batch_size
        self.prefill_batch_size = prefill_batch_size
        self.prefill_step_size = prefill_step_size
        self.prompt_cache_bytes = prompt_cache_bytes
        self.coalesce_gap_s = coalesce_gap_s
        self.coalesce_max_s = coalesce_max_s
        self._deliver = deliver or self._deliver_to_queues
        self.prefix_cache = prefix_cache   # the disk tier below every model's memory LRU (prefixcache.py); None: off

        self.counters = Counters()
        self.peak_batch_rows = 0   # most rows that got a token in one decode step: proof of batching
        self._lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._cancels: deque = deque()
        self._n_waiting = 0
        self._waiting: deque[Ticket] = deque()
        self.models = Residency(max_loaded=max_loaded, keep_alive_s=keep_alive_s,
                                prompt_cache_bytes=prompt_cache_bytes, lock=self._lock, on_unload=self._unloading)
        self._active: LoadedModel | None = None
        self._generator = None
        self._rows: dict[int, Row] = {}
        self._outgoing: list = []
        self._samplers: dict = {}
        self._stopping = False
        self._failed = False
        self._thread: threading.Thread | None = None
        self.last_activity = time.time()
        self._expect_burst = True      # did the last batch started from nothing get company? (see _gather_arrivals)
        self._burst_origin: float | None = None   # when that batch's first request was submitted

    # ---- public, any thread -------------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Run the loop on a new thread (in-process use and tests)."""
        self._thread = threading.Thread(target=self.run, name="mlxk-mlx", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Fail in-flight requests with a retryable error, unload everything, end the loop."""
        self.request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def request_stop(self) -> None:
        """Ask the loop to end (safe from a signal handler): it fails what is in flight and returns."""
        self._stopping = True
        self._inbox.put(("wake",))

    @property
    def alive(self) -> bool:
        return not self._stopping and not self._failed

    def submit(self, request: GenerateRequest, *, context: Any = None) -> Ticket:
        """Queue a generate request; raises WorkerBusy when the waiting queue is full or the engine stops."""
        if not self.alive:
            raise WorkerBusy("the inference worker is shutting down; retry")
        with self._lock:
            if self._n_waiting >= self.max_waiting:
                raise WorkerBusy(f"the inference worker is busy: {self._n_waiting} requests are already waiting")
            self._n_waiting += 1
        ticket = Ticket(request=request, context=context)
        self.last_activity = time.time()
        self._inbox.put(("generate", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop the request: a queued one is skipped, a running row leaves the batch at the next step."""
        if ticket.finished or ticket.cancelled:
            return
        ticket.cancelled = True
        self._cancels.append(ticket)
        self._inbox.put(("wake",))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn on the MLX thread (load, unload): the only thread that may touch models."""
        future: Future = Future()
        if not self.alive:
            future.set_exception(WorkerBusy("the inference worker is shutting down; retry"))
            return future
        self._inbox.put(("call", fn, future))
        return future

    def load(self, ref: ModelRef, keep_alive: float | None = None) -> Future:
        return self.call(lambda: self.models.load_op(ref, keep_alive))

    def unload(self, model: str | None = None) -> Future:
        return self.call(lambda: self.models.unload_op(model))

    @property
    def busy(self) -> bool:
        return bool(self._rows) or self._n_waiting > 0

    def status(self) -> dict:
        models = self.models.snapshot()
        running = sum(m["running"] for m in models)
        with self._lock:
            waiting = self._n_waiting
        return {
            "event": protocol.EV_STATUS, "pid": os.getpid(), "models": models, "running": running,
            "waiting": waiting, "counters": {**vars(self.counters)}, "peak_memory_bytes": int(mx.get_peak_memory()),
            "peak_batch_rows": self.peak_batch_rows,
            **({"prefix_cache": self.prefix_cache.stats()} if self.prefix_cache is not None else {}),
        }

    # ---- the MLX thread --------------------------------------------------------------------------------------

    def run(self) -> bool:
        """The loop, on the calling thread, until stop; False when it died of an unexpected error.

        The worker process runs this on its main thread: MLX's CPU backend may abort at exit when
        compiled kernels were used on another thread (ml-explore/mlx#3126).
        """
        # Streams are per thread: make ours here and hand it to every BatchGenerator (as mlx_lm.server does).
        self._stream = mx.default_stream(mx.default_device())
        try:
            while not self._stopping:
                fresh = not self._rows
                self._drain_inbox(block=fresh)
                if self._stopping:
                    break
                self._apply_cancels()
                self._schedule()
                if fresh and self._rows:
                    self._gather_arrivals()
                self._flush()
                if self._rows:
                    self._decode()
                self.models.expire(self._wanted)
        except BaseException:  # the supervisor of the MLX thread: log, fail everyone, let the process exit
            log.exception("the MLX generation loop died")
            self._failed = True
            self._stopping = True
            self._fail_everyone(Internal("the inference worker's generation loop died"))
            return False
        self._fail_everyone(WorkerBusy("the inference worker is shutting down; retry"))
        self._close_generator()
        self.models.unload_all()
        return True

    def _gather_arrivals(self) -> None:
        """A batch just started from nothing: let requests arriving within a few ms share its first prefill."""
        submitted = [row.ticket.submitted_at for row in self._rows.values()]
        latest, cap = max(submitted), min(submitted) + self.coalesce_max_s
        wait = self._expect_burst or len(submitted) > 1
        self._burst_origin, self._expect_burst = min(submitted), len(submitted) > 1  # _admit sets it on company
        while wait and not self._stopping:
            remaining = min(latest + self.coalesce_gap_s, cap) - time.perf_counter()
            if remaining <= 0:
                break
            try:
                item = self._inbox.get(timeout=remaining)
            except queue.Empty:
                break
            self._handle_inbox(item)
            if item[0] == "generate":
                latest = max(latest, item[1].submitted_at)
        self._drain_inbox(block=False)  # whatever came during a slow admission (a model load) joins too
        self._apply_cancels()
        self._schedule()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_POLL_S) if block and not self._waiting else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle_inbox(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle_inbox(self, item: tuple) -> None:
        kind = item[0]
        if kind == "generate":
            self._waiting.append(item[1])
        elif kind == "call":
            _, fn, future = item
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except InferenceError as e:
                future.set_exception(e)
            except Exception as e:  # a control op failed: report it to its caller, keep serving
                log.exception("control operation failed")
                future.set_exception(Internal(one_line(e)))

    def _apply_cancels(self) -> None:
        if not self._cancels:
            return
        cancelled = set()
        while self._cancels:
            cancelled.add(self._cancels.popleft())
        uids = [uid for uid, row in self._rows.items() if row.ticket in cancelled]
        if uids:
            self._remove_rows(uids)
        for uid in uids:
            row = self._rows.pop(uid)
            row.ticket.finished = True
            self._row_ended(row)
            log.info("request %s cancelled after %d tokens", row.ticket.request.id, row.completion_tokens)

    def _remove_rows(self, uids: list[int]) -> None:
        """Take rows out of the batch, keeping what they computed as a prompt cache entry."""
        caches = self._generator.remove(uids, return_prompt_caches=True)
        for uid, (cache, tokens) in caches.items():
            row = self._rows.get(uid)
            if row is not None and cache and tokens:
                self._store_cache(row.model, list(tokens), cache)

    def _schedule(self) -> None:
        while self._waiting:
            ticket = self._waiting[0]
            if ticket.cancelled:
                self._pop_waiting()
                continue
            key = ticket.request.model.key
            if self._active is not None and self._active.key != key and self._rows:
                return  # another model's batch is running: switch once it drained (FIFO, as mlx_lm.server)
            if len(self._rows) >= self.completion_batch_size:
                return
            self._pop_waiting()
            try:
                self._admit(ticket)
            except InferenceError as e:
                self._finish_with_error(ticket, e)
            except Exception as e:  # one bad request must not take the loop down
                log.exception("request %s failed", ticket.request.id)
                self._finish_with_error(ticket, Internal(one_line(e)))

    def _pop_waiting(self) -> Ticket:
        ticket = self._waiting.popleft()
        with self._lock:
            self._n_waiting -= 1
        return ticket

    def _admit(self, ticket: Ticket) -> None:
        checkpoint("inference.admit")  # tests hold the MLX thread here, like a long prefill (mlxk.faults)
        request = ticket.request
        params = request.params
        origin = self._burst_origin
        if origin is not None and 0 < ticket.submitted_at - origin <= self.coalesce_max_s:
            self._expect_burst = True  # company for a batch that started from nothing, caught or missed
        lm = self._activate(request.model, params.keep_alive)
        tokens = self._tokenize(lm, request)
        n = len(tokens)
        if n == 0:
            raise BadRequest("the prompt is empty")
        what = "messages" if request.kind == "chat" else "prompt"
        if lm.context_length is not None and n >= lm.context_length:
            raise PromptTooLong(f"This model's maximum context length is {lm.context_length} tokens. However, your "
                                f"{what} resulted in {n} tokens. Please reduce the length of the {what}.",
                                prompt_tokens=n)
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise PromptTooLong(f"This model's maximum context length is {self.max_prompt_tokens} tokens on this "
                                f"server (MLXK_MAX_PROMPT_TOKENS). However, your {what} resulted in {n} tokens. "
                                f"Please reduce the length of the {what}.", prompt_tokens=n)
        room = (lm.context_length - n) if lm.context_length is not None else protocol.DEFAULT_MAX_TOKENS
        max_tokens = min(params.max_tokens or protocol.DEFAULT_MAX_TOKENS, room)

        # Everything that can fail comes before insert(): a row the engine does not track would decode unseen.
        router = self._router(lm, request, tokens)
        constraint = self._constraint(lm, request, tokens)
        sampler, processors = self._sampler(params), self._logits_processors(params)
        if constraint is not None:
            processors = [*(processors or ()), constraint]
        # harmony ends a tool call with <|call|>, which gpt-oss's generation_config does not list as an EOS token
        token_stops = [*params.stop, "<|call|>"] if isinstance(router, HarmonyRouter) else params.stop
        stop_sequences = self._stop_sequences(lm, token_stops)
        cache, rest = self._fetch_cache(lm, tokens)
        cached = n - len(rest)
        (uid,) = self._generator.insert(
            [rest], max_tokens=[max_tokens], caches=[cache], all_tokens=[tokens[:cached]],
            samplers=[sampler], logits_processors=[processors], stop_sequences=[stop_sequences],
        )
        del cache
        row = Row(ticket=ticket, model=lm, uid=uid, prompt_tokens=n, cached_tokens=cached,
                  detokenizer=lm.tokenizer.detokenizer, stop_filter=StopFilter(params.stop), router=router,
                  constraint=constraint, in_reasoning=not isinstance(router, HarmonyRouter)
                  and self._initial_state(lm, request, tokens) == "reasoning")
        self._rows[uid] = row
        self._trim_prompt_cache(lm)
        self.models.started(lm)
        c = self.counters
        c.requests_total += 1
        c.prompt_tokens_total += n
        c.cached_prompt_tokens_total += cached
        self._emit(ticket, {"event": protocol.EV_ACCEPTED, "prompt_tokens": n, "cached_tokens": cached})

    # ---- the model the batch runs (residency.py loads, evicts and expires models) ---------------------------

    def _activate(self, ref: ModelRef, keep_alive: float | None) -> LoadedModel:
        """Make ref's model the one the batch generator runs (loading it if needed)."""
        lm = self.models.for_generation(ref, keep_alive)
        if self._active is not lm:
            self._close_generator()
            from mlx_lm.generate import BatchGenerator

            self._generator = BatchGenerator(
                lm.model, completion_batch_size=self.completion_batch_size,
                prefill_batch_size=self.prefill_batch_size, prefill_step_size=self.prefill_step_size,
                stream=self._stream,
            )
            self._active = lm
        return lm

    def _close_generator(self) -> None:
        if self._generator is not None:
            self._generator.close()
        self._generator = None
        self._active = None

    def _unloading(self, lm: LoadedModel) -> None:
        """Residency is about to unload lm: a batch generator holding its weights goes first."""
        if self._active is lm:
            self._close_generator()

    def _wanted(self, key: str) -> bool:
        return any(t.request.model.key == key and not t.cancelled for t in self._waiting)

    # ---- request preparation -----------------------------------------------------------------------------

    def _tokenize(self, lm: LoadedModel, request: GenerateRequest) -> list[int]:
        tokenizer = lm.tokenizer
        if request.kind == "completion":
            return list(tokenizer.encode(request.prompt))
        messages = _normalize_messages(request.messages)
        if not tokenizer.has_chat_template:
            raise BadRequest(f"{lm.key} has no chat template; use the completions endpoint")
        if "developer" not in str(tokenizer.chat_template or ""):
            for message in messages:  # OpenAI's newer name for system instructions, unknown to most templates
                if message["role"] == "developer":
                    message["role"] = "system"
        kwargs = dict(request.params.chat_template_kwargs or {})
        if tools := _effective_tools(request.params):
            kwargs["tools"] = tools
        try:
            tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        except Exception as e:  # jinja raises anything (TemplateError, TypeError...) on odd input
            # Consecutive system messages are merged only when the template refuses them: a template that
            # accepts several (Qwen, Llama 3) renders them as sent, so its prompts (and prefix caches) stay as
            # they were; one that knows a single system message (Gemma) gets them as one.
            merged = _merge_system_runs(messages)
            if merged is None:
                raise BadRequest(f"the chat template rejected the messages: {one_line(e)}") from None
            try:
                tokens = tokenizer.apply_chat_template(merged, add_generation_prompt=True, **kwargs)
            except Exception as e2:
                raise BadRequest(f"the chat template rejected the messages: {one_line(e2)}") from None
        if isinstance(tokens, dict):  # some tokenizers hand back a BatchEncoding
            tokens = tokens["input_ids"]
        return list(tokens)

    def _fetch_cache(self, lm: LoadedModel, tokens: list[int]):
        cache, rest = lm.prompt_cache.fetch_nearest_cache(lm.key, tokens)
        if cache is not None and not rest:
            # An exact hit leaves nothing to feed, and insert() refuses an empty prompt: give back one token.
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = tokens[-1:]
            else:
                cache, rest = None, tokens
        if self.prefix_cache is not None:  # the disk tier, when it holds a longer prefix than memory
            stored = self.prefix_cache.lookup(lm.key, tokens, have=len(tokens) - len(rest))
            if stored is not None:
                cache, n = stored
                rest = tokens[n:]
        return cache, list(rest)

    def _store_cache(self, lm: LoadedModel, tokens: list[int], cache) -> None:
        if lm.prompt_cache is not None and tokens:
            if self.prefix_cache is not None:  # slices the new blocks here; the file I/O runs on its writer thread
                self.prefix_cache.store(lm.key, tokens, cache)
            lm.prompt_cache.insert_cache(lm.key, tokens, cache, cache_type="assistant")

    def _trim_prompt_cache(self, lm: LoadedModel) -> None:
        live = self._generator.prompt_cache_nbytes if self._generator is not None else 0
        lm.prompt_cache.trim_to(n_bytes=self.prompt_cache_bytes - live)

    def _sampler(self, params: Params):
        """Equal settings share one sampler object, which lets BatchGenerator sample the batch in one call."""
        temp = float(params.temperature or 0.0)
        top_p = float(params.top_p) if params.top_p is not None else 0.0
        min_p = float(params.min_p) if params.min_p is not None else 0.0
        top_k = int(params.top_k) if params.top_k is not None else 0
        if temp > 0 and params.seed is not None:
            return _seeded_sampler(temp, top_p, min_p, top_k, params.seed)
        key = (temp, top_p, min_p, top_k) if temp > 0 else 0.0
        sampler = self._samplers.get(key)
        if sampler is None:
            sampler = make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
            if len(self._samplers) > 256:
                self._samplers.clear()
            self._samplers[key] = sampler
        return sampler

    @staticmethod
    def _logits_processors(params: Params):
        repetition = params.repetition_penalty if params.repetition_penalty != 1.0 else None
        if repetition is None and not params.presence_penalty and not params.frequency_penalty:
            return None

        return make_logits_processors(
            None, repetition, REPETITION_CONTEXT,
            presence_penalty=params.presence_penalty, presence_context_size=protocol.PENALTY_CONTEXT,
            frequency_penalty=params.frequency_penalty, frequency_context_size=protocol.PENALTY_CONTEXT)

    def _stop_sequences(self, lm: LoadedModel, stops: list[str]):
        """Token-level stops (every EOS id, and each stop string's own tokens), cached per stop set."""
        key = tuple(stops)
        seqs = lm.stop_sequences.get(key)
        if seqs is None:
            seqs = make_stop_sequences(lm.tokenizer, list(stops))
            if len(lm.stop_sequences) > 100:
                lm.stop_sequences.clear()
            lm.stop_sequences[key] = seqs
        return seqs

    @staticmethod
    def _initial_state(lm: LoadedModel, request: GenerateRequest, tokens: list[int]) -> str:
        """Where the reply starts: "reasoning" when the prompt leaves a think block open."""
        tokenizer = lm.tokenizer
        initial = "normal"
        if tokenizer.has_thinking and request.kind == "chat":
            if tokenizer.rfind_think_start(tokens) > tokenizer.rfind_think_end(tokens):
                initial = "reasoning"
        return getattr(tokenizer, "response_initial_state", None) or initial

    def _constraint(self, lm: LoadedModel, request: GenerateRequest, tokens: list[int]):
        """The row's grammar processor (constrain.py), or None when the request constrains nothing."""
        params = request.params
        try:
            spec = constrain.spec_from(params.response_format, params.tools, params.tool_choice,
                                       params.parallel_tool_calls)
            if spec is None:
                return None
            fmt = constrain.tool_format(lm.tokenizer)
            if spec.auto and not constrain.auto_supported(fmt):
                return None   # a format the grammar cannot express (Mistral's): auto calls stay as the model writes
            markers = constrain.format_markers(lm.tokenizer, fmt)
            grammar = constrain.lark_grammar(spec, fmt, markers)
            if lm.grammar_tokenizer is None:
                lm.grammar_tokenizer = constrain.grammar_tokenizer(lm.tokenizer._tokenizer, lm.eos_ids)
            reasoning = self._initial_state(lm, request, tokens) == "reasoning"
            after = tuple(lm.tokenizer.think_end_tokens or ()) if reasoning else ()
            return constrain.GrammarProcessor(lm.grammar_tokenizer, grammar, lm.eos_ids, after=after,
                                              gate=constrain.gate(spec, fmt, markers),
                                              opening=spec.auto and fmt == constrain.FORMAT_LLAMA3,
                                              rearm=fmt != constrain.FORMAT_MISTRAL,
                                              single_call=not spec.parallel,
                                              call_end=constrain.call_end(fmt, markers))
        except constrain.ConstraintError as e:
            raise BadRequest(e.message, param=e.param) from None

    def _router(self, lm: LoadedModel, request: GenerateRequest, tokens: list[int]) -> OutputRouter:
        tokenizer = lm.tokenizer

        if request.kind == "chat" and is_harmony(tokenizer):
            return HarmonyRouter(_effective_tools(request.params))
        tools = _effective_tools(request.params) if tokenizer.has_tool_calling else None
        bare = not tools and request.kind == "chat" and tool_format(tokenizer) == FORMAT_LLAMA3
        initial = self._initial_state(lm, request, tokens)
        sm = self._text_machine(lm, with_tools=bool(tools))
        return OutputRouter(sm, initial, tokenizer.tool_parser if tools else None,
                            tools or (_effective_tools(request.params) if bare else None),
                            (tokenizer.tool_call_start, tokenizer.tool_call_end), bare_json_calls=bare)

    @staticmethod
    def _text_machine(lm: LoadedModel, with_tools: bool):
        """mlx-lm's reasoning/tool state machine; None when the model has neither (plain text, no scanning)."""
        if with_tools in lm.text_machines:
            return lm.text_machines[with_tools]

        tokenizer = lm.tokenizer
        if with_tools:
            sm = make_text_state_machine(tokenizer)
        else:
            transitions: dict[str, list] = {}
            if tokenizer.has_thinking:
                transitions["normal"] = [(tokenizer.think_start, "reasoning")]
                transitions["reasoning"] = [(tokenizer.think_end, "normal")]
            for marker in tokenizer.structural_markers or ():
                transitions.setdefault("normal", []).append((marker, "normal"))
            for state, edges in tokenizer.response_transitions.items():
                kept = [(text, dst) for text, dst in edges if dst != "tool"]
                if kept and state != "tool":
                    transitions.setdefault(state, []).extend(kept)
            sm = TextStateMachine(transitions) if transitions else None
        lm.text_machines[with_tools] = sm
        return sm

    # ---- the decode loop ----------------------------------------------------------------------------------

    def _decode(self) -> None:
        """Step the batch until a request or cancel arrives, the rows end, or the time budget is spent."""
        generator = self._generator
        inbox = self._inbox
        deadline = time.perf_counter() + STEP_BUDGET_S
        while self._rows and not self._stopping:
            try:
                _, responses = generator.next()
            except Exception as e:  # the batch is one model's: fail that model's requests, serve the others
                return self._model_failed(self._active, e)
            if responses:
                self._on_tokens(responses)
                self._flush()
            if self._cancels or not inbox.empty() or time.perf_counter() > deadline:
                return

    def _on_tokens(self, responses) -> None:
        now = time.perf_counter()
        if len(responses) > self.peak_batch_rows:
            self.peak_batch_rows = len(responses)
        self.counters.generation_tokens_total += len(responses)
        text_stopped = []
        for r in responses:
            row = self._rows.get(r.uid)
            if row is None:
                continue
            row.completion_tokens += 1
            if row.first_token_at is None:
                row.first_token_at = now
            finish = r.finish_reason   # mlx-lm's "stop" / "length" are the protocol's words
            detok = row.detokenizer
            eos = finish == protocol.FINISH_STOP and r.token in row.model.eos_ids
            if not eos and r.token not in row.model.hidden_ids:
                # A stop string's last token becomes text too: its earlier tokens may hold the first bytes of one
                # multi-byte character, so the stop filter cuts on characters, never between bytes (no U+FFFD).
                detok.add_token(r.token)
            if finish is not None:
                detok.finalize()
            text, matched = row.stop_filter.push(detok.last_segment)
            if matched:
                finish = protocol.FINISH_STOP
            elif finish == protocol.FINISH_STOP and not eos:
                text = ""  # a stop matched on tokens, not in the text (a tokenizer decoding it otherwise): never leak it
                row.stop_filter.matched_on_tokens()
            elif finish is not None and (finish == protocol.FINISH_LENGTH or r.token in row.model.eos_ids):
                text += row.stop_filter.flush()
            delta = row.router.feed(text)
            if finish is not None:
                _merge_delta(delta, row.router.finish())
            _count_reasoning(row, delta)
            if delta:
                self._emit(row.ticket, {"event": protocol.EV_DELTA, **delta})
            if finish is None:
                continue
            if r.finish_reason is None:
                text_stopped.append(r.uid)  # still in the batch: take it out below
            elif r.prompt_cache is not None:
                self._store_cache(row.model, list(r.all_tokens), r.prompt_cache)
            self._finish_row(row, finish, now)
        if text_stopped:
            self._remove_rows(text_stopped)
            for uid in text_stopped:
                self._rows.pop(uid, None)
        for r in responses:
            if r.finish_reason is not None:
                self._rows.pop(r.uid, None)

    def _model_failed(self, lm: LoadedModel, error: Exception) -> None:
        """A decode step of lm's batch raised: fail its rows and its queued requests, unload it, keep the loop."""
        log.exception("generation with %s failed; unloading it", lm.key)
        if out_of_memory(error):
            failure = WorkerBusy(f"not enough memory to generate with {lm.key} ({one_line(error)}); retry")
        else:
            failure = ModelFailed(lm.key, f"failed while generating: {one_line(error)}")
        for row in self._rows.values():
            row.ticket.finished = True
            self._emit(row.ticket, failure.to_event())
        self._rows.clear()
        # Queued requests for it would only load it again to fail the same way.
        for ticket in [t for t in self._waiting if t.request.model.key == lm.key]:
            self._waiting.remove(ticket)
            with self._lock:
                self._n_waiting -= 1
            self._finish_with_error(ticket, failure)
        self.models.stopped_running(lm)
        try:
            self.models.unload(lm.key)  # closes the generator too: its state after the failed step is unknown
        except Exception:  # a generator that cannot even close after the failure: drop it and the model anyway
            log.exception("closing %s after its failure failed", lm.key)
            self._generator = self._active = None
            self.models.drop(lm.key)
        self._flush()

    def _finish_row(self, row: Row, finish: str, now: float) -> None:
        if finish == protocol.FINISH_STOP and row.router.made_tool_call:
            finish = protocol.FINISH_TOOL_CALLS
        ttft = (row.first_token_at or now) - row.ticket.submitted_at
        decode_s = now - row.first_token_at if row.first_token_at else 0.0
        rate = (row.completion_tokens - 1) / decode_s if row.completion_tokens > 1 and decode_s > 0 else 0.0
        self._emit(row.ticket, {
            "event": protocol.EV_DONE, "finish_reason": finish,
            **({"stop_sequence": row.stop_filter.matched} if row.stop_filter.matched else {}),
            "usage": {
                "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
                "total_tokens": row.prompt_tokens + row.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": row.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": row.reasoning_tokens},
            },
            "timings": {"ttft_s": round(ttft, 6), "decode_tokens_per_s": round(rate, 3)},
        })
        row.ticket.finished = True
        self._row_ended(row)

    def _row_ended(self, row: Row) -> None:
        self.last_activity = self.models.ended(row.model)

    # ---- events -------------------------------------------------------------------------------------------

    def _emit(self, ticket: Ticket, event: dict) -> None:
        if not ticket.cancelled:
            self._outgoing.append((ticket, event))

    def _flush(self) -> None:
        if self._outgoing:
            batch, self._outgoing = self._outgoing, []
            self._deliver(batch)

    @staticmethod
    def _deliver_to_queues(batch: list) -> None:
        for ticket, event in batch:
            ticket.events.put(event)

    def _finish_with_error(self, ticket: Ticket, error: InferenceError) -> None:
        ticket.finished = True
        self._emit(ticket, error.to_event())
        self._flush()

    def _fail_everyone(self, error: InferenceError) -> None:
        for row in list(self._rows.values()):
            row.ticket.finished = True
            self._emit(row.ticket, error.to_event())
        self._rows.clear()
        while self._waiting:
            self._finish_with_error(self._pop_waiting(), error)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] == "generate":
                with self._lock:
                    self._n_waiting -= 1
                self._finish_with_error(item[1], error)
            elif item[0] == "call":
                item[2].set_exception(error)
        self._flush()
        self.models.stopped_running()


def _count_reasoning(row: Row, delta: dict) -> None:
    """Count the token just routed as reasoning when it showed reasoning, or showed nothing inside the reasoning
    (OpenAI's usage.completion_tokens_details.reasoning_tokens: the completion tokens spent thinking)."""
    if delta.get("reasoning") or (not delta and row.in_reasoning):
        row.reasoning_tokens += 1
    if delta:
        row.in_reasoning = bool(delta.get("reasoning")) and not (delta.get("content") or delta.get("tool_calls"))


def _merge_delta(delta: dict, more: dict) -> None:
    for name, value in more.items():
        if name == "tool_calls":
            delta.setdefault("tool_calls", []).extend(value)
        else:
            delta[name] = delta.get(name, "") + value
