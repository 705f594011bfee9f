"""The job worker: a Huey consumer (a few threads) plus what makes it safe to kill and cheap to leave running.

- A heartbeat in state.db's `workers` table every ~2 s: the CLI starts a worker only when none is alive.
- At start (and every few seconds) jobs left `running` by a process that died are put back in the queue, queued
  jobs whose Huey task was lost (a deleted queue.db, a CLI killed between its two writes) are re-enqueued, and
  tasks whose row is missing (state.db rebuilt) get it back (workers.process.recover).
- One health scan at start, as a low-priority job.
- Started in the background by the CLI (`--background`), it exits after `worker_idle_s` with nothing queued or
  running, so nothing lingers.
- SIGTERM interrupts running tasks; they are re-queued (workers.signals), never failed. SIGINT drains gracefully.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import closing

from huey.consumer import Consumer, ConsumerStopped

from mlxk import logs
from mlxk.config import LOG_LEVELS, settings
from mlxk.db import jobs as jobs_db
from mlxk.errors import Internal, MlxkError
from mlxk.workers import queue, signals
from mlxk.workers.process import HEARTBEAT_S, StateConnection, connect, hostname, recover, worker_pidfile

log = logging.getLogger("mlxk.consumer")

DEFAULT_THREADS = 3
RECOVER_EVERY_S = 3.0      # a peer worker's dead jobs are taken back within this (readers notice at once)
IDLE_CHECK_EVERY_S = 0.5


class JobConsumer(Consumer):
    """Huey's consumer, with heartbeat, periodic recovery and idle exit in its main loop."""

    def __init__(self, huey, *, worker_id: str, idle_exit_s: float | None = None, **options):
        super().__init__(huey, **options)
        self.worker_id = worker_id
        self.idle_exit_s = idle_exit_s
        now = time.monotonic()
        self._next_beat = now
        self._next_recover = now + RECOVER_EVERY_S
        self._next_idle_check = now
        self._idle_since = now
        # state.db for the heartbeat and the idle check: opened once, not every tick; both run on the main thread.
        self._state = StateConnection()

    def run(self):
        try:
            super().run()
        finally:
            self._drop_db()

    def loop(self, health_check_ts=None):
        health_check_ts = super().loop(health_check_ts)
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + HEARTBEAT_S
            self._beat()
        if now >= self._next_recover:
            self._next_recover = now + RECOVER_EVERY_S
            self._recover()
        if self.idle_exit_s is not None and now >= self._next_idle_check:
            self._next_idle_check = now + IDLE_CHECK_EVERY_S
            if self._busy():
                self._idle_since = now
            elif now - self._idle_since >= self.idle_exit_s:
                log.info("idle for %.0f s with nothing queued; exiting", now - self._idle_since)
                self.stop(graceful=True)
                raise ConsumerStopped
        return health_check_ts

    # The main loop is a supervisor: a failed heartbeat or check is logged and tried again, never fatal.
    def _beat(self) -> None:
        try:
            self._state.run(self._beat_once)
        except Exception:  # noqa: BLE001
            log.warning("heartbeat failed", exc_info=True)
            self._drop_db()   # the next tick opens a fresh connection

    def _beat_once(self, conn) -> None:
        if not jobs_db.heartbeat(conn, self.worker_id):   # no row: state.db was rebuilt; register again
            jobs_db.register_worker(conn, id=self.worker_id, kind="queue", pid=os.getpid(), host=hostname())

    def _recover(self) -> None:
        try:
            recover(self.huey)
        except Exception:  # noqa: BLE001
            log.warning("recovery pass failed", exc_info=True)

    def _busy(self) -> bool:
        try:
            if self.huey.pending_count() or self.huey.scheduled_count():
                return True
            return self._state.run(lambda conn: jobs_db.count_active(conn, worker=self.worker_id)) > 0
        except Exception:  # noqa: BLE001
            log.warning("idle check failed", exc_info=True)
            self._drop_db()
            return True

    def _drop_db(self) -> None:
        self._state.close()


def _write_pidfile(background: bool) -> None:
    if not background:
        return
    path = worker_pidfile()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")


def _remove_pidfile() -> None:
    path = worker_pidfile()
    try:
        if path.read_text().split()[0] == str(os.getpid()):
            path.unlink()
    except (OSError, IndexError):
        pass


class ExpectedFailures(logging.Filter):
    """huey logs every task exception with its traceback. A job that fails the way jobs do (a gated or missing repo,
    a full disk: an MlxkError) is one line in the console, `job failed: <type>: <message>`; a bug (any other
    exception, or `internal`) keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, MlxkError) and not isinstance(exc, Internal):
            record.msg, record.args = "task %s failed: %s: %s", (*(record.args or ("?",))[:1], exc.type, exc.message)
            record.exc_info = record.exc_text = None
        return True


def run(*, threads: int = DEFAULT_THREADS, background: bool = False, scan: bool = True,
        idle_s: float | None = None) -> int:
    """Run the consumer until stopped (or idle, when `background`); the exit status."""
    huey_log = logging.getLogger("huey")
    if not any(isinstance(f, ExpectedFailures) for f in huey_log.filters):
        huey_log.addFilter(ExpectedFailures())
    s = settings()
    huey = queue.get_huey()
    worker_id = signals.worker_id()
    with closing(connect()) as conn:
        jobs_db.register_worker(conn, id=worker_id, kind="queue", pid=os.getpid(), host=hostname())
    _write_pidfile(background)
    log.info("worker %s started (%s threads, queue %s%s)", worker_id, threads, queue.redacted_url(s.queue_url),
             f", exits after {idle_s if idle_s is not None else s.worker_idle_s:.0f} s idle" if background else "")
    try:
        recover(huey)
        if scan:
            queue.submit_scan(None)
        consumer = JobConsumer(
            huey, worker_id=worker_id,
            idle_exit_s=(idle_s if idle_s is not None else s.worker_idle_s) if background else None,
            workers=threads, worker_type="thread", periodic=False, initial_delay=0.1, max_delay=0.5,
            backoff=1.3, scheduler_interval=1, check_worker_health=True, health_check_interval=5,
        )
        consumer.run()
    finally:
        try:
            with closing(connect()) as conn:
                jobs_db.remove_worker(conn, worker_id)
        finally:
            _remove_pidfile()
    log.info("worker %s stopped", worker_id)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlxk.workers", description="Run the mlxk job worker.")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="tasks run at once")
    parser.add_argument("--background", action="store_true", help="exit after MLXK_WORKER_IDLE seconds idle")
    parser.add_argument("--no-scan", action="store_true", help="skip the health scan at start")
    parser.add_argument("-v", "--verbose", action="store_true", help="same as --log-level debug")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None, help="default MLXK_LOG_LEVEL, else info")
    parser.add_argument("--log-json", action="store_true", default=None, help="JSON lines (MLXK_LOG_JSON)")
    options = parser.parse_args(argv)
    try:
        logs.setup("debug" if options.verbose else options.log_level, options.log_json)
        return run(threads=options.threads, background=options.background, scan=not options.no_scan)
    except MlxkError as error:
        log.error("%s", error.message)
        print(f"Error: {error.message}", file=sys.stderr)
        return 1
