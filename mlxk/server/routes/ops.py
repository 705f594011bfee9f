"""Operations: /health (no auth), /metrics (Prometheus), and /api/stop, which `mlxk stop` calls (Ollama has no
/api/stop). `/api/ps`, which `mlxk ps` calls, is the Ollama route's superset (routes/ollama.py)."""
from __future__ import annotations

import logging
import sqlite3
import time
from contextlib import closing

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from mlxk import __version__, jobs, names
from mlxk.errors import MlxkError, ModelNotFound
from mlxk.server.deps import ServerState, State, parse_optional_body, require_api_key
from mlxk.server.openai_types import READ_ERRORS, WRITE_ERRORS, error_responses, request_body
from mlxk.workers.inference import protocol

log = logging.getLogger("mlxk.server.ops")

health_router = APIRouter()
router = APIRouter(dependencies=[Depends(require_api_key)], responses=error_responses(*READ_ERRORS))


async def _inference_state(state: ServerState) -> dict:
    """The inference worker as it is: one that someone else runs (honcho's `inference` line) is `ready` from the
    start, not `stopped` until this api first needs it. A ping of the socket when none is known finds it."""
    if state.supervisor.state()["state"] == "stopped":
        await state.supervisor.call({"op": protocol.OP_PING}, start=False)
    return state.supervisor.state()


def _job_workers() -> dict:
    """The job workers whose heartbeat is fresh (any host); none means one starts when a job is queued."""
    try:
        with closing(jobs.connect()) as conn:
            count = len(jobs.live_workers(conn))
    except (sqlite3.Error, MlxkError) as error:   # /health still answers; it says what it could not read
        log.warning("could not read the job workers from state.db: %s", error)
        return {"state": "unknown", "count": None}
    return {"state": "running" if count else "stopped", "count": count}


@health_router.get("/health", responses=error_responses(421))
async def health(state: State) -> dict:
    """Always 200 while the api answers; `status` is "degraded" (with `problems`, one line each) when it cannot
    serve generations: the inference worker is unresponsive (frozen; see supervisor.py)."""
    idle = 0.0 if state.active_requests else time.monotonic() - state.last_activity
    worker = await _inference_state(state)
    problems = []
    if worker["state"] == "unresponsive":
        problems.append(f"the inference worker has not answered for {worker.get('silent_s', 0):g}s; generation "
                        "and embedding requests get 503 worker_unresponsive until it answers or is replaced")
    return {"status": "degraded" if problems else "ok", **({"problems": problems} if problems else {}),
            "version": __version__, "worker": worker, "job_workers": await run_in_threadpool(_job_workers),
            "idle_s": round(idle, 1), "idle_exit_s": state.config.idle_exit_s}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> PlainTextResponse:
    worker = await state.supervisor.call({"op": protocol.OP_STATUS}, start=False)
    text = state.metrics.render(worker, state.supervisor.state())
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


class StopRequest(BaseModel):
    model: str | None = None   # None: every loaded model


async def _loaded_target(state: ServerState, name: str) -> str:
    """The loaded repo `name` means, fuzzy against what is loaded (not against the cache)."""
    ref = names.parse(name)
    status = await state.supervisor.call({"op": protocol.OP_STATUS}, start=False)
    loaded = sorted({m["key"].split("@")[0] for m in (status or {}).get("models") or []})
    if not loaded:
        raise ModelNotFound(f"{name!r} is not loaded: no model is loaded", name=name)
    aliases = {alias: row["repo_id"] for row in (await state.get_catalog()).rows for alias in row.get("aliases") or []}
    try:
        return names.resolve(ref.repo, loaded, aliases)   # an alias (/api/copy) means its model here too
    except ModelNotFound:
        raise ModelNotFound(f"{name!r} is not loaded (loaded: {', '.join(loaded)})", name=name) from None


@router.post("/api/stop", openapi_extra=request_body(StopRequest, required=False),
             responses=error_responses(*WRITE_ERRORS))
async def stop(request: Request, state: State) -> dict:
    """Unload one model (`{"model": name}`, fuzzy against what is loaded) or all (`{"model": null}` or no body)."""
    body = await parse_optional_body(request, StopRequest)
    target = None if body.model is None else await _loaded_target(state, body.model)
    # a worker that is not running has nothing loaded; start=False leaves it stopped and answers None
    reply = await state.supervisor.call({"op": protocol.OP_UNLOAD, "model": target}, start=False) or {}
    return {"models": [key.split("@")[0] for key in reply.get("models") or []]}
