"""Embeddings in the inference worker: the `embed` op, batched across requests.

Which code computes them: decoder-LM embedders (Qwen3-Embedding, gte-Qwen, e5-mistral: what mlx-community publishes
most) load as mlx-lm models, the engine's loader; their vector is the final hidden state of the last token
(last-token pooling, as Qwen3-Embedding defines it). BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa: most
sentence-transformers models) run on encoder.py, pooled as their sentence-transformers config says (mean, CLS, ...);
its docstring says why that is not mlx-embeddings. Every vector is L2-normalized. Residency (residency.py) picks the
code by config.json's model_type and loads, evicts and keeps alive both kinds like any model.

Batching: requests arrive on the socket thread and wait in `pending`; one flush runs on the MLX thread (through
Engine.call, so generation and embedding never touch MLX at once) and takes everything pending for a model, so
requests that arrive while the thread is busy go through one padded forward pass together. Inputs are padded on
the right, and pooling counts real tokens only: a decoder's causal attention never lets a real token see the padding
after it; an encoder gets the attention mask. So a text's vector does not depend on what it was batched with.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import mlx.core as mx

from mlxk.faults import checkpoint
from .encoder import pool
from .errors import BadRequest, InferenceError, Internal, ModelFailed, PromptTooLong
from .protocol import EV_EMBEDDINGS, ModelRef, ProtocolError, parse_model_ref

log = logging.getLogger("mlxk.inference.embed")

MAX_INPUTS = 2048          # OpenAI's limit on inputs per request
MAX_BATCH_TOKENS = 16384   # one forward pass holds at most this many (padded) tokens; more run as several


@dataclass
class EmbedRequest:
    model: ModelRef
    inputs: list            # strings or lists of token ids
    dimensions: int | None = None
    keep_alive: float | None = None
    truncate: bool = False  # cut an input longer than the context to it (Ollama's default); else PromptTooLong
    future: Future = field(default_factory=Future)


def parse_embed(message: dict) -> EmbedRequest:
    inputs = message.get("inputs")
    if not isinstance(inputs, list) or not inputs or len(inputs) > MAX_INPUTS:
        raise ProtocolError(f'"inputs" must be a list of 1 to {MAX_INPUTS} strings or token-id lists')
    for item in inputs:
        ok = isinstance(item, str) or (isinstance(item, list) and item and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item))
        if not ok:
            raise ProtocolError('each of "inputs" must be a string or a non-empty list of token ids')
    dimensions = message.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise ProtocolError('"dimensions" must be a positive integer or null')
    keep_alive = message.get("keep_alive")
    if keep_alive is not None and (isinstance(keep_alive, bool) or not isinstance(keep_alive, (int, float))):
        raise ProtocolError('"keep_alive" must be a number or null')
    truncate = message.get("truncate", False)
    if not isinstance(truncate, bool):
        raise ProtocolError('"truncate" must be a boolean')
    return EmbedRequest(parse_model_ref(message.get("model")), inputs, dimensions, keep_alive, truncate)


class Embedder:
    """Collects embed requests and runs them in batches on the engine's MLX thread."""

    def __init__(self, engine):
        self.engine = engine
        self._pending: list[EmbedRequest] = []
        self._lock = threading.Lock()
        self.batches = 0
        self.peak_batch_inputs = 0   # most inputs that went through one forward pass: evidence of batching
        self.cancelled = 0           # requests whose client left before their vectors came

    async def embed(self, message: dict) -> dict:
        request = parse_embed(message)
        with self._lock:
            self._pending.append(request)
            first = len(self._pending) == 1
        if first:  # one flush per burst; requests that come while it waits for the MLX thread join it
            self.engine.call(self._flush).add_done_callback(self._flushed)
        try:
            return await asyncio.wrap_future(request.future)  # cancelling this cancels request.future too
        except asyncio.CancelledError:  # its client left: a request still pending never reaches a batch
            with self._lock:
                self._pending = [r for r in self._pending if r is not request]
                self.cancelled += 1
            raise

    def _flushed(self, done: Future) -> None:
        """A flush that could not run (the engine is stopping) or broke: no request may wait forever."""
        error = done.exception()
        if error is None:
            return
        with self._lock:
            stranded, self._pending = self._pending, []
        failure = error if isinstance(error, InferenceError) else Internal(str(error))
        for request in stranded:
            if not request.future.done():
                _settle(request, error=failure)

    def stats(self) -> dict:
        with self._lock:
            waiting = len(self._pending)
        return {"embed_batches_total": self.batches, "embed_peak_batch_inputs": self.peak_batch_inputs,
                "embed_waiting": waiting, "embed_cancelled_total": self.cancelled}

    # ---- on the MLX thread -----------------------------------------------------------------------------------

    def _flush(self) -> None:
        checkpoint("embed.flush")  # tests hold the MLX thread here while requests pile up
        with self._lock:
            taken, self._pending = self._pending, []
        taken = [request for request in taken if not request.future.done()]  # cancelled by a client that left
        by_model: dict[str, list[EmbedRequest]] = {}
        for request in taken:
            by_model.setdefault(request.model.key, []).append(request)
        try:
            for requests in by_model.values():
                self._run(requests)
        finally:  # a bug above must not leave a request waiting forever
            for request in taken:
                if not request.future.done():
                    _settle(request, error=Internal("the embedding batch failed; see the worker log"))

    def _run(self, requests: list[EmbedRequest]) -> None:
        try:
            lm = self.engine.models.for_embedding(requests[0].model, requests[0].keep_alive)
        except Exception as error:  # noqa: BLE001 — the load's own error, to each of its requests
            failure = error if isinstance(error, InferenceError) else Internal(str(error))
            for request in requests:
                _settle(request, error=failure)
            return
        ready = []
        for request in requests:
            try:
                ready.append((request, self._tokens(lm, request)))
            except InferenceError as error:  # this request's input is at fault, not the others'
                _settle(request, error=error)
        rows = [tokens for _, request_tokens in ready for tokens in request_tokens]
        try:
            vectors = self._vectors(lm, rows)
        except Exception as error:  # noqa: BLE001 — the model failed computing: fail its requests
            failure = ModelFailed(lm.key, f"failed while embedding: {error}")
            for request, _ in ready:
                _settle(request, error=failure)
            return
        at = 0
        for request, tokens in ready:
            mine = vectors[at:at + len(tokens)]
            at += len(tokens)
            try:
                _settle(request, result={"event": EV_EMBEDDINGS, "embeddings": _shorten(mine, request.dimensions),
                                           "prompt_tokens": sum(len(t) for t in tokens)})
            except BadRequest as error:
                _settle(request, error=error)

    @staticmethod
    def _tokens(lm, request: EmbedRequest) -> list[list[int]]:
        out = []
        vocab = lm.model.args.vocab_size if hasattr(lm.model, "args") else None
        for i, item in enumerate(request.inputs):
            tokens = lm.tokenizer.encode(item) if isinstance(item, str) else list(item)
            if not tokens:
                raise BadRequest(f"input {i} is empty: there is nothing to embed", param=f"input[{i}]")
            if vocab and max(tokens) >= vocab:
                raise BadRequest(f"input {i} has token id {max(tokens)}; this model's vocabulary has {vocab}",
                                 param=f"input[{i}]")
            if lm.context_length and len(tokens) > lm.context_length:
                if not request.truncate:
                    raise PromptTooLong(f"input {i} has {len(tokens)} tokens; this model's maximum context length "
                                        f"is {lm.context_length} tokens", param=f"input[{i}]")
                tokens = _truncate(tokens, lm.context_length, _closing_ids(lm.tokenizer) if isinstance(item, str)
                                   else ())
            out.append(tokens)
        return out

    def _vectors(self, lm, rows: list[list[int]]) -> list[list[float]]:
        forward = self._forward(lm)
        pad = lm.model.args.pad_token_id if lm.encoder else 0
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths pad less
        results: dict[int, list[float]] = {}
        start = 0
        while start < len(order):
            end = start + 1  # ascending lengths: the last row taken sets the padded width
            while end < len(order) and (end - start + 1) * len(rows[order[end]]) <= MAX_BATCH_TOKENS:
                end += 1
            chunk = order[start:end]
            width = max(len(rows[i]) for i in chunk)
            padded = mx.array([rows[i] + [pad] * (width - len(rows[i])) for i in chunk])
            lengths = mx.array([len(rows[i]) for i in chunk])
            mask = mx.arange(width)[None, :] < lengths[:, None]               # (batch, width): real tokens
            pooled = pool(forward(padded, mask), mask, lengths, lm.pooling)   # (batch, hidden) float32
            mx.eval(pooled)
            for i, vector in zip(chunk, pooled.tolist()):
                results[i] = vector
            self.batches += 1
            self.peak_batch_inputs = max(self.peak_batch_inputs, len(chunk))
            start = end
        return [results[i] for i in range(len(rows))]

    @staticmethod
    def _forward(lm):
        """(padded ids, mask) -> hidden states: an encoder masks the padding (its attention looks both ways); a
        decoder's causal attention never lets a real token see the padding after it, so it needs no mask."""
        if lm.encoder:
            return lm.model
        body = getattr(lm.model, "model", None)
        if body is None:
            raise ValueError("mlx-lm gives no hidden states for this model type")
        return lambda padded, mask: body(padded)


def _closing_ids(tokenizer) -> tuple[int, ...]:
    """The special tokens a tokenizer appends to a text ([SEP] for BERT, </s> for RoBERTa/XLM-R, EOS for decoder
    embedders that add one)."""
    ids = (getattr(tokenizer, "sep_token_id", None), getattr(tokenizer, "eos_token_id", None))
    return tuple(i for i in ids if isinstance(i, int))


def _truncate(tokens: list[int], limit: int, closing: tuple[int, ...]) -> list[int]:
    """The first `limit` tokens; a closing special token the tokenizer appended stays last, as Hugging Face's
    `truncation=True` keeps [CLS] ... [SEP] (Ollama's `truncate: true` likewise cuts to the context length)."""
    if tokens[-1] in closing and limit >= 2:
        return tokens[:limit - 1] + [tokens[-1]]
    return tokens[:limit]


def _settle(request: EmbedRequest, *, result: dict | None = None, error: BaseException | None = None) -> None:
    """Give the request its vectors or its error, unless its client cancelled it meanwhile (the future is done)."""
    try:
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)
    except InvalidStateError:
        pass


def _shorten(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """Matryoshka truncation to `dimensions` (Qwen3-Embedding is trained for it), then L2 normalization."""
    if dimensions is not None and vectors and dimensions > len(vectors[0]):
        raise BadRequest(f"dimensions {dimensions} is more than this model's {len(vectors[0])}", param="dimensions")
    out = []
    for vector in vectors:
        cut = vector[:dimensions] if dimensions else vector
        norm = sum(x * x for x in cut) ** 0.5 or 1.0
        out.append([x / norm for x in cut])
    return out
