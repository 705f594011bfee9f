"""Job worker processes: who is alive, starting one when none is, and taking back the jobs of one that died.

Why here: the worker side owns its processes. The CLI and the api only ask (`ensure_worker`, `notice_dead`); the
consumer runs `recover` at start and every few seconds. A job's holder is a process id `host:pid:start`: on this
host a dead pid (or a reused one, with another start time) is dead at once; on another host a heartbeat older
than STALE_S is. A job whose holder died is never left `running`: the first process that notices puts it back in
the queue (state `queued`, message "interrupted …; resuming"), and makes sure a worker is alive to resume it.
"""
from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import time
import uuid
from contextlib import closing
from pathlib import Path

import psutil

from mlxk import db as statedb
from mlxk import processes
from mlxk.clock import parse_iso
from mlxk.config import child_env, settings
from mlxk.db import jobs as jobs_db
from mlxk.locks import file_lock
from mlxk.workers import queue

log = logging.getLogger("mlxk.process")

HEARTBEAT_S = 2.0        # a worker writes its heartbeat this often
STALE_S = 10.0           # a heartbeat older than this (on another host) means the worker is gone
LOST_TASK_GRACE_S = 5.0  # a queued row younger than this may still be on its way into the queue


# ---------------------------------------------------------------- state.db

def connect() -> sqlite3.Connection:
    """A raw connection to state.db (the fast path: no sqlite-utils import)."""
    return statedb.connect(settings().state_db)


class StateConnection:
    """One long-lived state.db connection (a worker's heartbeat, a job's progress) that follows the file.

    state.db can be moved aside and rebuilt while a worker runs (a corrupt file is quarantined by whoever opens it
    next). A connection opened before keeps writing into the old file, where nobody reads: so each use compares
    the inode of the path with the one opened, and reopens when they differ; a DatabaseError also reopens (the
    reopen quarantines a corrupt file). Not thread-safe by itself: callers serialize.
    """

    def __init__(self, *, shared: bool = False):
        self.shared = shared
        self._conn: sqlite3.Connection | None = None
        self._inode: int | None = None

    def get(self) -> sqlite3.Connection:
        path = settings().state_db
        try:
            inode = os.stat(path).st_ino
        except OSError:
            inode = None
        if self._conn is not None and inode != self._inode:
            self.close()
        if self._conn is None:
            self._conn = statedb.connect(path, shared=self.shared)
            self._inode = os.stat(path).st_ino
        return self._conn

    def run(self, fn):
        """`fn(conn)`, once more on a fresh connection when the file turned out unusable."""
        try:
            return fn(self.get())
        except sqlite3.DatabaseError as error:
            log.warning("state.db failed (%s); reopening it", error)
            self.close()
            return fn(self.get())

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn, self._inode = None, None


# ---------------------------------------------------------------- ids and liveness

def new_task_id() -> str:
    return uuid.uuid4().hex


def hostname() -> str:
    return socket.gethostname()


def process_id(pid: int | None = None) -> str:
    """`host:pid:start` — the start time makes a reused pid a different process."""
    pid = pid or os.getpid()
    return f"{hostname()}:{pid}:{int(_create_time(pid) or 0)}"


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not reaped) is not alive."""
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


# ---------------------------------------------------------------- starting a worker

def worker_pidfile(config=None) -> Path:
    """Where the background worker's pid goes; `config` saves a caller that holds settings() reading them again."""
    return (config or settings()).run_dir / "worker.pid"


def _pidfile_alive(path: Path) -> bool:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return pid_alive(pid)


def _worker_env() -> dict[str, str]:
    """A background job worker's environment: ours, paths absolute, minus the api's key (a job never needs it, and
    a worker started by `mlxk serve --api-key` must not carry it)."""
    env = child_env(processes.started_by_cli())
    env.pop("MLXK_API_KEY", None)
    return env


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
                    env=_worker_env(),
                )
            worker_pidfile(s).write_text(f"{proc.pid}\n")
            log.info("started a background worker, pid %s", proc.pid)
            return proc.pid
    finally:
        if own:
            conn.close()


# ---------------------------------------------------------------- jobs of dead workers

def interrupted_message(worker: str | None) -> str:
    return f"interrupted: its worker ({worker or 'unknown'}) died; resuming"


def requeue(huey, job: dict, *, message: str, from_states=("running",)) -> bool:
    """Put a job back in the queue under a new task id; False when the row had moved on (nothing done)."""
    new_task = new_task_id()
    with closing(connect()) as conn:
        if not jobs_db.requeue(conn, job["id"], new_task_id=new_task, old_task_id=job["task_id"], message=message,
                               from_states=from_states):
            return False
    queue.enqueue(huey, job, task_id=new_task)
    log.info("job %s re-queued as task %s (%s)", job["id"], new_task, message)
    return True


def notice_dead(conn, rows: list[dict]) -> bool:
    """For readers (`mlxk jobs`, the jobs API): re-queue every `running` row whose holder is dead and make sure a
    worker is alive to resume it. True when something changed (the caller reads the rows again)."""
    dead = [r for r in rows if r["state"] == "running" and not holder_alive(conn, r["worker"])]
    if not dead:
        return False

    huey = queue.get_huey()
    changed = False
    for job in dead:
        if requeue(huey, job, message=interrupted_message(job["worker"])):
            log.warning("job %s was left running by %s, which is gone; re-queued", job["id"], job["worker"])
            changed = True
    ensure_worker(conn)
    return changed


def recover(huey, *, grace_s: float = LOST_TASK_GRACE_S) -> list[str]:
    """The consumer's pass: re-queue jobs whose holder died, re-enqueue queued jobs whose task is not in the
    queue, and give back rows to tasks whose row is missing (a state.db rebuilt). Returns the job ids touched."""
    recovered = []
    with closing(connect()) as conn:
        running = jobs_db.list_jobs(conn, states=("running",))
        queued = jobs_db.list_jobs(conn, states=("queued",))
        for job in running:
            if not holder_alive(conn, job["worker"]) and requeue(huey, job, message=interrupted_message(job["worker"])):
                log.warning("job %s was left running by %s, which is gone; re-queued", job["id"], job["worker"])
                recovered.append(job["id"])
        tasks = queue.pending_tasks(huey)
        for task_id, spec in tasks.items():
            if spec and jobs_db.get_job(conn, spec["id"]) is None:
                jobs_db.restore_job(conn, spec, task_id=task_id, state="queued",
                                    message="restored from the queue (state.db was rebuilt)")
                recovered.append(spec["id"])
    cutoff = time.time() - grace_s
    for job in queued:
        if job["task_id"] in tasks or (parse_iso(job["updated_at"]) or 0) > cutoff:
            continue
        if requeue(huey, job, from_states=("queued",), message="its queue entry was lost; re-queued"):
            log.warning("job %s was queued but not in the queue; re-enqueued", job["id"])
            recovered.append(job["id"])
    return recovered
