"""Job state from Huey signals: what happened to a task becomes the state of its row in state.db.

    queued ──claim──▶ running ──complete──▶ succeeded
                         │ ──error──────▶ failed (error type + message) | cancelled (errors.Cancelled)
                         └ ──interrupted (SIGTERM)──▶ queued again, under a new task id
    queued ──revoked──▶ cancelled

`running` is set by the task itself (`claim` in workers.tasks), because taking the per-model lock and marking
the job running must be one transaction. Every update here is conditional on the task id the row holds, so a
stale copy of a task (a recovered job, an old interrupted run) can never overwrite the newer outcome. Nothing is
ever deleted: the jobs table is the history.
"""
from __future__ import annotations

import logging
import os
from contextlib import closing

from mlxk.db import jobs as jobs_db
from mlxk.errors import Cancelled, Internal, MlxkError
from mlxk.workers import jobsettings
from mlxk.workers.process import connect as _connect   # `connect` here is the Huey receivers' hookup below
from mlxk.workers.process import process_id

log = logging.getLogger("mlxk.signals")

_worker: tuple[int, str] | None = None


def worker_id() -> str:
    """This process's id as a job holder (`host:pid:start`); recomputed after a fork."""
    global _worker
    if _worker is None or _worker[0] != os.getpid():
        _worker = (os.getpid(), process_id())
    return _worker[1]


def _job_id(task) -> str | None:
    return task.args[0] if task.args else None


def error_record(exc: BaseException) -> dict:
    """The JSON an exception is stored as (rebuilt by MlxkError.from_dict on the reading side)."""
    if isinstance(exc, MlxkError):
        return exc.to_dict()
    return Internal(f"{type(exc).__name__}: {exc}").to_dict()


# ---------------------------------------------------------------- transitions (also used without Huey)

def finish(conn, job_id: str, **fields) -> bool:
    """jobs_db.finish, and the job's token forgotten when the row did end (see workers.jobsettings)."""
    done = jobs_db.finish(conn, job_id, **fields)
    if done:
        jobsettings.drop(job_id)
    return done


def succeeded(job_id: str, task_id: str) -> bool:
    with closing(_connect()) as conn:
        return finish(conn, job_id, state="succeeded", task_id=task_id, message="done")


def failed(job_id: str, task_id: str, exc: BaseException, *, from_states=("running",)) -> bool:
    with closing(_connect()) as conn:
        if isinstance(exc, Cancelled):
            purge = jobs_db.cancel_requested(conn, job_id) >= 2
            note = exc.details.get("note") or ("cancelled; partial data removed" if purge else
                                               f"cancelled; partial data kept (`mlxk jobs retry {job_id}` resumes)")
            return finish(conn, job_id, state="cancelled", task_id=task_id, message=note, error=error_record(exc),
                          from_states=from_states)
        return finish(conn, job_id, state="failed", task_id=task_id, error=error_record(exc), message="failed",
                      from_states=from_states)


def cancelled_before_start(job_id: str, task_id: str, why: str) -> bool:
    with closing(_connect()) as conn:
        return finish(conn, job_id, state="cancelled", task_id=task_id, from_states=("queued",),
                      message=why, error=Cancelled(why).to_dict())


# ---------------------------------------------------------------- Huey receivers

def connect(huey) -> None:
    """Register the receivers on `huey` (called once per instance by workers.queue)."""
    from huey import signals as S   # here, not at the top: the CLI's inline rm imports this module, never Huey

    @huey.signal(S.SIGNAL_COMPLETE)
    def on_complete(signal, task):
        if _job_id(task):
            succeeded(_job_id(task), task.id)

    @huey.signal(S.SIGNAL_ERROR)
    def on_error(signal, task, exc=None):
        if _job_id(task):
            failed(_job_id(task), task.id, exc if exc is not None else RuntimeError("unknown error"))

    # No receivers for SIGNAL_EXPIRED and SIGNAL_CANCELED: Huey sends them only for tasks with `expires`, for
    # pre_execute hooks and for CancelExecution, none of which mlxk uses (a cancel is errors.Cancelled: an error).
    @huey.signal(S.SIGNAL_REVOKED)
    def on_revoked(signal, task):
        if _job_id(task):
            cancelled_before_start(_job_id(task), task.id, f"cancelled before it started ({signal})")

    @huey.signal(S.SIGNAL_INTERRUPTED)
    def on_interrupted(signal, task):
        # SIGTERM cut the task off mid-run: the job is not failed, it goes back to the queue; the partial
        # download stays, so the next run resumes it.
        if _job_id(task):
            from mlxk.workers import process

            with closing(_connect()) as conn:
                job = jobs_db.get_job(conn, _job_id(task))
            if job is not None and job["task_id"] == task.id:
                process.requeue(huey, job, message="interrupted by a worker shutdown; re-queued")
