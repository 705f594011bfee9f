"""The Huey instance: built from settings when first asked for, never at import.

Tests (and long-lived processes) change MLXK_HOME, so the instance is cached per queue URL rather than frozen at
import time. The same builder serves the CLI (which only enqueues) and the consumer (which also executes), and it
registers the tasks and the job-state signal handlers on every instance it builds, so a task enqueued by the CLI
has the same name the consumer looks up.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from mlxk import db
from mlxk.db import jobs as jobs_db
from mlxk.errors import ConfigError, StateError
from mlxk.workers import jobsettings, process

log = logging.getLogger("mlxk.queue")

QUEUE_NAME = "mlxk"
REDIS_CONNECT_TIMEOUT_S = 5.0

_instances: dict[str, object] = {}
_tasks: dict[int, dict] = {}      # id(huey) -> {kind: TaskWrapper}
_urls: dict[int, str] = {}        # id(huey) -> its queue URL, password hidden (for error messages)
_lock = threading.Lock()


def get_huey(queue_url: str | None = None):
    """The Huey instance for `queue_url` (default: settings().queue_url), with tasks and signals registered."""
    if queue_url is None:
        from mlxk.config import settings

        queue_url = settings().queue_url
    with _lock:
        huey = _instances.get(queue_url)
        if huey is None:
            huey = _build(queue_url)
            from mlxk.workers import signals, tasks

            _tasks[id(huey)] = tasks.register(huey)
            _urls[id(huey)] = redacted_url(queue_url)
            signals.connect(huey)
            _instances[queue_url] = huey
        return huey


def task_spec(job: dict) -> dict:
    """What a Huey task carries besides the job id: enough to re-create the job's row if state.db is rebuilt
    while the task waits or runs (never a secret: the token stays in workers.jobsettings' file)."""
    return {key: job.get(key) for key in ("id", "kind", "target", "args", "settings", "created_at")}


def enqueue(huey, job: dict, *, task_id: str) -> None:
    """Hand Huey the task that runs `job` (a row); `task_id` is recorded on the row (stale copies are skipped).
    Its priority is the kind's (workers.tasks.KINDS)."""
    from mlxk.workers.tasks import KINDS  # lazy: keeps `mlxk list` light

    wrapper = _tasks[id(huey)][job["kind"]]
    task = wrapper.s(job["id"], task_spec(job), id=task_id)
    task.priority = KINDS[job["kind"]].priority
    with _reachable(huey):
        huey.enqueue(task)


def submit(kind: str, target: str, args: dict, *, message: str | None = None, dedupe: bool = False,
           huey=None) -> tuple[dict, bool]:
    """Record a new job (with the settings and token of this process, see workers.jobsettings) and queue it.

    Returns (row, created); with `dedupe` an active job of the same kind, target and settings is returned instead.
    An inline kind (KINDS[kind].inline) is only recorded: the caller runs it.
    A queue that cannot take the task fails the row (state_error) and raises.
    """
    from mlxk.workers.tasks import KINDS  # lazy: keeps `mlxk list` light

    huey = huey or (None if KINDS[kind].inline else get_huey())   # first: a broken queue.db fails before a row
    record, token = jobsettings.capture()
    job_id = process.new_task_id()[:12]
    with closing(process.connect()) as conn:
        job, created = jobs_db.create_job(conn, id=job_id, kind=kind, target=target, args=args, task_id=job_id,
                                          message=message or "queued", dedupe=dedupe, settings=record)
        if not created:
            return job, False
        jobsettings.store_token(job_id, token)
        if KINDS[kind].inline:
            return job, True   # the caller runs it; only a recovery after its death queues it (workers.process)
        try:
            enqueue(huey, job, task_id=job_id)
        except Exception as error:  # noqa: BLE001 — record why, then let it surface
            jobs_db.finish(conn, job_id, state="failed", from_states=("queued",),
                           error=StateError(f"could not enqueue: {error}").to_dict())
            jobsettings.drop(job_id)
            raise
        return jobs_db.get_job(conn, job_id), True


def submit_scan(repos=None, *, force: bool = False) -> tuple[dict, bool]:
    """A health scan (all repos, or `repos`); joins a scan of the same cache that is still queued."""
    repos = sorted(set(repos)) if repos else None
    record, _token = jobsettings.capture()
    with closing(process.connect()) as conn:
        for job in jobs_db.list_jobs(conn, states=("queued",), kind="scan", limit=5):
            if (job["settings"] or record) != record:
                continue
            merged = _merge_scan_args(job["args"] or {}, repos, force)
            if merged != job["args"]:
                jobs_db.update_job(conn, job["id"], where_state="queued", args=merged,
                                   target=scan_target(merged.get("repos")))
            return jobs_db.get_job(conn, job["id"]), False
    return submit("scan", scan_target(repos), {"repos": repos, "force": force})


def _merge_scan_args(args: dict, repos, force: bool) -> dict:
    current = args.get("repos")
    merged = None if current is None or repos is None else sorted(set(current) | set(repos))
    return {"repos": merged, "force": bool(args.get("force")) or force}


def scan_target(repos: list[str] | None) -> str:
    """What `mlxk jobs` shows as a scan's target; the full list stays in its args."""
    if repos is None:
        return "*"
    return repos[0] if len(repos) == 1 else f"{repos[0]} and {len(repos) - 1} more"


def revoke(huey, task_id: str) -> None:
    """Make a worker skip task `task_id` once (a queued job that was cancelled)."""
    with _reachable(huey):
        huey.revoke_by_id(task_id, revoke_once=True)


def pending_tasks(huey) -> dict[str, dict | None]:
    """{task id: its job spec (None for a task queued by an older mlxk)} of tasks waiting in the queue or in the
    schedule (retry delays)."""
    found = {}
    with _reachable(huey):
        for task in list(huey.pending()) + list(huey.scheduled()):
            found[task.id] = task.args[1] if len(task.args) > 1 else None
    return found


def pending_task_ids(huey) -> set[str]:
    return set(pending_tasks(huey))


@contextmanager
def _reachable(huey):
    """Redis going away after the instance was built gives the same one-line error as at start, not a traceback."""
    try:
        yield
    except _redis_errors() as error:
        raise _unreachable(_urls.get(id(huey), "redis"), error) from error


def forget() -> None:
    """Drop cached instances (tests that delete or corrupt queue.db)."""
    with _lock:
        for huey in _instances.values():
            try:
                huey.storage.close()
                pool = getattr(huey.storage, "pool", None)   # Redis: close its sockets too
                if pool is not None:
                    pool.disconnect()
            except Exception:  # noqa: BLE001 — closing a broken storage must not hide the real problem
                log.debug("closing huey storage failed", exc_info=True)
        _instances.clear()
        _tasks.clear()
        _urls.clear()


def _build(queue_url: str):
    if queue_url.startswith(("redis://", "rediss://", "unix://")):
        return _redis_huey(queue_url)
    return _sqlite_huey(Path(queue_url).expanduser())


def _redis_huey(url: str):
    try:
        from redis import ConnectionPool, RedisError
    except ImportError:
        raise ConfigError(f"MLXK_QUEUE_URL={redacted_url(url)} needs the redis client, which is not installed. "
                          "Install it with `pip install 'mlxk[redis]'`, or unset MLXK_QUEUE_URL to use "
                          "the SQLite queue.") from None
    # PriorityRedisHuey, not RedisHuey: plain Redis storage refuses any task priority, and every mlxk task has
    # one (user jobs before background scans). It needs Redis >= 5 (sorted-set pops).
    from huey import PriorityRedisHuey

    try:
        # Our own pool so a host that does not answer fails in seconds instead of hanging the CLI; no socket
        # read timeout, because the consumer blocks on BZPOPMIN for its read_timeout.
        pool = ConnectionPool.from_url(url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S)
    except ValueError as error:
        raise ConfigError(f"MLXK_QUEUE_URL={redacted_url(url)} is not a valid Redis URL ({error}). "
                          "Use redis://HOST:PORT/DB, or unset MLXK_QUEUE_URL to use the SQLite queue.") from None
    huey = PriorityRedisHuey(QUEUE_NAME, connection_pool=pool, results=False, utc=True)
    # The client connects lazily; ping now so an unreachable server fails here, before a job row is written.
    try:
        huey.storage.conn.ping()
    except RedisError as error:
        pool.disconnect()
        raise _unreachable(redacted_url(url), error) from None
    return huey


def _redis_errors() -> tuple:
    try:
        from redis import RedisError
    except ImportError:
        return ()
    return (RedisError,)


def _unreachable(url: str, error: BaseException) -> StateError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return StateError(f"the job queue at MLXK_QUEUE_URL={url} cannot be reached ({reason}). Start Redis there "
                      "(or fix the URL), or unset MLXK_QUEUE_URL to use the local SQLite queue.", queue_url=url)


def redacted_url(url: str) -> str:
    """The URL with any password replaced, fit for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc[-1]}").geturl()


def _sqlite_huey(path: Path):
    from huey import SqliteHuey  # lazy: keeps `mlxk list` light

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        huey = SqliteHuey(QUEUE_NAME, filename=str(path), results=False, utc=True, timeout=10)
        # The storage connects lazily; touch it now so a broken file fails here, with a clear message.
        huey.storage.sql("SELECT count(*) FROM task", results=True)
    except (sqlite3.DatabaseError, OSError) as error:
        if db.failure_kind(error) != "corrupt":   # locked, read-only: deleting the queue would not help
            raise db.unusable(path, error, what="queue.db and state.db") from error
        raise StateError(
            f"the job queue {path} is not a usable SQLite database ({error}). Stop every mlxk worker and delete "
            f"{path} (and {path.name}-wal, {path.name}-shm beside it); queued jobs are re-enqueued from state.db "
            f"by the next worker.", path=str(path)) from error
    return huey
