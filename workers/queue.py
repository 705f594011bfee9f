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
from contextlib import contextmanager
from pathlib import Path

from mlxk.errors import ConfigError, StateError

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


def enqueue(huey, kind: str, job_id: str, *, task_id: str, priority: int | None = None) -> None:
    """Hand Huey the task that runs job `job_id`; `task_id` is recorded on the job row (stale copies are skipped)."""
    wrapper = _tasks[id(huey)][kind]
    task = wrapper.s(job_id, id=task_id)
    if priority is not None:
        task.priority = priority
    with _reachable(huey):
        huey.enqueue(task)


def revoke(huey, task_id: str) -> None:
    """Make a worker skip task `task_id` once (a queued job that was cancelled)."""
    with _reachable(huey):
        huey.revoke_by_id(task_id, revoke_once=True)


def pending_task_ids(huey) -> set[str]:
    """Ids of tasks waiting in the queue or in the schedule (retry delays)."""
    found = set()
    with _reachable(huey):
        for task in list(huey.pending()) + list(huey.scheduled()):
            found.add(task.id)
    return found


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
    from urllib.parse import urlsplit

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
    from huey import SqliteHuey

    from mlxk import db

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
