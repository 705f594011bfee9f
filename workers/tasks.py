"""The tasks: thin adapters from a job id to a domain call (mlxk.hub, mlxk.clone, mlxk.cache, mlxk.index).

Each task takes only a job id (Huey pickles its arguments), claims the job — which takes the per-model lock and
marks it running in one transaction —, calls the domain with a progress reporter and a cooperative stop check
bound to the row, and stores the result on the row. Outcomes (succeeded / failed / cancelled / re-queued) are
written by the Huey signal receivers in workers.signals. A job whose model is held by another job waits: the
task asks Huey to retry it a second later instead of failing.

Heavy imports (huggingface_hub through mlxk.hub, mlx-lm through mlxk.index) happen inside the tasks, so a
worker starts in a fraction of a second.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

from mlxk import db as statedb, logs
from mlxk.db import jobs as jobs_db
from mlxk.config import settings
from mlxk.errors import Cancelled, MlxkError
from mlxk.jobs import connect, holder_alive
from mlxk.workers import signals

log = logging.getLogger("mlxk.tasks")

PROGRESS_EVERY_S = 0.25     # at most 4 progress writes per second per job
STOP_CHECK_EVERY_S = 0.2    # cancel flag reads; a cancel lands well inside 2 s
LOCK_RETRY_S = 1.0          # a job whose model is busy looks again after this long


# ---------------------------------------------------------------- the job a task runs

class JobContext:
    """Progress reporting and the stop check of one running job; safe to call from download threads.

    They write progress and read the cancel flag several times a second, so the job keeps one state.db connection
    (opened on first use, closed by `close`) instead of opening one per call. The threads share it under
    `_db_lock`, not `_lock`: a write waiting out SQLite's busy timeout must not stall the other threads' rate
    bookkeeping and throttled stop checks.
    """

    def __init__(self, job: dict, task_id: str):
        self.job = job
        self.job_id = job["id"]
        self.task_id = task_id
        self._lock = threading.Lock()
        self._db_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._last_write = 0.0
        self._last_stop_check = 0.0
        self._stop = False
        self._rate = None
        self._rate_mark: tuple[float, int] | None = None
        self._latest: dict | None = None
        self._phase = ""

    @property
    def args(self) -> dict:
        return self.job.get("args") or {}

    def phase(self, text: str) -> None:
        """A short label shown before the progress message (`pulling`, `cloning`, `indexing`)."""
        with self._lock:
            self._phase = text
        self._write({"message": text}, force=True)

    def progress(self, p) -> None:
        """The callback the domain calls with an mlxk.hub.Progress (or anything with the same fields)."""
        now = time.monotonic()
        with self._lock:
            done = int(p.bytes_done or 0)
            if self._rate_mark is None:
                self._rate_mark = (now, done)
            else:
                t0, d0 = self._rate_mark
                if now - t0 >= 0.5:
                    instant = (done - d0) / (now - t0)
                    self._rate = instant if self._rate is None else 0.7 * self._rate + 0.3 * instant
                    self._rate_mark = (now, done)
            total = p.bytes_total or None
            eta = (total - done) / self._rate if (self._rate and total and total >= done) else None
            message = p.message or self._phase
            fields = {"bytes_done": done, "bytes_total": total, "files_done": p.files_done or 0,
                      "files_total": p.files_total or None, "rate": self._rate, "eta": eta, "message": message}
            self._latest = fields
        self._write(fields, force=bool(total and done >= total))

    def _write(self, fields: dict, *, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_write < PROGRESS_EVERY_S:
                return
            self._last_write = now
        with self._db_lock:
            conn = self._db()
            if "bytes_done" in fields:
                jobs_db.set_progress(conn, self.job_id, task_id=self.task_id, **fields)
            else:
                jobs_db.update_job(conn, self.job_id, where_state="running", where_task=self.task_id, **fields)

    def flush(self) -> None:
        if self._latest:
            self._write(self._latest, force=True)

    def should_stop(self) -> bool:
        """True once the job is cancelled, or this task no longer holds it (re-queued elsewhere)."""
        now = time.monotonic()
        with self._lock:
            if self._stop or now - self._last_stop_check < STOP_CHECK_EVERY_S:
                return self._stop
            self._last_stop_check = now
        with self._db_lock:
            row = jobs_db.run_flags(self._db(), self.job_id)
        stop = row is None or bool(row["cancel_requested"]) or row["task_id"] != self.task_id \
            or row["state"] != "running"
        with self._lock:
            self._stop = self._stop or stop
            return self._stop

    def check(self) -> None:
        """Raise errors.Cancelled when the job should stop (between steps of a task)."""
        if self.should_stop():
            raise Cancelled(f"job {self.job_id} was cancelled.")

    def purge_requested(self) -> bool:
        with self._db_lock:
            return jobs_db.cancel_requested(self._db(), self.job_id) >= 2

    def close(self) -> None:
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _db(self) -> sqlite3.Connection:
        """The job's connection; call it holding `_db_lock`."""
        if self._conn is None:
            self._conn = statedb.connect(settings().state_db, shared=True)
        return self._conn


def _plain(value):
    """JSON-ready copy of a domain result (dataclasses, Paths, sets)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------- the domain calls

def _refresh_index(repos=None, *, runtime: bool = True, force: bool = False):
    from mlxk import index

    # A raw connection, as `list` uses: open_db would import sqlite-utils (and numpy) on the CLI's inline rm.
    with closing(connect()) as conn:
        return index.refresh(conn, settings().hf_hub_cache, runtime=runtime,
                             repos=set(repos) if repos is not None else None, force=force)


def _safe_refresh(repo: str) -> None:
    """After a failed or cancelled pull: let `list` see the repo as it now is (best effort, logged)."""
    try:
        _refresh_index({repo}, runtime=False)
    except Exception:  # noqa: BLE001 — the job's own error is what matters; this is bookkeeping
        log.warning("index refresh of %s after a failed job failed", repo, exc_info=True)


def _drop_empty_repo(repo: str) -> None:
    """A pull that failed before any byte arrived (missing, gated, private) leaves nothing behind in the cache."""
    from mlxk import cache

    s = settings()
    path = cache.repo_dir(s.hf_hub_cache, repo)
    blobs = path / "blobs"
    if path.is_dir() and not (blobs.is_dir() and any(blobs.iterdir())) and not cache.list_revisions(path):
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(cache.lock_dir(s.hf_hub_cache, repo), ignore_errors=True)


def _purge_partials(repo: str) -> None:
    from mlxk import cache

    s = settings()
    path = cache.repo_dir(s.hf_hub_cache, repo)
    for blob in cache.incomplete_blobs(path):
        blob.unlink(missing_ok=True)
    _drop_empty_repo(repo)


def _pull(repo: str, args: dict, ctx: JobContext):
    from mlxk import hub

    s = settings()
    ctx.phase("pulling")
    try:
        return hub.pull(repo, revision=args.get("revision"), include=args.get("include"),
                        exclude=args.get("exclude"), cache_dir=s.hf_hub_cache, endpoint=s.hf_endpoint,
                        token=s.hf_token, progress=ctx.progress, should_stop=ctx.should_stop)
    except Cancelled:
        if ctx.purge_requested():
            _purge_partials(repo)
        _safe_refresh(repo)
        raise
    except BaseException:
        _drop_empty_repo(repo)
        _safe_refresh(repo)
        raise


def run_pull(job: dict, ctx: JobContext) -> dict:
    repo = job["target"]
    result = _pull(repo, ctx.args, ctx)
    ctx.flush()
    ctx.phase("indexing")
    # Before the job succeeds, so `mlxk list` shows the model the moment the job says done.
    _refresh_index({repo}, runtime=True)
    return _plain(result)


def run_rm(job: dict, ctx: JobContext) -> dict:
    from mlxk.db import models as models_db
    from mlxk import cache

    s = settings()
    repo, revision = job["target"], ctx.args.get("revision")
    plan = cache.plan_remove(s.hf_hub_cache, repo, revision)
    ctx.phase("removing")
    cache.apply_remove(s.hf_hub_cache, plan)
    with closing(connect()) as conn:
        if plan.whole_repo:
            models_db.delete_models(conn, [repo])
    if not plan.whole_repo:
        _refresh_index({repo}, runtime=False)
    return {"repo_id": repo, "revisions": plan.revisions, "whole_repo": plan.whole_repo,
            "bytes_freed": plan.bytes_freed, "paths": [str(p) for p in plan.paths]}


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The healthy cached snapshot a clone can use without the network, or None."""
    from mlxk.db import models as models_db
    from mlxk import cache, names

    s = settings()
    path = cache.repo_dir(s.hf_hub_cache, repo)
    revisions = cache.list_revisions(path)
    if not revisions:
        return None
    if revision:
        if not names.is_commit_prefix(revision):
            sha = cache.read_ref(path, revision)
            if sha not in revisions:
                return None
        else:
            hits = [r for r in revisions if r.startswith(revision.lower())]
            if len(hits) != 1:
                return None
            sha = hits[0]
    else:
        sha = cache.current_revision(path, revisions)
    _refresh_index({repo}, runtime=False)
    with closing(connect()) as conn:
        row = models_db.get_model(conn, repo)
    if not row or row.get("health") != "healthy" or row.get("revision") != sha:
        return None
    return path / "snapshots" / sha


def run_clone(job: dict, ctx: JobContext) -> dict:
    from mlxk import clone, hub

    repo, args = job["target"], ctx.args
    dest = Path(args["dest"])
    snapshot = _cached_snapshot(repo, args.get("revision"))
    pulled = None
    if snapshot is None:
        # Not cached (or unfinished): pull first; the pull never re-downloads files the cache already has.
        pulled = _pull(repo, {"revision": args.get("revision")}, ctx)
        _refresh_index({repo}, runtime=True)
        snapshot = Path(pulled.snapshot_path)
    ctx.check()
    ctx.phase("cloning")
    result = clone.clone(snapshot, dest, progress=ctx.progress)
    ctx.flush()
    ctx.phase("checking the workspace")
    findings = hub.check_workspace(dest)
    return {"clone": _plain(result), "pulled": _plain(pulled), "snapshot": str(snapshot),
            "findings": _plain(findings)}


def run_push(job: dict, ctx: JobContext) -> dict:
    from mlxk import hub

    s, args = settings(), ctx.args
    ctx.phase("pushing")
    result = hub.push(Path(args["workspace"]), job["target"], private=bool(args.get("private")),
                      public=bool(args.get("public")), dry_run=bool(args.get("dry_run")), endpoint=s.hf_endpoint,
                      token=s.hf_token, message=args.get("message"), progress=ctx.progress,
                      should_stop=ctx.should_stop)
    ctx.flush()
    return _plain(result)


def run_scan(job: dict, ctx: JobContext) -> dict:
    args = ctx.args
    ctx.phase("scanning")
    return _plain(_refresh_index(args.get("repos"), runtime=True, force=bool(args.get("force"))))


HANDLERS = {"pull": run_pull, "rm": run_rm, "clone": run_clone, "push": run_push, "scan": run_scan}
LOCKED_KINDS = {"pull", "rm", "clone", "push"}   # scan reads; everything else holds its model


# ---------------------------------------------------------------- running a job

def _claim(job_id: str, task_id: str):
    with closing(connect()) as conn:
        row = jobs_db.get_job(conn, job_id)
        lock_key = row["target"] if row and row["kind"] in LOCKED_KINDS else None
        return jobs_db.claim(conn, job_id, task_id=task_id, worker=signals.worker_id(), lock_key=lock_key,
                             holder_alive=lambda worker: holder_alive(conn, worker))


def execute(job_id: str, task_id: str):
    """Claim and run one job; None when there is nothing to do (stale task, cancelled), else the result dict.

    Raises RetryLater when the model is held by another job, MlxkError / Cancelled for the outcome.
    """
    outcome, job = _claim(job_id, task_id)
    if outcome == "locked":
        with closing(connect()) as conn:
            jobs_db.update_job(conn, job_id, where_state="queued", where_task=task_id,
                               message=f"waiting for job {job['id']} ({job['kind']}) on {job['target']}")
        raise RetryLater(job["id"])
    if outcome != "claimed":
        log.info("job %s: task %s has nothing to do (%s)", job_id, task_id, outcome)
        return None
    log.info("job %s: %s %s (attempt %s)", job_id, job["kind"], job["target"], job["attempts"])
    with closing(JobContext(job, task_id)) as ctx:
        result = HANDLERS[job["kind"]](job, ctx)
    with closing(connect()) as conn:
        jobs_db.update_job(conn, job_id, where_state="running", where_task=task_id, result=result)
    return result


class RetryLater(Exception):
    """The job's model is held by another job (its id is the argument)."""


def run_inline(job_id: str) -> dict:
    """Run a job in this process (rm from the CLI): the same claim, lock and state changes as under Huey."""
    with closing(connect()) as conn:
        task_id = jobs_db.get_job(conn, job_id)["task_id"]
    try:
        result = execute(job_id, task_id)
    except RetryLater as busy:
        from mlxk.errors import Conflict

        error = Conflict(f"the model is in use by job {busy.args[0]}; retry when it has finished.",
                         job_id=busy.args[0])
        with closing(connect()) as conn:
            jobs_db.finish(conn, job_id, state="failed", task_id=task_id, from_states=("queued",),
                           error=error.to_dict(), message="failed")
        raise error from None
    except BaseException as exc:
        signals.failed(job_id, task_id, exc)
        if isinstance(exc, (MlxkError, KeyboardInterrupt)):
            raise
        raise MlxkError(f"job {job_id} failed: {type(exc).__name__}: {exc}") from exc
    signals.succeeded(job_id, task_id)
    return result


def register(huey) -> dict:
    """Create the five tasks on `huey`; returns {kind: TaskWrapper}."""
    from huey.exceptions import RetryTask

    def make(kind: str):
        def task_fn(job_id: str, task=None):
            try:
                with logs.job_context(job_id):  # every line the job logs carries its id
                    return execute(job_id, task.id)
            except RetryLater:
                raise RetryTask(delay=LOCK_RETRY_S) from None

        task_fn.__name__ = task_fn.__qualname__ = kind
        task_fn.__module__ = __name__
        return huey.task(context=True, name=kind)(task_fn)

    return {kind: make(kind) for kind in HANDLERS}
