"""Jobs as the CLI (and the api) see them: enqueue, find, follow, cancel, retry, and keep a worker alive.

Why this layer: a job command must return in a few hundred milliseconds, so nothing here imports
huggingface_hub or mlx; it writes a row to state.db, hands Huey a task id, and makes sure some consumer is
alive to run it (starting one in the background when none is). The worker side (workers/) does the work and
moves the row through its states; this module only reads those states, and requests cancels.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from mlxk import db as statedb
from mlxk.db import jobs as jobs_db
from mlxk.config import child_env, settings
from mlxk.locks import file_lock
from mlxk.errors import (Conflict, InvalidName, JobCancelled, JobFailed, JobNotFound, AmbiguousMatch, MlxkError,
                         ModelNotFound)

log = logging.getLogger("mlxk.jobs")

HEARTBEAT_S = 2.0        # a worker writes its heartbeat this often
STALE_S = 10.0           # a heartbeat older than this (on another host) means the worker is gone
USER_PRIORITY = 10       # user jobs run before background scans
SCAN_PRIORITY = 0
RESCAN_AFTER_S = 30.0    # request_scan does not repeat a scan of the same repos that ended this recently
RECENT_FINISHED = 10     # `mlxk jobs` shows every active job and this many finished ones


@dataclass
class Enqueued:
    job: dict
    created: bool                  # False: an active job for the same thing already existed; this is that job
    worker_started: int | None = None   # pid of a worker started in the background for it
    retry_of: str | None = None


# ---------------------------------------------------------------- ids and liveness

def new_id() -> str:
    return uuid.uuid4().hex[:12]


def hostname() -> str:
    return socket.gethostname()


def process_id(pid: int | None = None) -> str:
    """`host:pid:start` — the start time makes a reused pid a different process."""
    pid = pid or os.getpid()
    return f"{hostname()}:{pid}:{int(_create_time(pid) or 0)}"


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not reaped) is not alive."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def holder_alive(conn, worker_id: str | None) -> bool:
    """Is the process that holds a job still there? Same host: its pid (and start time); else its heartbeat."""
    if not worker_id:
        return False
    host, _, rest = worker_id.partition(":")
    pid_text, _, start = rest.partition(":")
    if host == hostname() and pid_text.isdigit():
        pid = int(pid_text)
        if not pid_alive(pid):
            return False
        created = _create_time(pid)
        return not (start.isdigit() and created is not None and abs(int(created) - int(start)) > 1)
    row = jobs_db.get_worker(conn, worker_id)
    return bool(row and row["heartbeat_ts"] and row["heartbeat_ts"] >= time.time() - STALE_S)


def live_workers(conn) -> list[dict]:
    fresh = jobs_db.workers(conn, kind="queue", fresh_after=time.time() - STALE_S)
    return [w for w in fresh if w["host"] != hostname() or pid_alive(w["pid"])]


# ---------------------------------------------------------------- state.db

def connect():
    """A raw connection to state.db (the fast path: no sqlite-utils import)."""
    return statedb.connect(settings().state_db)


# ---------------------------------------------------------------- worker start

def _pidfile_alive(path: Path) -> bool:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return pid_alive(pid)


def worker_pidfile(config=None) -> Path:
    """Where the background worker's pid goes; `config` saves a caller that holds settings() reading them again."""
    return (config or settings()).run_dir / "worker.pid"


def ensure_worker(conn=None) -> int | None:
    """Start a background consumer when none is alive; the pid of the one started, else None.

    A lock file makes two CLIs racing here start one worker; the pid file covers the second or so between the
    start and the new worker's first heartbeat.
    """
    s = settings()
    own = conn is None
    conn = conn or connect()
    try:
        if live_workers(conn):
            return None
        s.log_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(s.run_dir / "worker.lock"):
            if live_workers(conn) or _pidfile_alive(worker_pidfile(s)):
                return None
            with open(s.log_dir / "worker.log", "ab") as logfile:
                from mlxk import processes

                proc = subprocess.Popen(   # isolated from the user's directory: see mlxk.processes
                    processes.python_argv("-m", "mlxk.workers", "--background"),
                    stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True, cwd=processes.SAFE_CWD,
                    env=child_env(processes.started_by_cli()),
                )
            worker_pidfile(s).write_text(f"{proc.pid}\n")
            log.info("started a background worker, pid %s", proc.pid)
            return proc.pid
    finally:
        if own:
            conn.close()


# ---------------------------------------------------------------- enqueue

def _enqueue(kind: str, target: str, args: dict, *, dedupe: bool = False, message: str | None = None,
             start_worker: bool = True, priority: int = USER_PRIORITY) -> Enqueued:
    from mlxk.workers import queue

    huey = queue.get_huey()   # first: a broken queue.db fails before a row is written
    job_id = new_id()
    with closing(connect()) as conn:
        job, created = jobs_db.create_job(conn, id=job_id, kind=kind, target=target, args=args, task_id=job_id,
                                          message=message or "queued", dedupe=dedupe)
        if created:
            try:
                queue.enqueue(huey, kind, job_id, task_id=job_id, priority=priority)
            except Exception as error:  # noqa: BLE001 — record why, then let it surface
                jobs_db.finish(conn, job_id, state="failed", from_states=("queued",),
                               error={"type": "state_error", "message": f"could not enqueue: {error}"})
                raise
        started = ensure_worker(conn) if start_worker else None
        return Enqueued(job=job_object(jobs_db.get_job(conn, job["id"])), created=created, worker_started=started)


def enqueue_pull(name: str, *, include=(), exclude=()) -> Enqueued:
    from mlxk import names

    try:
        ref = names.parse(name, allow_bare=False)
    except InvalidName as error:
        raise InvalidName(f"{error.message} `mlxk pull` needs the full repo id.", **error.details) from None
    args = {"revision": ref.revision, "include": list(include) or None, "exclude": list(exclude) or None}
    return _enqueue("pull", ref.repo, args, dedupe=True)


def enqueue_clone(name: str, dest: Path) -> Enqueued:
    from mlxk import names

    ref = names.parse(name, allow_bare=True)
    repo = ref.repo if "/" in ref.repo else resolve_cached(ref.repo)[0]
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and any(dest.iterdir()):
        raise Conflict(f"{dest} exists and is not empty; clone into a new or empty directory.", path=str(dest))
    return _enqueue("clone", repo, {"revision": ref.revision, "dest": str(dest)})


def enqueue_push(workspace: Path, repo_id: str, *, private: bool = False, public: bool = False,
                 dry_run: bool = False, message: str | None = None) -> Enqueued:
    from mlxk import names

    names.validate_repo_id(repo_id)
    workspace = Path(workspace).expanduser().resolve()
    if not workspace.is_dir():
        raise MlxkError(f"{workspace} is not a directory; push needs a workspace made by `mlxk clone`.")
    if private and public:
        raise MlxkError("--private and --public contradict each other; give one.")
    args = {"workspace": str(workspace), "private": private, "public": public, "dry_run": dry_run,
            "message": message}
    return _enqueue("push", repo_id, args)


def enqueue_scan(repos=None, *, force: bool = False, start_worker: bool = True) -> Enqueued:
    """A health scan (all repos, or `repos`); joins a scan that is still queued rather than adding another."""
    repos = sorted(set(repos)) if repos else None
    with closing(connect()) as conn:
        pending = jobs_db.list_jobs(conn, states=("queued",), kind="scan", limit=1)
        if pending:
            job = pending[0]
            merged = _merge_scan_args(job["args"] or {}, repos, force)
            if merged != job["args"]:
                jobs_db.update_job(conn, job["id"], where_state="queued", args=merged,
                                   target=_scan_target(merged.get("repos")))
            started = ensure_worker(conn) if start_worker else None
            return Enqueued(job=job_object(jobs_db.get_job(conn, job["id"])), created=False, worker_started=started)
    return _enqueue("scan", _scan_target(repos), {"repos": repos, "force": force},
                    start_worker=start_worker, priority=SCAN_PRIORITY)


def _merge_scan_args(args: dict, repos, force: bool) -> dict:
    current = args.get("repos")
    merged = None if current is None or repos is None else sorted(set(current) | set(repos))
    return {"repos": merged, "force": bool(args.get("force")) or force}


def _scan_target(repos: list[str] | None) -> str:
    """What `mlxk jobs` shows as a scan's target; the full list stays in its args."""
    if repos is None:
        return "*"
    return repos[0] if len(repos) == 1 else f"{repos[0]} and {len(repos) - 1} more"


def request_scan(repo_ids) -> str | None:
    """Cheap hook for `mlxk list`: make sure a scan of `repo_ids` is pending and a worker will run it."""
    repo_ids = sorted(set(repo_ids or ()))
    if not repo_ids:
        return None
    with closing(connect()) as conn:
        covering = _covering_scan(conn, repo_ids)
    if covering is not None:
        return covering
    return enqueue_scan(repo_ids).job["id"]


def _covering_scan(conn, repo_ids: list[str]) -> str | None:
    """A running scan of these repos, or one that finished moments ago: asking again would only loop.

    `list` asks whenever a repo's runtime verdict is pending; if a scan could not settle it, a new job on every
    `list` would fill the history without changing anything.
    """
    from mlxk.clock import parse_iso

    recent = time.time() - RESCAN_AFTER_S
    for job in jobs_db.list_jobs(conn, kind="scan", limit=5):
        if job["state"] == "queued":
            continue
        if job["state"] != "running" and (parse_iso(job["finished_at"]) or 0) < recent:
            continue
        scope = (job["args"] or {}).get("repos")
        if scope is None or set(repo_ids) <= set(scope):
            return job["id"]
    return None


# ---------------------------------------------------------------- read

def job_object(row: dict) -> dict:
    """The public shape of a job (CLI --json, jobs API)."""
    total, done = row.get("bytes_total"), row.get("bytes_done") or 0
    percent = round(100.0 * done / total, 1) if total else (100.0 if row["state"] == "succeeded" else None)
    return {
        "id": row["id"],
        "kind": row["kind"],
        "target": row["target"],
        "args": row["args"] or {},
        "state": row["state"],
        "progress": {
            "bytes_done": done, "bytes_total": total,
            "files_done": row.get("files_done") or 0, "files_total": row.get("files_total"),
            "percent": percent, "rate": row.get("rate"), "eta": row.get("eta"),
        },
        "message": row.get("message"),
        "error": row.get("error"),
        "result": row.get("result"),
        "attempts": row.get("attempts") or 0,
        "cancel_requested": bool(row.get("cancel_requested")),
        "worker": row.get("worker"),
        "task_id": row.get("task_id"),
        "created_at": row.get("created_at"),
        "started_at": row.get("started_at"),
        "finished_at": row.get("finished_at"),
        "updated_at": row.get("updated_at"),
    }


def find_job(conn, prefix: str) -> dict:
    """The row of the job `prefix` names (a full id or a unique prefix)."""
    prefix = (prefix or "").strip().lower()
    if not prefix:
        raise JobNotFound("give a job id (see `mlxk jobs`).")
    row = jobs_db.get_job(conn, prefix)
    if row:
        return row
    hits = jobs_db.jobs_with_prefix(conn, prefix)
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise AmbiguousMatch(f"job id {prefix!r} matches {len(hits)} jobs: {', '.join(h['id'] for h in hits)}. "
                             "Give more characters.", matches=[h["id"] for h in hits])
    raise JobNotFound(f"no job matches {prefix!r}. List jobs with `mlxk jobs --all`.", id=prefix)


def get(prefix: str) -> dict:
    with closing(connect()) as conn:
        return job_object(find_job(conn, prefix))


def list_jobs(*, all_jobs: bool = False, states=None, kind: str | None = None) -> list[dict]:
    with closing(connect()) as conn:
        if all_jobs or states:
            rows = jobs_db.list_jobs(conn, states=states, kind=kind)
        else:
            rows = jobs_db.list_jobs(conn, states=jobs_db.ACTIVE, kind=kind)
            rows += jobs_db.list_jobs(conn, states=jobs_db.FINISHED, kind=kind, limit=RECENT_FINISHED)
        return [job_object(r) for r in rows]


def active(*, kind: str | None = None, target: str | None = None) -> list[dict]:
    with closing(connect()) as conn:
        return [job_object(r) for r in jobs_db.active_jobs(conn, kind=kind, target=target)]


def follow(job_id: str, on_update=None, *, poll_s: float = 0.25, timeout_s: float | None = None) -> dict:
    """Poll a job until it ends; `on_update(job)` sees every poll. Restarts a worker if the last one died."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    next_check = time.monotonic() + STALE_S / 2
    with closing(connect()) as conn:
        while True:
            row = jobs_db.get_job(conn, job_id)
            if row is None:
                raise JobNotFound(f"job {job_id} disappeared from {settings().state_db}.", id=job_id)
            job = job_object(row)
            if on_update:
                on_update(job)
            if job["state"] in jobs_db.FINISHED:
                return job
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + STALE_S / 2
                if job["kind"] != "rm":
                    ensure_worker(conn)
            if deadline is not None and time.monotonic() >= deadline:
                return job
            time.sleep(poll_s)


def outcome_error(job: dict) -> MlxkError | None:
    """The error a finished, unsuccessful job ends a command with (its own error type, so scripts can match)."""
    if job["state"] == "succeeded":
        return None
    error = job.get("error") or {}
    if job["state"] == "cancelled":
        text = error.get("message") or "cancelled"
        return JobCancelled(f"job {job['id']} ({job['kind']} {job['target']}) was cancelled: {text}",
                            job_id=job["id"], state="cancelled")
    failure = JobFailed(f"job {job['id']} ({job['kind']} {job['target']}) failed: "
                        f"{error.get('message') or 'unknown error'}", job_id=job["id"], state=job["state"])
    if error.get("type"):
        failure.type = error["type"]  # the job's own error type (hub_error, disk_full...), so scripts can match
    return failure


# ---------------------------------------------------------------- cancel / retry

def cancel(prefix: str, *, purge: bool = False, wait_s: float = 3.0) -> dict:
    """Queued → cancelled now (its Huey task revoked); running → the task stops cooperatively within ~2 s."""
    level = 2 if purge else 1
    with closing(connect()) as conn:
        row = find_job(conn, prefix)
        if row["state"] in jobs_db.FINISHED:
            raise Conflict(f"job {row['id']} already {row['state']}; there is nothing to cancel.", id=row["id"])
        if row["state"] == "queued":
            done = jobs_db.finish(conn, row["id"], state="cancelled", from_states=("queued",),
                                  message="cancelled before it started",
                                  error={"type": "cancelled", "message": "cancelled before it started"})
            jobs_db.update_job(conn, row["id"], cancel_requested=level)
            if done:
                _revoke(row["task_id"])
                return job_object(jobs_db.get_job(conn, row["id"]))
        jobs_db.update_job(conn, row["id"], where_state="running", cancel_requested=level)
        row = jobs_db.get_job(conn, row["id"])
        if row["state"] == "running" and not holder_alive(conn, row["worker"]):
            jobs_db.finish(conn, row["id"], state="cancelled", message="cancelled (its worker was gone)",
                           error={"type": "cancelled", "message": "cancelled while its worker was gone"})
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            row = jobs_db.get_job(conn, row["id"])
            if row["state"] != "running":
                break
            time.sleep(0.1)
        return job_object(jobs_db.get_job(conn, row["id"]))


def _revoke(task_id: str | None) -> None:
    if not task_id:
        return
    from mlxk.workers import queue

    queue.revoke(queue.get_huey(), task_id)


def retry(prefix: str) -> Enqueued:
    """A failed or cancelled job → a NEW job with the same arguments (the old row stays as history)."""
    with closing(connect()) as conn:
        row = find_job(conn, prefix)
    if row["state"] not in ("failed", "cancelled"):
        raise Conflict(f"job {row['id']} is {row['state']}; only failed or cancelled jobs can be retried.",
                       id=row["id"])
    message = f"retry of {row['id']}"
    if row["kind"] == "rm":
        outcome = run_rm_job(row["target"], row["args"] or {}, message=message)
        outcome.retry_of = row["id"]
        return outcome
    priority = SCAN_PRIORITY if row["kind"] == "scan" else USER_PRIORITY
    outcome = _enqueue(row["kind"], row["target"], row["args"] or {}, dedupe=row["kind"] == "pull",
                       message=message, priority=priority)
    outcome.retry_of = row["id"]
    return outcome


# ---------------------------------------------------------------- rm

@dataclass
class RemovalTarget:
    repo_id: str
    revision: str | None       # full hash, or None for the whole repo
    fuzzy: bool


def cached_repo_ids() -> list[str]:
    from mlxk import cache

    return [repo_id for repo_id, _entry in cache.iter_repo_dirs(settings().hf_hub_cache)]


def resolve_cached(name: str) -> tuple[str, bool]:
    """(repo id, fuzzy?) of the cached repo `name` means."""
    from mlxk import names

    repo = names.resolve(name, cached_repo_ids())
    return repo, repo.lower() != name.lower()


def resolve_removal(name: str, *, force: bool = False) -> RemovalTarget:
    from mlxk import cache, names

    ref = names.parse(name, allow_bare=True)
    repo, fuzzy = resolve_cached(ref.repo)
    if fuzzy and not force:
        raise Conflict(f"{ref.repo!r} is not an exact name; it matches {repo}. "
                       f"Run `mlxk rm {repo}` or add --force to remove it.", match=repo)
    revision = None
    if ref.revision:
        revisions = cache.list_revisions(cache.repo_dir(settings().hf_hub_cache, repo))
        if not names.is_commit_prefix(ref.revision):
            raise InvalidName(f"`mlxk rm {name}`: the part after '@' must be a commit hash (see `mlxk show {repo}`).",
                              name=name)
        revision = names.resolve_revision(repo, ref.revision, revisions)
    return RemovalTarget(repo, revision, fuzzy)


def plan_removal(target: RemovalTarget):
    from mlxk import cache

    return cache.plan_remove(settings().hf_hub_cache, target.repo_id, target.revision)


def _refuse_if_busy(conn, repo_id: str) -> None:
    busy = [j for j in jobs_db.active_jobs(conn, target=repo_id) if j["kind"] != "scan"]
    if busy:
        job = busy[0]
        raise Conflict(f"{repo_id} is in use by job {job['id']} ({job['kind']}, {job['state']}). Wait for it "
                       f"(`mlxk jobs watch {job['id']}`) or cancel it (`mlxk jobs cancel {job['id']}`), then retry.",
                       job_id=job["id"])


def run_rm_job(repo_id: str, args: dict, *, message: str | None = None) -> Enqueued:
    """rm runs in the calling process (it is quick) but is recorded, locked and finished like any job."""
    from mlxk.workers import tasks

    job_id = new_id()
    with closing(connect()) as conn:
        _refuse_if_busy(conn, repo_id)
        jobs_db.create_job(conn, id=job_id, kind="rm", target=repo_id, args=args, task_id=job_id,
                           message=message or "queued")
    tasks.run_inline(job_id)
    with closing(connect()) as conn:
        return Enqueued(job=job_object(jobs_db.get_job(conn, job_id)), created=True)


def remove(target: RemovalTarget) -> Enqueued:
    if target.repo_id not in cached_repo_ids():
        raise ModelNotFound(f"{target.repo_id} is not cached.", name=target.repo_id)
    return run_rm_job(target.repo_id, {"revision": target.revision})
