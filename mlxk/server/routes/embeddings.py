"""`POST /v1/embeddings` (OpenAI's shape), and `embed()`, which the Ollama routes share.

The vectors are computed in the inference worker (workers/inference/embed.py: decoder LMs through mlx-lm, BERT-family
encoders through encoder.py; L2-normalized, batched across requests); only models the index classifies as
`embedding` are served here. A client that hangs up before its vectors come cancels its worker request.
"""
from __future__ import annotations

import base64
import logging
import struct
import time
from dataclasses import dataclass
from typing import Literal, Optional, Union

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from mlxk import catalog
from mlxk.server.deps import ServerState, State, parse_body, require_api_key
from mlxk.server.errors import InvalidRequest
from mlxk.server.generation import CLIENT_CLOSED, HUNG_UP, naming, unless_hung_up
from mlxk.server.openai_types import READ_ERRORS, WRITE_ERRORS, error_responses, request_body
from mlxk.workers.inference import protocol

log = logging.getLogger("mlxk.server.embeddings")

router = APIRouter(dependencies=[Depends(require_api_key)], responses=error_responses(*READ_ERRORS))

MAX_INPUTS = 2048  # OpenAI's limit per request


@dataclass
class Embedded:
    model: str                # the resolved repo id
    vectors: list[list[float]]
    prompt_tokens: int
    total_s: float            # from the call to the reply
    model_row: dict


async def embed(request: Request, state: ServerState, name: str, inputs: list, *, dimensions: int | None = None,
                keep_alive: float | None = None, truncate: bool = False) -> Embedded | None:
    """Vectors for `inputs` (strings or token-id lists) from the embedding model `name`; None when the HTTP client
    hung up first (the worker request is cancelled: closing its connection drops it from the batch it waits for).
    `truncate`: an input longer than the model's context is cut to it (Ollama's default) instead of refused with
    400 context_length_exceeded (OpenAI's behaviour). A 400 names its field (`model`, `dimensions`, `input[i]`)."""
    started = time.perf_counter()
    with naming("model"):
        servable = await state.resolve(name, catalog.EMBEDDING_TYPES)
    reply = await unless_hung_up(request, state.supervisor.call({
        "op": protocol.OP_EMBED, "inputs": inputs, "dimensions": dimensions, "keep_alive": keep_alive,
        "truncate": truncate, "model": {"key": servable.key, "path": servable.path}}))
    if reply is HUNG_UP:
        log.info("client of an embedding request for %s hung up: cancelled", servable.repo_id)
        return None
    row = next((r for r in await state.model_rows() if r["repo_id"] == servable.repo_id), {})
    return Embedded(servable.repo_id, reply["embeddings"], reply["prompt_tokens"], time.perf_counter() - started,
                    row)


TokenIds = list[int]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model: str
    input: Union[str, list[str], TokenIds, list[TokenIds]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(default=None, ge=1)
    user: Optional[str] = None

    def inputs(self) -> list:
        """One list of strings or token-id lists, as the worker takes it."""
        value = self.input
        if isinstance(value, str):
            value = [value]
        elif value and all(isinstance(v, int) for v in value):
            value = [value]
        if not value or len(value) > MAX_INPUTS:
            raise InvalidRequest(f"input must hold 1 to {MAX_INPUTS} items", param="input")
        for i, item in enumerate(value):
            if not item:
                raise InvalidRequest(f"input[{i}] is empty: there is nothing to embed", param=f"input[{i}]")
            if isinstance(item, list) and any(t < 0 for t in item):
                raise InvalidRequest(f"input[{i}] has a negative token id", param=f"input[{i}]")
        return value


def _encode(vector: list[float], encoding_format: str):
    """base64 is the float32 little-endian bytes, as OpenAI sends them (the SDK decodes with numpy)."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@router.post("/v1/embeddings", openapi_extra=request_body(EmbeddingRequest),
             responses=error_responses(*WRITE_ERRORS, 503))
@router.post("/v1/embeddings/", include_in_schema=False)
async def embeddings(request: Request, state: State):
    body = await parse_body(request, EmbeddingRequest)
    result = await embed(request, state, body.model, body.inputs(), dimensions=body.dimensions)
    if result is None:
        return Response(status_code=CLIENT_CLOSED)  # nobody is left to read it
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(result.vectors)]
    return {"object": "list", "data": data, "model": result.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}
