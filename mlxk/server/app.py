"""The FastAPI application: wiring only (lifespan, middleware, routers, one exception handler).

`uvicorn --factory mlxk.server.app:create_app` serves it with settings from the environment; `mlxk serve` builds
a ServerConfig from its options and runs the same factory (and sets up mlxk.logs, whose redacting formatter a bare
uvicorn does not use). Middleware, outermost first: RequestContext (request id, last-resort 500), CrossSiteGuard
(Host, content type, Origin), BodyLimit, then CORS when MLXK_CORS_ORIGINS is set.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mlxk import __version__, processes
from mlxk import jobs as jobs_api
from mlxk.errors import MlxkError
from mlxk.server import runtime
from mlxk.server.deps import ServerConfig, ServerState
from mlxk.server.errors import InternalError, error_body
from mlxk.server.middleware import BodyLimit, CrossSiteGuard, RequestContext
from mlxk.server.routes import anthropic, embeddings, jobs, ollama, openai, ops, responses, ui
from mlxk.server.supervisor import Supervisor

log = logging.getLogger("mlxk.server.app")


def _as_mlxk_error(request: Request, error: Exception) -> MlxkError:
    if isinstance(error, MlxkError):
        return error
    if isinstance(error, HTTPException):
        allowed = (error.headers or {}).get("Allow")
        message = (f"{request.method} is not allowed here; use {allowed}" if error.status_code == 405 and allowed
                   else str(error.detail))
        wrapped = MlxkError(message)
        wrapped.type = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        wrapped.http_status = error.status_code
        return wrapped
    log.error("unhandled error", exc_info=error)
    return InternalError(f"internal server error: {type(error).__name__}; see the server log")


async def openai_error(request: Request, error: Exception) -> JSONResponse:
    """The one exception handler: every error leaves in its dialect's shape (errors.error_body: Anthropic's, Ollama's
    or OpenAI's, by route) with the request id."""
    mlxk_error = _as_mlxk_error(request, error)
    headers = {"x-request-id": getattr(request.state, "request_id", "")}
    if isinstance(error, HTTPException) and error.headers:  # e.g. 405's Allow, which RFC 9110 requires
        headers.update(error.headers)
    if getattr(mlxk_error, "retryable", False):
        headers["retry-after"] = "1"
    return JSONResponse(error_body(request.url.path, mlxk_error, headers["x-request-id"]),
                        status_code=mlxk_error.http_status, headers=headers)


async def _keep_job_worker(every_s: float = 3.0) -> None:
    """While jobs are queued or running, a job worker stays alive and a dead one's jobs resume (mlxk.jobs)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await run_in_threadpool(jobs_api.keep_worker)
        except Exception:  # noqa: BLE001 — a supervisor: log, try again next tick
            log.warning("keeping a job worker alive failed", exc_info=True)


def create_app(config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig.from_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServerState(config, Supervisor(config.worker_options()))
        app.state.mlxk = state
        await state.supervisor.start()
        processes.write_server_pid_file(config.settings, host=config.host, port=config.port, api_key=bool(config.api_key))
        idle = asyncio.create_task(runtime.exit_when_idle(state, config.idle_exit_s)) if config.idle_exit_s else None
        keeper = asyncio.create_task(_keep_job_worker())
        try:
            yield
        finally:
            keeper.cancel()
            if idle:
                idle.cancel()
            await state.supervisor.stop()
            processes.remove_server_pid_file(config.settings)

    app = FastAPI(title="mlxk", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.include_router(ops.health_router)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(embeddings.router)
    app.include_router(ollama.router)
    app.include_router(jobs.router)
    app.include_router(ui.router)
    app.add_exception_handler(MlxkError, openai_error)
    app.add_exception_handler(HTTPException, openai_error)
    app.add_exception_handler(Exception, openai_error)
    if config.settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.settings.cors_origins),
                           allow_methods=["*"], allow_headers=["*"], expose_headers=["x-request-id"])
    app.add_middleware(BodyLimit, limit=config.settings.max_body_bytes)
    app.add_middleware(CrossSiteGuard, bind_host=config.host, api_key=bool(config.api_key),
                       allowed_hosts=config.settings.allowed_hosts, allowed_origins=config.settings.cors_origins)
    # Outermost: every response, errors included, carries the request id.
    app.add_middleware(RequestContext, get_state=lambda: getattr(app.state, "mlxk", None))
    return app
