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
from pathlib import Path

from mlxk.errors import ConfigError, StateError

log = logging.getLogger("mlxk.queue")

QUEUE_NAME = "mlxk"

_instances: dict[str, object] = {}
_tasks: dict[int, dict] = {}      # id(huey) -> {kind: TaskWrapper}
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
            from workers import signals, tasks

            _tasks[id(huey)] = tasks.register(huey)
            signals.connect(huey)
            _instances[queue_url] = huey
        return huey


def enqueue(huey, kind: str, job_id: str, *, task_id: str, priority: int | None = None) -> None:
    """Hand Huey the task that runs job `job_id`; `task_id` is recorded on the job row (stale copies are skipped)."""
    wrapper = _tasks[id(huey)][kind]
    task = wrapper.s(job_id, id=task_id)
    if priority is not None:
        task.priority = priority
    huey.enqueue(task)


def pending_task_ids(huey) -> set[str]:
    """Ids of tasks waiting in the queue or in the schedule (retry delays)."""
    found = set()
    for task in list(huey.pending()) + list(huey.scheduled()):
        found.add(task.id)
    return found


def forget() -> None:
    """Drop cached instances (tests that delete or corrupt queue.db)."""
    with _lock:
        for huey in _instances.values():
            try:
                huey.storage.close()
            except Exception:  # noqa: BLE001 — closing a broken storage must not hide the real problem
                log.debug("closing huey storage failed", exc_info=True)
        _instances.clear()
        _tasks.clear()


def _build(queue_url: str):
    if queue_url.startswith(("redis://", "rediss://", "unix://")):
        return _redis_huey(queue_url)
    return _sqlite_huey(Path(queue_url).expanduser())


def _redis_huey(url: str):
    try:
        import redis  # noqa: F401 — only to give a clear message when the optional extra is missing
    except ImportError:
        raise ConfigError(f"MLXK_QUEUE_URL={url} needs the redis client, which is not installed. "
                          "Install it with `pip install 'mlxk[redis]'`, or unset MLXK_QUEUE_URL to use "
                          "the SQLite queue.") from None
    from huey import RedisHuey

    return RedisHuey(QUEUE_NAME, url=url, results=False, utc=True)


def _sqlite_huey(path: Path):
    from huey import SqliteHuey

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        huey = SqliteHuey(QUEUE_NAME, filename=str(path), results=False, utc=True, timeout=10)
        # The storage connects lazily; touch it now so a broken file fails here, with a clear message.
        huey.storage.sql("SELECT count(*) FROM task", results=True)
    except sqlite3.DatabaseError as error:
        raise StateError(
            f"the job queue {path} is not a usable SQLite database ({error}). Stop every mlxk worker and delete "
            f"{path} (and {path.name}-wal, {path.name}-shm beside it); queued jobs are re-enqueued from state.db "
            f"by the next worker.", path=str(path)) from error
    return huey
