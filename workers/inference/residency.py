"""Model residency in the inference worker: which models are loaded, loading and probing them, LRU eviction, keep-alive.

Why a module of its own: the engine's batching loop (engine.py) and the embedding batches (embed.py) both need "the
loaded model for this ref", and neither should know how a model is found on disk, checked, evicted or expired. This
module answers that one question; it never sees a request, a row or a batch generator. The engine tells it which
models are still wanted (`expire(wanted)`) and learns of an unload through `on_unload` (it closes its batch
generator when the active model goes).

Layering of the serving path, each layer talking only to the one below it:
  adapters       mlxk/server/routes/*      one translation module per dialect (OpenAI, Anthropic, Responses, Ollama)
  generation     mlxk/server/generation.py the one small generation interface every adapter calls
  supervisor     mlxk/server/supervisor.py + workers/inference/protocol.py: the api process's client of the worker
  worker server  workers/inference/server.py  the socket, one handler per request
  engine         workers/inference/engine.py  the MLX thread's batching loop (embed.py: embedding batches)
  residency      workers/inference/residency.py  this module: loaded models and their lifetimes

Threads: everything here runs on the engine's MLX thread (the only thread that may touch models), except
`snapshot()`, which any thread may call; the dict of models and each model's `running` count change under `lock`,
which the engine shares.
"""
from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache
from mlx_lm.utils import load

from mlxk.detect import context_length  # the one definition `show` and the engine share

from . import encoder, protocol
from .errors import BadRequest, LoadFailed, ModelFailed, WorkerBusy, one_line, out_of_memory
from .protocol import ModelRef

log = logging.getLogger("mlxk.inference.residency")

PROMPT_CACHE_ENTRIES = 10  # per model, like mlx_lm.server's default


@dataclass(eq=False)
class LoadedModel:
    ref: ModelRef
    model: Any
    tokenizer: Any
    context_length: int | None
    memory_bytes: int
    eos_ids: frozenset
    hidden_ids: frozenset        # special tokens that never reach the text (template markers)
    keep_alive_s: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    running: int = 0
    unload_when_idle: bool = False
    prompt_cache: Any = None
    stop_sequences: dict = field(default_factory=dict)
    text_machines: dict = field(default_factory=dict)
    grammar_tokenizer: Any = None   # llguidance's view of the vocabulary, made on the first constrained request
    encoder: bool = False        # a BERT-family encoder (encoder.py): it embeds, it cannot generate
    pooling: str = "last"        # how embed.py pools its states (encoder.pool); decoders: the last token

    @property
    def key(self) -> str:
        return self.ref.key

    def expires_at(self) -> float | None:
        """When idleness unloads it; None while it runs or when its keep-alive is negative (forever)."""
        if self.running or self.keep_alive_s < 0:
            return None
        return self.last_used + self.keep_alive_s


class Residency:
    """The loaded models, least recently used first; at most `max_loaded` of them."""

    def __init__(self, *, max_loaded: int = 1, keep_alive_s: float = 300.0, prompt_cache_bytes: int = 4 << 30,
                 lock: threading.Lock | None = None, on_unload: Callable[[LoadedModel], None] | None = None):
        self.max_loaded = max(1, max_loaded)
        self.keep_alive_s = keep_alive_s
        self.prompt_cache_bytes = prompt_cache_bytes
        self.lock = lock or threading.Lock()
        self._on_unload = on_unload or (lambda lm: None)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    def __len__(self) -> int:
        return len(self._models)

    def __iter__(self) -> Iterator[LoadedModel]:
        return iter(list(self._models.values()))

    # ---- any thread -------------------------------------------------------------------------------------------

    def snapshot(self) -> list[dict]:
        """What `ps` shows: one dict per loaded model (key, path, memory_bytes, times in epoch seconds, running)."""
        with self.lock:
            return [
                {
                    "key": lm.key, "path": lm.ref.path, "memory_bytes": lm.memory_bytes,
                    "loaded_at": lm.loaded_at, "last_used": lm.last_used, "keep_alive_s": lm.keep_alive_s,
                    "expires_at": lm.expires_at(), "running": lm.running,
                }
                for lm in self._models.values()
            ]

    # ---- the MLX thread ---------------------------------------------------------------------------------------

    def for_generation(self, ref: ModelRef, keep_alive: float | None) -> LoadedModel:
        """ref's model for a generate request; its keep-alive becomes the request's (None: the server default)."""
        lm = self.ensure_loaded(ref)
        if lm.encoder:
            raise BadRequest(f"{ref.repo_id} is an embedding model: it cannot generate text; use /v1/embeddings")
        lm.keep_alive_s = self.keep_alive_s if keep_alive is None else float(keep_alive)
        lm.unload_when_idle = lm.keep_alive_s == 0
        return lm

    def for_embedding(self, ref: ModelRef, keep_alive: float | None) -> LoadedModel:
        """The loaded model an embed batch runs on (embed.py): loaded, evicted and kept alive like any other, so
        `ps` shows it and max_loaded counts it."""
        lm = self.ensure_loaded(ref)
        if keep_alive is not None:
            lm.keep_alive_s = float(keep_alive)
            lm.unload_when_idle = lm.keep_alive_s == 0
        lm.last_used = time.time()
        return lm

    def started(self, lm: LoadedModel) -> None:
        """A row of lm joined the batch: it may not be evicted or expire until `ended`."""
        with self.lock:
            lm.running += 1
        lm.last_used = time.time()

    def ended(self, lm: LoadedModel) -> float:
        """A row of lm left the batch; returns the time its keep-alive counts from."""
        with self.lock:
            lm.running -= 1
        lm.last_used = time.time()
        return lm.last_used

    def stopped_running(self, lm: LoadedModel | None = None) -> None:
        """Every row of lm (of every model when None) was failed at once: none of them runs any more."""
        with self.lock:
            for m in ([lm] if lm is not None else self._models.values()):
                m.running = 0

    def ensure_loaded(self, ref: ModelRef) -> LoadedModel:
        lm = self._models.get(ref.key)
        if lm is not None and lm.ref.path == ref.path:
            with self.lock:
                self._models.move_to_end(ref.key)
            return lm
        if lm is not None:  # same key, another path: the snapshot moved; reload from the new place
            self.unload(ref.key)
        while len(self._models) >= self.max_loaded:
            victim = next((m for m in self._models.values() if m.running == 0), None)
            if victim is None:
                raise WorkerBusy(f"all {len(self._models)} loaded models are busy; retry")
            log.info("evicting %s (least recently used) to load %s", victim.key, ref.key)
            self.unload(victim.key)
        lm = self._load(ref)
        with self.lock:
            self._models[ref.key] = lm
        return lm

    def _load(self, ref: ModelRef) -> LoadedModel:
        path = Path(ref.path)
        # mlx_lm would take a missing path for a Hub repo id and download it: never from the worker.
        if not path.is_dir():
            raise LoadFailed(f"cannot load {ref.key}: {ref.path} is not a directory", status=400)
        if not (path / "config.json").is_file():
            raise LoadFailed(f"cannot load {ref.key}: no config.json in {ref.path}", status=400)


        started = time.perf_counter()
        config = _read_config(path)
        try:
            if encoder.serves(config):
                model, tokenizer, pooling = encoder.load(path, config)
            else:
                model, tokenizer, config = load(str(path), return_config=True)
                self._probe(model)
        except Exception as e:  # any loader failure is this model's fault: its requests fail, nobody else's
            log.warning("loading %s failed: %s", ref.key, one_line(e))
            if out_of_memory(e):  # the machine's state, not the model's: retryable, and no verdict on the model
                raise WorkerBusy(f"not enough memory to load {ref.key} ({one_line(e)}); unload other models "
                                 "(mlxk stop) or retry") from None
            raise ModelFailed(ref.key, f"failed while loading: {one_line(e)}") from None
        memory = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        if encoder.serves(config):
            lm = LoadedModel(ref=ref, model=model, tokenizer=tokenizer, context_length=model.args.context_length,
                             memory_bytes=memory, eos_ids=frozenset(), hidden_ids=frozenset(),
                             keep_alive_s=self.keep_alive_s, encoder=True, pooling=pooling)
            log.info("loaded encoder %s (%s pooling) from %s in %.2fs (%.1f MB)", ref.key, pooling, ref.path,
                     time.perf_counter() - started, memory / 1e6)
            return lm
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        markers = set()
        for seq in (tokenizer.think_start_tokens, tokenizer.think_end_tokens,
                    tokenizer.tool_call_start_tokens, tokenizer.tool_call_end_tokens):
            markers.update(seq or ())
        lm = LoadedModel(
            ref=ref, model=model, tokenizer=tokenizer, context_length=context_length(config),
            memory_bytes=memory, eos_ids=frozenset(tokenizer.eos_token_ids),
            hidden_ids=frozenset(special - markers), keep_alive_s=self.keep_alive_s,
            prompt_cache=LRUPromptCache(max_size=PROMPT_CACHE_ENTRIES, max_bytes=self.prompt_cache_bytes),
        )
        log.info("loaded %s from %s in %.2fs (%.1f MB)", ref.key, ref.path, time.perf_counter() - started,
                 memory / 1e6)
        return lm

    def _probe(self, model) -> None:
        """One forward pass over one token, so weights that load but cannot compute (float weights stored as
        integers, a broken conversion) fail here, as this model's load error, before any request is accepted."""

        logits = model(mx.array([[0]]), cache=make_prompt_cache(model))  # the call generation makes
        mx.eval(logits)
        if not mx.issubdtype(logits.dtype, mx.floating):
            raise ValueError(f"the forward pass gives {logits.dtype} logits, not floating point")

    def unload(self, key: str) -> bool:

        lm = self._models.get(key)
        if lm is None:
            return False
        self._on_unload(lm)
        with self.lock:
            del self._models[key]
        lm.model = lm.tokenizer = lm.prompt_cache = None
        del lm
        gc.collect()
        mx.clear_cache()  # dropping references returns memory to MLX's pool; this gives it back to the OS
        log.info("unloaded %s", key)
        return True

    def drop(self, key: str) -> None:
        """Forget a model whose unload itself failed (after a failed decode step): no cleanup, just gone."""
        with self.lock:
            self._models.pop(key, None)

    def unload_all(self) -> None:
        for key in list(self._models):
            self.unload(key)

    def load_op(self, ref: ModelRef, keep_alive: float | None) -> dict:
        """The `load` op: ref's model resident with the given keep-alive (None: the server default)."""
        lm = self.ensure_loaded(ref)
        lm.keep_alive_s = self.keep_alive_s if keep_alive is None else float(keep_alive)
        lm.last_used = time.time()
        return {"event": protocol.EV_LOADED, "key": lm.key}

    def unload_op(self, model: str | None) -> dict:
        """The `unload` op: model (a key or a repo id; None: every model) unloaded, or once its rows finish."""
        keys = [k for k, lm in self._models.items()
                if model is None or k == model or lm.ref.repo_id == model]
        unloaded = []
        for key in keys:
            lm = self._models[key]
            if lm.running:
                lm.unload_when_idle = True  # never pull weights from under live rows
            else:
                self.unload(key)
            unloaded.append(key)
        return {"event": protocol.EV_UNLOADED, "models": unloaded}

    def expire(self, wanted: Callable[[str], bool]) -> None:
        """Unload every idle model whose keep-alive ran out, unless a queued request still wants it."""
        if not self._models:
            return
        now = time.time()
        for key, lm in list(self._models.items()):
            if lm.running or wanted(key):
                continue
            expires = lm.expires_at()
            if lm.unload_when_idle or (expires is not None and now >= expires):
                self.unload(key)


def _read_config(path: Path) -> dict | None:
    """config.json as a dict, or None when it cannot be read (the loader then says what is wrong with it)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None
