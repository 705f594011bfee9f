"""The tasks: one table of job kinds (KINDS: name, handler, priority, dedupe, lock, inline) and thin handlers from a
job to a domain call (mlxk.hub, mlxk.clone, mlxk.cache, mlxk.index).

Each Huey task is named as its kind and takes the job id plus the job's spec (Huey pickles its arguments; the spec
gives the row back if state.db is rebuilt meanwhile). It claims the job — which takes the per-model lock and marks
it running in one transaction —, calls the handler with a JobContext: the settings the queuing command had
(workers.jobsettings), a progress reporter and a cooperative stop check bound to the row. Outcomes (succeeded /
failed / cancelled / re-queued) are written by the Huey signal receivers in workers.signals. A job whose model is
held by another job waits: the task asks Huey to retry it a second later instead of failing.

Named pause points (mlxk.faults) for tests: `<kind>.progress` after each progress write, `rm.moving` and
`rm.deleting` around rm's one rename, `clone.copying` after each file a clone copies.

Heavy imports (huggingface_hub through mlxk.hub, mlx-lm through mlxk.index) happen inside the tasks, so a
worker starts in a fraction of a second.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout
from huey.exceptions import RetryTask

from mlxk import logs
from mlxk import cache, clone, hub, index, names
from mlxk.config import settings
from mlxk.db import jobs as jobs_db
from mlxk.db import models as models_db
from mlxk.errors import CacheError, Cancelled, Conflict, Internal, MlxkError
from mlxk.faults import checkpoint
from mlxk.workers import jobsettings, signals
from mlxk.workers.process import StateConnection, connect, holder_alive

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

    def __init__(self, job: dict, task_id: str, *, inline: bool = False):
        self.job = job
        self.inline = inline                    # run by the command that asked for it, not by a worker
        self.job_id = job["id"]
        self.task_id = task_id
        self.settings = jobsettings.load(job)   # the queuing command's endpoint, cache and token
        self._lock = threading.Lock()
        self._db_lock = threading.Lock()
        self._state = StateConnection(shared=True)
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
            self._state.run(lambda conn: self._write_row(conn, fields))
        if "bytes_done" in fields:
            checkpoint(f"{self.job['kind']}.progress")

    def _write_row(self, conn, fields: dict) -> None:
        if "bytes_done" in fields:
            written = jobs_db.set_progress(conn, self.job_id, task_id=self.task_id, **fields)
        else:
            written = jobs_db.update_job(conn, self.job_id, where_state="running", where_task=self.task_id,
                                         **fields)
        if not written and jobs_db.get_job(conn, self.job_id) is None:
            # state.db was rebuilt under us: give the job its row back, then write again.
            jobs_db.restore_job(conn, self.job, task_id=self.task_id, state="running", worker=signals.worker_id(),
                                attempts=self.job.get("attempts") or 1,
                                message="restored by its worker (state.db was rebuilt)")
            log.warning("job %s: its row was missing from state.db; restored", self.job_id)
            self._write_row(conn, fields)

    def record(self, result: dict) -> None:
        """Store `result` on the row now (a step a retry of this job must know happened)."""
        with self._db_lock:
            self._state.run(lambda conn: jobs_db.update_job(conn, self.job_id, where_state="running",
                                                            where_task=self.task_id, result=result))
        self.job = dict(self.job, result=result)

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
            row = self._state.run(lambda conn: jobs_db.run_flags(conn, self.job_id))
        if row is None:
            return False   # no row (state.db rebuilt): not a cancel; the next progress write restores it
        stop =  bool(row["cancel_requested"]) or row["task_id"] != self.task_id \
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
            return self._state.run(lambda conn: jobs_db.cancel_requested(conn, self.job_id)) >= 2

    def close(self) -> None:
        with self._db_lock:
            self._state.close()


def plain(value):
    """JSON-ready copy of a domain result (dataclasses, Paths, sets)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------- the domain calls

def _refresh_index(repos=None, *, runtime: bool = True, force: bool = False, cache_dir: Path | None = None):
    with closing(connect()) as conn:
        return index.refresh(conn, cache_dir or settings().hf_hub_cache, runtime=runtime,
                             repos=set(repos) if repos is not None else None, force=force)


def _safe_refresh(repo: str, cache_dir: Path) -> None:
    """After a failed or cancelled pull: let `list` see the repo as it now is (best effort, logged)."""
    try:
        _refresh_index({repo}, runtime=False, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 — the job's own error is what matters; this is bookkeeping
        log.warning("index refresh of %s after a failed job failed", repo, exc_info=True)


def _drop_empty_repo(repo: str, cache_dir: Path) -> None:
    """A pull that failed before any byte arrived (missing, gated, private) leaves nothing behind in the cache."""
    path = cache.repo_dir(cache_dir, repo)
    blobs = path / "blobs"
    if path.is_dir() and not (blobs.is_dir() and any(blobs.iterdir())) and not cache.list_revisions(path):
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(cache.lock_dir(cache_dir, repo), ignore_errors=True)


def _purge_partials(repo: str, cache_dir: Path) -> int:
    """What `jobs cancel --purge` removes of an unfinished pull; returns the bytes freed. With no snapshot yet, the
    whole repo folder (every byte in it is that download's); else its partial blobs, its staging folder and the
    blobs no snapshot uses. Never the files of a complete snapshot."""
    path = cache.repo_dir(cache_dir, repo)
    if not path.is_dir() or path.is_symlink():
        return 0
    if not cache.list_revisions(path):
        plan = cache.plan_remove(cache_dir, repo)
        cache.apply_remove(cache_dir, plan)
        shutil.rmtree(cache.lock_dir(cache_dir, repo), ignore_errors=True)
        return plan.bytes_freed
    blobs = path / "blobs"
    used = {f.target.name for rev in cache.list_revisions(path) for f in cache.snapshot_files(path / "snapshots" / rev)
            if f.is_symlink and f.target and cache.is_inside(f.target, blobs)}
    freed = 0
    for blob in (blobs.iterdir() if blobs.is_dir() else ()):
        if blob.name not in used and blob.is_file() and not blob.is_symlink():
            freed += blob.stat().st_size
            blob.unlink(missing_ok=True)
    if (path / cache.STAGING_DIR).exists():
        cache.remove_path(path / cache.STAGING_DIR)
    return freed


def _pull(repo: str, args: dict, ctx: JobContext):
    s = ctx.settings
    ctx.phase("pulling")
    try:
        with pull_slot(ctx, args.get("max_pulls")):
            return hub.pull(repo, revision=args.get("revision"), include=args.get("include"),
                            exclude=args.get("exclude"), cache_dir=s.cache, endpoint=s.endpoint,
                            token=s.token or False, progress=ctx.progress, should_stop=ctx.should_stop,
                            connections=args.get("connections"), max_rate=args.get("max_rate") or 0,
                            offline=s.offline)
    except Cancelled as cancelled:
        if not ctx.purge_requested():
            _safe_refresh(repo, s.cache)
            raise
        freed = _purge_partials(repo, s.cache)
        _safe_refresh(repo, s.cache)
        # Said the same way in the job's message, its error and `jobs cancel`: the partial data is gone.
        raise Cancelled(f"pull of {repo} cancelled; its partial download was removed ({freed} bytes freed).",
                        note="cancelled; partial data removed", bytes_freed=freed) from cancelled
    except BaseException:
        _drop_empty_repo(repo, s.cache)
        _safe_refresh(repo, s.cache)
        raise


PULL_SLOT_POLL_S = 0.2


@contextmanager
def pull_slot(ctx: JobContext, limit: int | None):
    """Hold one of `limit` pull slots (MLXK_MAX_PULLS) for the download: lock files under `$MLXK_HOME/run/`, so
    every worker process on this MLXK_HOME shares the count. Waits, cancellable, when all are taken; the job's
    message says so. No limit: no wait."""
    if not limit:
        yield
        return

    folder = settings().run_dir / "pull-slots"
    folder.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        for slot in range(limit):
            lock = FileLock(str(folder / f"{slot}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                ctx.phase(f"pulling (pull slot {slot + 1} of {limit}, MLXK_MAX_PULLS)")
                yield
            finally:
                lock.release()
            return
        if not waiting:
            waiting = True
            ctx.phase(f"waiting for a pull slot: {limit} pulls are running (MLXK_MAX_PULLS={limit})")
        if ctx.should_stop():
            raise Cancelled(f"pull of {ctx.job['target']} cancelled while waiting for a pull slot.")
        time.sleep(PULL_SLOT_POLL_S)


def run_pull(job: dict, ctx: JobContext) -> dict:
    repo = job["target"]
    result = _pull(repo, ctx.args, ctx)
    ctx.flush()
    ctx.phase("indexing")
    # Before the job succeeds, so `mlxk list` shows the model the moment the job says done.
    _refresh_index({repo}, runtime=True, cache_dir=ctx.settings.cache)
    return _relative_snapshot(plain(result), ctx.settings.cache)


def _relative_snapshot(pulled: dict | None, cache_dir: Path) -> dict | None:
    """A pull's result as the job records it: `snapshot_path` relative to the HF cache (no cache paths in --json)."""
    if pulled and pulled.get("snapshot_path"):
        pulled["snapshot_path"] = cache.cache_relative(pulled["snapshot_path"], cache_dir)
    return pulled


def run_rm(job: dict, ctx: JobContext) -> dict:
    """Remove a repo or one revision: one rename into `<cache>/.trash-<job id>` (named step `rm.moving` just
    before), the index updated, then the trash deleted (named step `rm.deleting` just before).

    Interrupted and run again, it finishes its own trash. It never removes anything once a newer job on the model
    exists (a pull after the interrupted rm must keep what it brought): then it ends cancelled, "superseded".
    """
    cache_dir, repo = ctx.settings.cache, job["target"]
    trash = cache.trash_dir(cache_dir, job["id"])
    record = cache.read_trash_plan(trash)
    if record is None:
        cache.empty_trash(trash)   # a plan written before the kill, nothing moved yet
        if not ctx.inline:         # a worker runs an rm only to recover it: a newer job on the model wins
            _refuse_if_superseded(job)
        plan = cache.plan_remove(cache_dir, repo, ctx.args.get("revision"))
        ctx.phase("removing")
        checkpoint("rm.moving")
        if plan.whole_repo and not cache.repo_dir(cache_dir, repo).exists():
            record = {"repo_id": repo, "revisions": [], "whole_repo": True, "bytes_freed": 0, "blobs": [],
                      "nothing": True}
        else:
            record = cache.move_to_trash(cache_dir, plan, trash)
    cache.finish_trash(cache_dir, trash, record)
    _index_removed(repo, cache_dir)
    checkpoint("rm.deleting")
    cache.empty_trash(trash)
    _empty_leftover_trash(cache_dir)
    return {"repo_id": repo, "revisions": record["revisions"], "whole_repo": record["whole_repo"],
            "bytes_freed": record["bytes_freed"], "paths": _removed_paths(cache_dir, repo, record)}


def _removed_paths(cache_dir: Path, repo: str, record: dict) -> list[str]:
    """What an rm took out, relative to the HF cache (no cache paths in job results): the repo folder, or one
    revision's snapshot folder and the blobs only it used; nothing when there was nothing to remove."""
    folder = cache.repo_dir(cache_dir, repo).name
    if record.get("nothing"):
        return []
    if record["whole_repo"]:
        return [folder]
    return [f"{folder}/snapshots/{rev}" for rev in record["revisions"]] + \
        [f"{folder}/blobs/{blob}" for blob in record.get("blobs") or []]


def _refuse_if_superseded(job: dict) -> None:
    with closing(connect()) as conn:
        newer = [j for j in jobs_db.newer_jobs(conn, job) if KINDS.get(j["kind"]) and KINDS[j["kind"]].locks_model]
    if newer:
        later = newer[0]
        raise Cancelled(f"rm of {job['target']} was interrupted and is not run again: job {later['id']} "
                        f"({later['kind']}) was queued on the model after it. Run `mlxk rm {job['target']}` "
                        "again if you still want it removed.",
                        note=f"interrupted; superseded by job {later['id']} ({later['kind']}), nothing removed",
                        superseded_by=later["id"])


def _index_removed(repo: str, cache_dir: Path) -> None:
    if cache.repo_dir(cache_dir, repo).exists():
        _refresh_index({repo}, runtime=False, cache_dir=cache_dir)
        return
    with closing(connect()) as conn:
        models_db.delete_models(conn, [repo])


def _empty_leftover_trash(cache_dir: Path) -> None:
    """Finish deleting what interrupted rm jobs left in the cache, unless their job is still going somewhere."""
    leftovers = cache.trash_dirs(cache_dir)
    if not leftovers:
        return
    with closing(connect()) as conn:
        for job_id, trash in leftovers.items():
            row = jobs_db.get_job(conn, job_id)
            if row is None or row["state"] not in jobs_db.ACTIVE:
                cache.empty_trash(trash)


def _cached_snapshot(repo: str, revision: str | None, cache_dir: Path) -> Path | None:
    """The healthy cached snapshot a clone can use without the network, or None."""
    path = cache.repo_dir(cache_dir, repo)
    revisions = cache.list_revisions(path)
    if not revisions:
        return None
    if revision:
        try:  # the one rule set of every command (mlxk.names.pick_revision)
            sha = names.pick_revision(repo, revision, revisions, cache.refs(path))
        except MlxkError:
            return None   # not cached: the clone pulls it
    else:
        sha = cache.current_revision(path, revisions)
    _refresh_index({repo}, runtime=False, cache_dir=cache_dir)
    with closing(connect()) as conn:
        row = models_db.get_model(conn, repo)
    if not row or row.get("health") != "healthy" or row.get("revision") != sha:
        return None
    return path / "snapshots" / sha


def _pull_for_clone(repo: str, revision: str | None, ctx: JobContext):
    """Pull what the clone needs. A cached repo that is unhealthy is pulled too (that resumes or repairs it); when
    that pull fails, the error leads with what is wrong with the cached copy, not only what the Hub said."""
    try:
        return _pull(repo, {"revision": revision}, ctx)
    except MlxkError as error:
        if isinstance(error, Cancelled):
            raise
        with closing(connect()) as conn:
            row = models_db.get_model(conn, repo)
        if not row or row.get("health") == "healthy":
            raise
        raise CacheError(f"{repo} is cached but unhealthy: {row.get('reason') or 'see `mlxk health ' + repo + '`'}; "
                         f"the Hub could not replace it ({error.type}). Fix or replace its files "
                         f"(`mlxk health {repo}` lists the problems, `mlxk rm {repo}` removes it), then clone again.",
                         repo=repo, reason=row.get("reason"), pull_error=error.to_dict()) from error


def run_clone(job: dict, ctx: JobContext) -> dict:
    """Clone through a staging folder owned by this job (mlxk.clone.staging_dir), so a retry after a kill restarts
    its own unfinished copy instead of refusing it as "not empty"."""
    repo, args, cache_dir = job["target"], ctx.args, ctx.settings.cache
    dest = Path(args["dest"])
    published = (job.get("result") or {}).get("publishing") == str(dest)
    if published and not clone.staging_dir(dest, job["id"]).exists() and dest.is_dir() and any(dest.iterdir()):
        result = {"dest": str(dest), "resumed": True}   # killed after its one rename: the workspace is complete
    else:
        snapshot = _cached_snapshot(repo, args.get("revision"), cache_dir)
        pulled = None
        if snapshot is None:
            # Not cached (or unfinished): pull first; the pull never re-downloads files the cache already has.
            pulled = _pull_for_clone(repo, args.get("revision"), ctx)
            _refresh_index({repo}, runtime=True, cache_dir=cache_dir)
            snapshot = Path(pulled.snapshot_path)
        ctx.check()
        ctx.phase("cloning")
        ctx.record({"publishing": str(dest)})
        result = {"clone": plain(clone.clone(snapshot, dest, progress=ctx.progress, owner=job["id"])),
                  "pulled": _relative_snapshot(plain(pulled), cache_dir),
                  "snapshot": cache.cache_relative(snapshot, cache_dir)}
        ctx.flush()
    ctx.phase("checking the workspace")
    result["findings"] = plain(hub.check_workspace(dest))
    return result


def run_push(job: dict, ctx: JobContext) -> dict:
    s, args = ctx.settings, ctx.args
    ctx.phase("pushing")
    result = hub.push(Path(args["workspace"]), job["target"], private=bool(args.get("private")),
                      public=bool(args.get("public")), dry_run=bool(args.get("dry_run")),
                      force=bool(args.get("force")), endpoint=s.endpoint,
                      token=s.token or False, message=args.get("message"), progress=ctx.progress,
                      should_stop=ctx.should_stop)
    ctx.flush()
    return plain(result)


def run_scan(job: dict, ctx: JobContext) -> dict:
    args = ctx.args
    ctx.phase("scanning")
    _empty_leftover_trash(ctx.settings.cache)
    return plain(_refresh_index(args.get("repos"), runtime=True, force=bool(args.get("force")),
                                 cache_dir=ctx.settings.cache))


# ---------------------------------------------------------------- the job kinds: one table

USER_PRIORITY = 10       # user jobs run before background scans
SCAN_PRIORITY = 0


@dataclass(frozen=True)
class JobKind:
    """Everything a job kind means, declared once (as huey registers each task once)."""
    name: str
    handler: Callable[[dict, "JobContext"], dict]
    priority: int           # Huey priority: higher runs first
    dedupe: bool            # asking again while one is active (same target, same settings) returns that job
    locks_model: bool       # holds its target: another locking job on the same model waits for it
    inline: bool = False    # runs in the calling process (quick), recorded, locked and finished like any job


KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind("pull", run_pull, USER_PRIORITY, dedupe=True, locks_model=True),
    JobKind("rm", run_rm, USER_PRIORITY, dedupe=False, locks_model=True, inline=True),
    JobKind("clone", run_clone, USER_PRIORITY, dedupe=False, locks_model=True),
    JobKind("push", run_push, USER_PRIORITY, dedupe=False, locks_model=True),
    JobKind("scan", run_scan, SCAN_PRIORITY, dedupe=False, locks_model=False),   # reads only
)}


# ---------------------------------------------------------------- running a job

def _claim(job_id: str, task_id: str, spec: dict | None):
    with closing(connect()) as conn:
        row = jobs_db.get_job(conn, job_id)
        if row is None and spec:
            # state.db was rebuilt while the task waited: the task's own data gives the row back.
            jobs_db.restore_job(conn, spec, task_id=task_id, state="queued",
                                message="restored from the queue (state.db was rebuilt)")
            row = jobs_db.get_job(conn, job_id)
        lock_key = row["target"] if row and KINDS[row["kind"]].locks_model else None
        return jobs_db.claim(conn, job_id, task_id=task_id, worker=signals.worker_id(), lock_key=lock_key,
                             holder_alive=lambda worker: holder_alive(conn, worker))


def execute(job_id: str, task_id: str, spec: dict | None = None, *, inline: bool = False):
    """Claim and run one job; None when there is nothing to do (stale task, cancelled), else the result dict.

    Raises RetryLater when the model is held by another job, MlxkError / Cancelled for the outcome.
    """
    outcome, job = _claim(job_id, task_id, spec)
    if outcome == "locked":
        with closing(connect()) as conn:
            jobs_db.update_job(conn, job_id, where_state="queued", where_task=task_id,
                               message=f"waiting for job {job['id']} ({job['kind']}) on {job['target']}")
        raise RetryLater(job["id"])
    if outcome == "cancelled":
        jobsettings.drop(job_id)
    if outcome != "claimed":
        log.info("job %s: task %s has nothing to do (%s)", job_id, task_id, outcome)
        return None
    log.info("job %s: %s %s (attempt %s)", job_id, job["kind"], job["target"], job["attempts"])
    with closing(JobContext(job, task_id, inline=inline)) as ctx:
        result = KINDS[job["kind"]].handler(job, ctx)
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
        result = execute(job_id, task_id, inline=True)
    except RetryLater as busy:
        error = Conflict(f"the model is in use by job {busy.args[0]}; retry when it has finished.",
                         job_id=busy.args[0])
        signals.failed(job_id, task_id, error, from_states=("queued",))
        raise error from None
    except BaseException as exc:
        signals.failed(job_id, task_id, exc)
        if isinstance(exc, (MlxkError, KeyboardInterrupt)):
            raise
        raise Internal(f"job {job_id} failed: {type(exc).__name__}: {exc}") from exc
    signals.succeeded(job_id, task_id)
    return result


def register(huey) -> dict:
    """Create one Huey task per kind on `huey`, named as the kind; returns {kind: TaskWrapper}."""
    def make(kind: str):
        def task_fn(job_id: str, spec: dict | None = None, task=None):
            try:
                with logs.job_context(job_id):  # every line the job logs carries its id
                    return execute(job_id, task.id, spec)
            except RetryLater:
                raise RetryTask(delay=LOCK_RETRY_S) from None

        task_fn.__name__ = task_fn.__qualname__ = kind
        task_fn.__module__ = __name__
        return huey.task(context=True, name=kind)(task_fn)

    return {kind: make(kind) for kind in KINDS}
