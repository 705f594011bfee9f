"""The jobs API: the cache index and the job queue over HTTP, for the dashboard and for scripts.

Every handler calls the same functions as the CLI (mlxk.jobs, mlxk.index), so a pull queued here is the job
`mlxk jobs` shows, and their errors (invalid name 400, unknown job 404, conflict 409) leave through the app's one
error handler. Those functions are synchronous and touch SQLite (a cancel may wait up to ~3 s for a running task to
stop), so they run in the threadpool, never on the event loop.
"""
from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from mlxk import index, jobs
from mlxk.errors import Conflict, MlxkError
from mlxk.output import system_object
from mlxk.server.deps import State, parse_body, parse_optional_body, require_api_key
from mlxk.server.openai_types import READ_ERRORS, WRITE_ERRORS, error_responses, request_body

log = logging.getLogger("mlxk.server.jobs")

router = APIRouter(dependencies=[Depends(require_api_key)], responses=error_responses(*READ_ERRORS))
WRITE = error_responses(*WRITE_ERRORS, 409)
QUEUE = {**WRITE, 202: {"description": "Job queued (200: an active job for the same target, `existing: true`)"}}


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    include: list[str] = []
    exclude: list[str] = []


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    purge: bool = False


class RemoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    force: bool = False   # as `mlxk rm --force`: a fuzzy name may remove the one model it matches


class ScanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repos: list[str] | None = None
    force: bool = False


def _queued(outcome: jobs.Enqueued) -> JSONResponse:
    """202 for a job this request queued; 200 for an existing active job it joined (`existing: true`)."""
    body = dict(outcome.job, existing=not outcome.created)
    if outcome.retry_of:
        body["retry_of"] = outcome.retry_of
    return JSONResponse(body, status_code=202 if outcome.created else 200)


# ---------------------------------------------------------------- models


def _request_scan(pending: list[str]) -> None:
    """Hand pending runtime verdicts to the job worker, as `mlxk list` does."""
    try:
        jobs.request_scan(pending)
    except MlxkError as error:  # the listing is still right; only the background check could not be queued
        log.warning("could not queue a runtime check: %s", error.message)


@router.get("/api/models")
async def list_models(state: State) -> dict:
    """What `mlxk list --json` prints as data."""
    # Always a fresh refresh (a finished pull or rm must show at once), kept for the /v1 routes that follow it.
    catalog = await state.get_catalog(fresh=True)
    if catalog.pending:
        await run_in_threadpool(_request_scan, catalog.pending)
    found = sorted(catalog.rows, key=lambda row: row["repo_id"].lower())
    models = await run_in_threadpool(index.model_objects, state.config.settings.state_db, found)
    return {"models": models, "count": len(found), "system": system_object(),
            "pending": sum(index.is_pending(row) for row in found), "size_bytes": index.disk_total(found)}


# ---------------------------------------------------------------- jobs


@router.get("/api/jobs")
async def list_jobs(all: str | None = None) -> dict:  # noqa: A002 — the query parameter is `?all=1`
    all_jobs = (all or "").lower() in {"1", "true", "yes", "on"}
    return {"jobs": await run_in_threadpool(jobs.list_jobs, all_jobs=all_jobs)}


@router.get("/api/jobs/{job_id}")
async def get_job(job_id: str) -> dict:
    return await run_in_threadpool(jobs.get, job_id)


@router.post("/api/jobs/pull", openapi_extra=request_body(PullRequest), responses=QUEUE)
async def pull(request: Request) -> JSONResponse:
    body = await parse_body(request, PullRequest)
    outcome = await run_in_threadpool(jobs.enqueue_pull, body.model.strip(), include=body.include,
                                      exclude=body.exclude)
    return _queued(outcome)


@router.post("/api/jobs/scan", openapi_extra=request_body(ScanRequest, required=False), responses=QUEUE)
async def scan(request: Request) -> JSONResponse:
    body = await parse_optional_body(request, ScanRequest)
    outcome = await run_in_threadpool(jobs.enqueue_scan, body.repos, force=body.force)
    return _queued(outcome)


def _remove(name: str, force: bool) -> jobs.Enqueued | dict:
    """`mlxk rm NAME [--force]`: the same resolution, refusals and inline rm job as the CLI. An alias is forgotten
    at once (its model stays): jobs.remove_alias's object instead of a job."""
    target = jobs.resolve_removal(name)
    if target.alias is not None:
        return jobs.remove_alias(target)
    if target.fuzzy and not force:   # the CLI's requires_confirmation, as an HTTP refusal
        raise Conflict(f"{name!r} is not an exact name: it matches {target.repo_id}; send \"force\": true to remove "
                       "it, or use the full name.", model=target.repo_id)
    outcome = jobs.remove(target)
    error = jobs.outcome_error(outcome.job)
    if error is not None:
        raise error
    return outcome


@router.post("/api/jobs/rm", openapi_extra=request_body(RemoveRequest), responses=WRITE)
async def remove(request: Request, state: State) -> dict:
    """Remove a cached model (`NAME@HASH`: one revision). rm runs at once: 200 with the finished job. An alias
    (/api/copy) is forgotten instead, its model kept: 200 with {"alias", "repo_id", "action": "alias_removed",
    "message"}."""
    body = await parse_body(request, RemoveRequest)
    outcome = await run_in_threadpool(_remove, body.model.strip(), body.force)
    if isinstance(outcome, dict):
        await state.get_catalog(fresh=True)   # the alias is no name any more, at once
        return outcome
    return outcome.job


@router.post("/api/jobs/{job_id}/cancel", openapi_extra=request_body(CancelRequest, required=False),
             responses=WRITE)
async def cancel(job_id: str, request: Request) -> dict:
    body = await parse_optional_body(request, CancelRequest)
    return await run_in_threadpool(jobs.cancel, job_id, purge=body.purge)


@router.post("/api/jobs/{job_id}/retry", openapi_extra=request_body(None, required=False), responses=QUEUE)
async def retry(job_id: str) -> JSONResponse:
    return _queued(await run_in_threadpool(jobs.retry, job_id))
