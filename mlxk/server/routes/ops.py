"""Operations: /health (no auth), /metrics (Prometheus), and the ollama-like /api/ps and /api/stop that
`mlxk ps` and `mlxk stop` call."""
from __future__ import annotations

import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from mlxk import __version__, names
from mlxk.errors import ModelNotFound
from mlxk.server.deps import State, require_api_key
from mlxk.server.errors import InvalidRequest

health_router = APIRouter()
router = APIRouter(dependencies=[Depends(require_api_key)])


@health_router.get("/health")
async def health(state: State) -> dict:
    return {"status": "ok", "version": __version__, "worker": state.supervisor.state()}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> PlainTextResponse:
    worker = await state.supervisor.call({"op": "status"}, start=False)
    text = state.metrics.render(worker, state.supervisor.state())
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def _loaded_model(model: dict, now: float) -> dict:
    repo_id, _, revision = model.get("key", "").partition("@")
    expires_at = model.get("expires_at")
    return {
        "name": repo_id, "revision": revision, "key": model.get("key"), "path": model.get("path"),
        "memory_bytes": model.get("memory_bytes"), "loaded_at": model.get("loaded_at"),
        "last_used": model.get("last_used"), "keep_alive_s": model.get("keep_alive_s"),
        "expires_at": expires_at,
        "expires_in_s": None if expires_at is None else max(0.0, round(expires_at - now, 1)),
        "running": model.get("running", 0),
    }


@router.get("/api/ps")
async def ps(state: State) -> dict:
    """Loaded models and queue depth; a worker that is not running has nothing loaded (it is not started)."""
    status = await state.supervisor.call({"op": "status"}, start=False) or {}
    now = time.time()
    return {
        "models": [_loaded_model(m, now) for m in status.get("models") or []],
        "running": status.get("running", 0), "waiting": status.get("waiting", 0),
        "worker": state.supervisor.state(),
    }


@router.post("/api/stop")
async def stop(request: Request, state: State) -> dict:
    """Unload one model (`{"model": name}`, fuzzy against what is loaded) or all (`{"model": null}`)."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON") from None
    name = body.get("model") if isinstance(body, dict) else None
    status = await state.supervisor.call({"op": "status"}, start=False)
    loaded = sorted({m["key"].split("@")[0] for m in (status or {}).get("models") or []})
    if name is None:
        target = None
    else:
        ref = names.parse(name)
        if not loaded:
            raise ModelNotFound(f"{name!r} is not loaded: no model is loaded", name=name)
        try:
            target = names.resolve(ref.repo, loaded)
        except ModelNotFound:
            raise ModelNotFound(f"{name!r} is not loaded (loaded: {', '.join(loaded)})", name=name) from None
    if status is None:
        return {"models": []}
    reply = await state.supervisor.call({"op": "unload", "model": target}, start=False) or {}
    return {"models": [key.split("@")[0] for key in reply.get("models") or []]}
