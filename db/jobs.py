"""Named queries on the `jobs` table (the job history) and the `workers` table (heartbeats).

Functions take a connection from mlxk.db.connect and
return plain dicts with the JSON columns (`args`, `error`, `result`) decoded. Every state change is a conditional
UPDATE (`WHERE state = ... AND task_id = ...`), so a stale Huey task or a late signal can never overwrite a newer
outcome. Liveness of a job's holder is decided by the caller (it needs psutil or a clock); this module only stores.
"""
from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timezone

from mlxk.db import write

ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")

COLUMNS = (
    "id", "kind", "target", "args", "state", "bytes_done", "bytes_total", "files_done", "files_total", "rate",
    "eta", "message", "error", "result", "attempts", "cancel_requested", "task_id", "worker", "created_at",
    "started_at", "finished_at", "updated_at", "settings",
)
_JSON_COLUMNS = ("args", "error", "result", "settings")


def now_iso() -> str:
    """UTC ISO-8601 with milliseconds, so ordering by created_at follows enqueue order."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _conn(db) -> sqlite3.Connection:
    return getattr(db, "conn", db)


def _decode(row) -> dict:
    record = dict(zip(COLUMNS, tuple(row)))
    for column in _JSON_COLUMNS:
        value = record.get(column)
        record[column] = json.loads(value) if value else None
    record["cancel_requested"] = int(record.get("cancel_requested") or 0)
    return record


def _select(db, where: str = "", params=()) -> list[dict]:
    cursor = _conn(db).execute(f"SELECT {', '.join(COLUMNS)} FROM jobs {where}", params)
    return [_decode(row) for row in cursor.fetchall()]


# ---------------------------------------------------------------- reads

def get_job(db, job_id: str) -> dict | None:
    rows = _select(db, "WHERE id = ?", (job_id,))
    return rows[0] if rows else None


def jobs_with_prefix(db, prefix: str, limit: int = 20) -> list[dict]:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return _select(db, "WHERE id LIKE ? ESCAPE '\\' ORDER BY created_at LIMIT ?", (escaped + "%", limit))


def list_jobs(db, *, states=None, kind: str | None = None, target: str | None = None,
              limit: int | None = None) -> list[dict]:
    """Newest first."""
    clauses, params = [], []
    if states:
        clauses.append(f"state IN ({', '.join('?' * len(states))})")
        params.extend(states)
    if kind:
        clauses.append("kind = ?")
        params.append(kind)
    if target:
        clauses.append("target = ?")
        params.append(target)
    where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
    tail = f" LIMIT {int(limit)}" if limit else ""
    return _select(db, f"{where}ORDER BY created_at DESC, rowid DESC{tail}", params)


def active_jobs(db, *, target: str | None = None, kind: str | None = None) -> list[dict]:
    return list_jobs(db, states=ACTIVE, target=target, kind=kind)


def count_active(db, *, worker: str | None = None) -> int:
    """Queued jobs anywhere plus running jobs (all of them, or only those `worker` holds)."""
    if worker is None:
        sql, params = "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')", ()
    else:
        sql = "SELECT count(*) FROM jobs WHERE state = 'queued' OR (state = 'running' AND worker = ?)"
        params = (worker,)
    return _conn(db).execute(sql, params).fetchone()[0]


def run_flags(db, job_id: str) -> sqlite3.Row | None:
    """(state, task_id, cancel_requested) of a job: what a running task checks several times a second."""
    return _conn(db).execute("SELECT state, task_id, cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()


def cancel_requested(db, job_id: str) -> int:
    """0 = no, 1 = cancel (keep partial data), 2 = cancel and purge partial data."""
    row = _conn(db).execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return int(row[0] or 0) if row else 0


# ---------------------------------------------------------------- writes

def create_job(db, *, id: str, kind: str, target: str, args: dict, task_id: str, message: str | None = None,
               dedupe: bool = False, settings: dict | None = None) -> tuple[dict, bool]:
    """Insert a queued job; with `dedupe`, an active job of the same kind, target and settings is returned instead.

    Returns (job, created). The check and the insert share one IMMEDIATE transaction, so two CLIs pulling the
    same repo at once get one job; a pull of the same repo into another cache (or from another Hub) is another job.
    """
    stamp = now_iso()
    encoded = json.dumps(settings, sort_keys=True) if settings is not None else None
    with write(db) as conn:
        if dedupe:
            row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE kind = ? AND target = ? AND state IN "
                               "('queued', 'running') AND settings IS ? ORDER BY created_at LIMIT 1",
                               (kind, target, encoded)).fetchone()
            if row is not None:
                return _decode(row), False
        conn.execute(
            "INSERT INTO jobs (id, kind, target, args, state, task_id, message, attempts, cancel_requested, "
            "bytes_done, files_done, created_at, updated_at, settings) "
            "VALUES (?, ?, ?, ?, 'queued', ?, ?, 0, 0, 0, 0, ?, ?, ?)",
            (id, kind, target, json.dumps(args), task_id, message, stamp, stamp, encoded),
        )
    return get_job(db, id), True


def restore_job(db, spec: dict, *, task_id: str, state: str, message: str, worker: str | None = None,
                attempts: int = 0) -> bool:
    """Re-create the row of a job whose row is gone (state.db rebuilt) from what its task carries (`spec`: id, kind,
    target, args, settings, created_at). False when the row exists (nothing written)."""
    stamp = now_iso()
    with write(db) as conn:
        cursor = conn.execute(
            "INSERT OR IGNORE INTO jobs (id, kind, target, args, state, task_id, worker, message, attempts, "
            "cancel_requested, bytes_done, files_done, created_at, started_at, updated_at, settings) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, ?, ?, ?, ?)",
            (spec["id"], spec["kind"], spec["target"], json.dumps(spec.get("args") or {}), state, task_id, worker,
             message, attempts, spec.get("created_at") or stamp, stamp if state == "running" else None, stamp,
             json.dumps(spec["settings"], sort_keys=True) if spec.get("settings") is not None else None))
        return cursor.rowcount > 0


def newer_jobs(db, job: dict, *, kinds=None) -> list[dict]:
    """Jobs on the same target created after `job` (of `kinds`, default any), oldest first."""
    clauses, params = ["target = ?", "id != ?", "created_at > ?"], [job["target"], job["id"], job["created_at"]]
    if kinds:
        clauses.append(f"kind IN ({', '.join('?' * len(kinds))})")
        params.extend(kinds)
    return _select(db, f"WHERE {' AND '.join(clauses)} ORDER BY created_at", params)


def update_job(db, job_id: str, *, where_state=None, where_task: str | None = None, **fields) -> bool:
    """Set `fields` on one job (only while it is in `where_state` / held by `where_task`); True if it changed."""
    for column in _JSON_COLUMNS:
        if column in fields and fields[column] is not None and not isinstance(fields[column], str):
            fields[column] = json.dumps(fields[column], default=str)
    fields.setdefault("updated_at", now_iso())
    sets = ", ".join(f"{name} = ?" for name in fields)
    sql, params = f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), job_id]
    if where_state:
        states = (where_state,) if isinstance(where_state, str) else tuple(where_state)
        sql += f" AND state IN ({', '.join('?' * len(states))})"
        params.extend(states)
    if where_task is not None:
        sql += " AND task_id = ?"
        params.append(where_task)
    with write(db) as conn:
        return conn.execute(sql, params).rowcount > 0


def set_progress(db, job_id: str, *, task_id: str, bytes_done, bytes_total, files_done, files_total, rate, eta,
                 message) -> bool:
    """True when the row was written (it exists, is running and held by `task_id`)."""
    with write(db) as conn:
        return conn.execute(
            "UPDATE jobs SET bytes_done = ?, bytes_total = ?, files_done = ?, files_total = ?, rate = ?, eta = ?, "
            "message = ?, updated_at = ? WHERE id = ? AND task_id = ? AND state = 'running'",
            (bytes_done, bytes_total, files_done, files_total, rate, eta, message, now_iso(), job_id, task_id),
        ).rowcount > 0


def claim(db, job_id: str, *, task_id: str, worker: str, lock_key: str | None, holder_alive) -> tuple[str, dict | None]:
    """Atomically take a queued job: ("claimed", job) | ("locked", holding job) | ("stale", None) | ("cancelled", None).

    The per-model lock is the jobs table itself: a `running` job on the same target whose holder is alive (the
    caller's `holder_alive(worker_id)`) holds the model. Checking and marking run in one IMMEDIATE transaction, so
    two workers can never both take the same model.
    """
    with write(db) as conn:
        row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        job = _decode(row) if row else None
        if job is None or job["state"] != "queued" or job["task_id"] != task_id:
            return "stale", None
        stamp = now_iso()
        if job["cancel_requested"]:
            conn.execute("UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ? WHERE id = ?",
                         (stamp, stamp, job_id))
            return "cancelled", None
        if lock_key is not None:
            holders = conn.execute(
                f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE state = 'running' AND target = ? AND id != ?",
                (lock_key, job_id)).fetchall()
            for holder in map(_decode, holders):
                if holder_alive(holder["worker"]):
                    return "locked", holder
        conn.execute(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, worker = ?, started_at = ?, "
            "finished_at = NULL, error = NULL, rate = NULL, eta = NULL, updated_at = ? WHERE id = ?",
            (worker, stamp, stamp, job_id))
    return "claimed", get_job(db, job_id)


def finish(db, job_id: str, *, state: str, task_id: str | None = None, error: dict | None = None,
           message: str | None = None, from_states=("running",)) -> bool:
    """Move a job to a final state (only from `from_states`; only for the Huey task that holds it)."""
    fields = {"state": state, "finished_at": now_iso(), "rate": None, "eta": None}
    if error is not None:
        fields["error"] = error
    if message is not None:
        fields["message"] = message
    return update_job(db, job_id, where_state=from_states, where_task=task_id, **fields)


def requeue(db, job_id: str, *, new_task_id: str, message: str, from_states=("running",),
            old_task_id: str | None = None) -> bool:
    """Back to `queued` under a new Huey task id (the old task, if it is still running somewhere, is now stale)."""
    return update_job(db, job_id, where_state=from_states, where_task=old_task_id, state="queued",
                      task_id=new_task_id, worker=None, message=message, rate=None, eta=None)


# ---------------------------------------------------------------- workers (heartbeats)

def register_worker(db, *, id: str, kind: str, pid: int, host: str) -> None:
    stamp, ts = now_iso(), time.time()
    with write(db) as conn:
        conn.execute("INSERT OR REPLACE INTO workers (id, kind, pid, host, started_at, heartbeat_at, heartbeat_ts) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", (id, kind, pid, host, stamp, stamp, ts))


def heartbeat(db, worker_id: str) -> bool:
    """False when the worker has no row (state.db was rebuilt): the caller registers it again."""
    with write(db) as conn:
        return conn.execute("UPDATE workers SET heartbeat_at = ?, heartbeat_ts = ? WHERE id = ?",
                            (now_iso(), time.time(), worker_id)).rowcount > 0


def remove_worker(db, worker_id: str) -> None:
    with write(db) as conn:
        conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))


def get_worker(db, worker_id: str) -> dict | None:
    row = _conn(db).execute("SELECT id, kind, pid, host, started_at, heartbeat_at, heartbeat_ts FROM workers "
                            "WHERE id = ?", (worker_id,)).fetchone()
    return dict(zip(("id", "kind", "pid", "host", "started_at", "heartbeat_at", "heartbeat_ts"), tuple(row))) \
        if row else None


def workers(db, *, kind: str = "queue", fresh_after: float | None = None) -> list[dict]:
    """Workers of `kind`; with `fresh_after` (unix seconds) only those whose heartbeat is newer."""
    sql = "SELECT id, kind, pid, host, started_at, heartbeat_at, heartbeat_ts FROM workers WHERE kind = ?"
    params: list = [kind]
    if fresh_after is not None:
        sql += " AND heartbeat_ts >= ?"
        params.append(fresh_after)
    names = ("id", "kind", "pid", "host", "started_at", "heartbeat_at", "heartbeat_ts")
    return [dict(zip(names, tuple(row))) for row in _conn(db).execute(sql, params).fetchall()]
