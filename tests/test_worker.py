"""Worker lifecycle with real processes: SIGKILL mid-file (recovered, resumed with Range > 0), SIGTERM (re-queued),
idle exit of a background worker, one worker for many racing CLIs, the per-model lock, and no false "healthy"."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from tests.fixtures.cli import run
from tests.fixtures.jobs import MiB, big_files, cdn_gets, job_row, start_slow_pull, state_db, wait_for


def test_sigkill_mid_file_next_worker_recovers_and_resumes(hub, worker, worker_manager):
    repo, job_id = start_slow_pull(hub, "org/killed")
    assert job_row(job_id)["state"] == "running"

    worker.signal(signal.SIGKILL)
    worker.wait()
    # Killed mid-file: whatever is on disk, the index must not call the repo healthy.
    from mlxk.db import models as models_db
    from mlxk.workers.tasks import _refresh_index

    _refresh_index({repo}, runtime=False)
    with state_db() as conn:
        row = models_db.get_model(conn, repo)
    assert row is None or row["health"] != "healthy", row

    hub.faults.rate_limit_bps = None
    hub.clear_requests()
    worker_manager.start()
    final = wait_for(lambda: job_row(job_id)["state"] in ("succeeded", "failed") and job_row(job_id), timeout=30)

    assert final["state"] == "succeeded", final
    assert final["attempts"] == 2
    ranges = [r.range for r in cdn_gets(hub) if r.range]
    assert ranges and int(ranges[0].split("=")[1].split("-")[0]) > 0, ranges
    with state_db() as conn:
        assert models_db.get_model(conn, repo)["revision"] == final["result"]["revision"]


def test_sigterm_requeues_the_running_job_and_a_new_worker_finishes_it(hub, worker, worker_manager):
    repo, job_id = start_slow_pull(hub, "org/termed")

    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0
    row = job_row(job_id)
    assert row["state"] == "queued", row
    assert "interrupted" in row["message"] and row["error"] is None

    hub.faults.rate_limit_bps = None
    worker_manager.start()
    final = wait_for(lambda: job_row(job_id)["state"] in ("succeeded", "failed") and job_row(job_id), timeout=30)
    assert final["state"] == "succeeded" and final["attempts"] == 2, final


def test_background_worker_exits_when_idle_and_cleans_up(worker_manager, monkeypatch):
    monkeypatch.setenv("MLXK_WORKER_IDLE", "1")
    home = Path(os.environ["MLXK_HOME"])
    bg = worker_manager.start(background=True)
    assert (home / "run" / "worker.pid").read_text().strip() == str(bg.pid)

    started = time.monotonic()
    assert bg.wait(timeout=15) == 0
    assert time.monotonic() - started < 8
    assert not (home / "run" / "worker.pid").exists()
    from mlxk.db import jobs as jobs_db

    with state_db() as conn:
        assert jobs_db.workers(conn) == []


def test_racing_clis_start_one_background_worker(reap_workers):
    from mlxk import jobs

    started = []
    barrier = threading.Barrier(4)

    def go():
        barrier.wait()
        started.append(jobs.ensure_worker())

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pids = [p for p in started if p]
    assert len(pids) == 1, started
    with state_db() as conn:
        wait_for(lambda: jobs.live_workers(conn), timeout=20)
        assert [w["pid"] for w in jobs.live_workers(conn)] == pids
    assert jobs.ensure_worker() is None


def test_a_second_job_on_a_busy_model_waits_for_the_lock(hub, worker):
    repo, job_id = start_slow_pull(hub, "org/locked", size=3 * MiB, bps=2 * MiB)
    from mlxk import jobs

    # A second job on the same model (not a pull, which would be deduplicated) must wait, not fail.
    second = jobs._enqueue("pull", repo, {"revision": None}, dedupe=False, start_worker=False).job
    waiting = wait_for(lambda: "waiting for job" in (job_row(second["id"])["message"] or "")
                       and job_row(second["id"]), timeout=10)
    assert waiting["state"] == "queued" and job_id in waiting["message"]

    hub.faults.rate_limit_bps = None
    first = wait_for(lambda: job_row(job_id)["state"] == "succeeded" and job_row(job_id), timeout=30)
    done = wait_for(lambda: job_row(second["id"])["state"] == "succeeded" and job_row(second["id"]), timeout=30)
    assert done["started_at"] >= first["finished_at"]
    assert done["result"]["up_to_date"] is True   # the second pull found everything cached


def test_jobs_watch_follows_a_job_to_its_end(hub, worker):
    repo = hub.unique_repo("org/watched")
    hub.add_repo(repo, big_files(2 * MiB))
    hub.faults.rate_limit_bps = 4 * MiB
    job_id = run("pull", repo).stdout.strip()

    result = run("jobs", "watch", job_id, "--json")

    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["data"]["state"] == "succeeded"
    assert f"pull {repo}" in result.stderr and "Pulled" in result.stderr
    everything = run("jobs", "watch")
    assert everything.exit_code == 0 and "No active jobs." in everything.stderr


def test_an_expected_job_failure_is_one_line_in_the_worker_console_a_bug_keeps_its_traceback(hub, worker):
    missing = hub.unique_repo("org/missing")
    result = run("pull", missing, "--wait")
    assert result.exit_code == 1
    wait_for(lambda: "failed: repo_not_found" in worker.output(), timeout=10)
    log = worker.output()
    lines = [line for line in log.splitlines() if "repo_not_found" in line]
    assert len(lines) == 1 and f"{missing} was not found" in lines[0], log
    assert "Traceback" not in log

    import logging

    from mlxk.errors import Internal, RepoNotFound
    from mlxk.workers.consumer import ExpectedFailures

    def record(exc):
        try:
            raise exc
        except Exception:
            import sys

            return logging.LogRecord("huey", logging.ERROR, __file__, 1, "Unhandled exception in task %s.", ("t1",),
                                     sys.exc_info())

    expected, bug, internal = record(RepoNotFound("x not found")), record(KeyError("k")), record(Internal("boom"))
    for r in (expected, bug, internal):
        ExpectedFailures().filter(r)
    assert expected.getMessage() == "task t1 failed: repo_not_found: x not found" and expected.exc_info is None
    assert bug.exc_info is not None and internal.exc_info is not None
