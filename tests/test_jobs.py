"""The job queue end to end: real `python -m mlxk.workers` consumers, real queue.db/state.db, the test Hub with real HTTP.

Pull through the CLI, duplicate pulls, failed pulls leaving nothing behind, cancel/retry with resume, the jobs
listing, show, id prefixes, JSON envelopes, scans, and a corrupt queue.db.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.cli import ROOT, run, run_json
from tests.fixtures.jobs import MiB, big_files, cdn_gets, job_row, repo_path, state_db, wait_for


# ---------------------------------------------------------------- pull

def test_pull_wait_downloads_indexes_and_records_the_job(hub, worker, model_factory):
    repo = hub.unique_repo("mlx-community/tiny")
    hub.add_repo(repo, model_factory.files())

    result, doc = run_json("pull", repo, "--wait")

    assert result.exit_code == 0, result.output
    assert doc["status"] == "success" and doc["command"] == "pull" and doc["error"] is None
    job = doc["data"]
    assert job["state"] == "succeeded" and job["kind"] == "pull" and job["target"] == repo
    assert job["attempts"] == 1 and job["finished_at"] and job["worker"]
    assert job["result"]["files"] >= 3 and len(job["result"]["revision"]) == 40
    assert job["progress"]["bytes_done"] == job["progress"]["bytes_total"] > 0
    snapshot = repo_path(repo) / "snapshots" / job["result"]["revision"]
    assert (snapshot / "config.json").is_file()
    # The index row was written before the job said succeeded: `list` shows it at once, healthy.
    from mlxk.db import models as models_db

    with state_db() as conn:
        row = models_db.get_model(conn, repo)
    assert row is not None and row["health"] == "healthy", row
    assert row["revision"] == job["result"]["revision"]


def test_pull_of_a_repo_with_an_active_pull_returns_that_job(hub, worker):
    repo = hub.unique_repo("org/slow")
    hub.add_repo(repo, big_files(2 * MiB))
    hub.faults.rate_limit_bps = 1 * MiB

    first = run("pull", repo)
    second = run("pull", repo, "--json")

    job_id = first.stdout.strip()
    assert first.exit_code == 0 and len(job_id) == 12
    doc = json.loads(second.stdout)
    assert doc["data"]["id"] == job_id and doc["data"]["existing"] is True
    assert "already" in second.stderr and job_id in second.stderr
    run("jobs", "cancel", job_id)


@pytest.mark.parametrize("case, error_type, words", [
    ("missing", "repo_not_found", "not found"),
    ("private", "repo_not_found", "not found"),
    ("gated", "gated_repo", "gated"),
])
def test_failed_pull_is_a_failed_job_with_a_clear_message_and_nothing_cached(hub, worker, case, error_type, words):
    repo = hub.unique_repo(f"org/{case}")
    if case != "missing":
        hub.add_repo(repo, big_files(1000), private=case == "private", gated=case == "gated")

    result, doc = run_json("pull", repo, "--wait")

    assert result.exit_code == 1
    assert doc["status"] == "error" and doc["error"]["code"] == error_type, doc
    assert words in doc["error"]["message"].lower() and repo in doc["error"]["message"]
    job = doc["data"]
    assert job["state"] == "failed" and job["error"]["type"] == error_type
    assert not repo_path(repo).exists()
    from mlxk.db import models as models_db

    with state_db() as conn:
        assert models_db.get_model(conn, repo) is None


def test_cancel_a_running_pull_stops_within_2s_keeps_partial_and_retry_resumes(hub, worker):
    repo = hub.unique_repo("org/cancel")
    size = 6 * MiB
    hub.add_repo(repo, big_files(size))
    hub.faults.rate_limit_bps = 1 * MiB

    job_id = run("pull", repo).stdout.strip()
    wait_for(lambda: (job_row(job_id)["bytes_done"] or 0) > 512 * 1024)

    started = time.monotonic()
    result, doc = run_json("jobs", "cancel", job_id[:6])
    final = wait_for(lambda: job_row(job_id)["state"] != "running" and job_row(job_id), timeout=5)
    took = time.monotonic() - started

    assert result.exit_code == 0
    assert final["state"] == "cancelled", final
    assert took < 2.5, f"cancel took {took:.2f}s"
    assert final["error"]["type"] == "cancelled" and "partial data kept" in final["message"]
    partial = [p for p in (repo_path(repo) / "blobs").iterdir()]
    assert partial and sum(p.stat().st_size for p in partial) > 0

    hub.faults.rate_limit_bps = None
    hub.clear_requests()
    retried, doc = run_json("jobs", "retry", job_id, "--wait")

    assert retried.exit_code == 0, retried.output
    assert doc["data"]["state"] == "succeeded" and doc["data"]["id"] != job_id
    assert doc["data"]["args"] == final["args"]
    ranges = [r.range for r in cdn_gets(hub) if r.range]
    assert ranges and int(ranges[0].split("=")[1].split("-")[0]) > 0, ranges
    # The cancelled job is still there, unchanged: the jobs table is the history.
    assert job_row(job_id)["state"] == "cancelled"


def test_cancel_purge_removes_the_partial_data_and_every_view_says_so(hub, worker):
    repo = hub.unique_repo("org/purge")
    hub.add_repo(repo, big_files(6 * MiB))
    hub.faults.rate_limit_bps = 1 * MiB
    job_id = run("pull", repo).stdout.strip()
    wait_for(lambda: (job_row(job_id)["bytes_done"] or 0) > 512 * 1024)

    result = run("jobs", "cancel", job_id, "--purge")
    final = wait_for(lambda: job_row(job_id)["state"] != "running" and job_row(job_id), timeout=5)

    assert result.exit_code == 0 and final["state"] == "cancelled", final
    assert final["message"] == "cancelled; partial data removed"
    assert "was removed" in final["error"]["message"] and "kept" not in final["error"]["message"]
    assert final["error"]["bytes_freed"] > 512 * 1024
    assert "partial data removed" in result.stderr and "kept" not in result.stderr
    assert not repo_path(repo).exists()                  # nothing of the download is left
    listed = run_json("list", "--all")[1]["data"]["models"]
    assert repo not in [m["name"] for m in listed]        # so it is not listed as an unhealthy model either
    shown = run_json("jobs", "show", job_id)[1]["data"]
    assert shown["message"] == final["message"]


def test_cancel_a_queued_job_revokes_it(hub, worker_manager):
    # No worker: the job stays queued until we cancel it; the worker started afterwards must not run it.
    repo = hub.unique_repo("org/queued")
    hub.add_repo(repo, big_files(1000))
    from mlxk import jobs

    outcome = jobs._enqueue("pull", repo, {"revision": None}, start_worker=False)
    job_id = outcome.job["id"]

    doc = json.loads(run("jobs", "cancel", job_id, "--json").stdout)
    assert doc["data"]["state"] == "cancelled"

    worker_manager.start()
    time.sleep(1.5)
    row = job_row(job_id)
    assert row["state"] == "cancelled" and row["attempts"] == 0
    assert not repo_path(repo).exists()


def test_retry_refuses_a_succeeded_job_and_cancel_a_finished_one(hub, worker, model_factory):
    repo = hub.unique_repo("org/done")
    hub.add_repo(repo, big_files(1000))
    job_id = json.loads(run("pull", repo, "--wait", "--json").stdout)["data"]["id"]

    result, doc = run_json("jobs", "retry", job_id)
    assert result.exit_code == 1 and doc["error"]["code"] == "conflict"
    assert "only failed or cancelled" in doc["error"]["message"]
    result, doc = run_json("jobs", "cancel", job_id)
    assert result.exit_code == 1 and "already succeeded" in doc["error"]["message"]


# ---------------------------------------------------------------- jobs listing

def test_jobs_list_show_prefix_and_json(hub, worker):
    repo = hub.unique_repo("org/listed")
    hub.add_repo(repo, big_files(1000))
    job_id = json.loads(run("pull", repo, "--wait", "--json").stdout)["data"]["id"]

    listing = run("jobs")
    assert listing.exit_code == 0
    header = listing.stdout.splitlines()[0].split()
    assert header == ["ID", "KIND", "TARGET", "STATE", "PROGRESS", "AGE"]
    line = next(l for l in listing.stdout.splitlines() if l.startswith(job_id))
    assert "pull" in line and repo in line and "succeeded" in line and "done" in line

    result, doc = run_json("jobs", "list", "--all")
    assert doc["status"] == "success" and any(j["id"] == job_id for j in doc["data"])

    shown = run("jobs", "show", job_id[:5])
    assert shown.exit_code == 0
    for field in ("id:", "kind:", "state:", "attempts:", "created_at:", "finished_at:", "result:"):
        assert field in shown.stdout
    result, doc = run_json("jobs", "show", job_id[:5])
    assert doc["data"]["id"] == job_id and doc["data"]["state"] == "succeeded"

    result, doc = run_json("jobs", "show", "ffffffffffff")
    assert result.exit_code == 1 and doc["error"]["code"] == "job_not_found"


def test_ambiguous_job_prefix_is_an_error(worker_manager):
    from mlxk.db import jobs as jobs_db

    with state_db() as conn:
        for job_id in ("abc111111111", "abc222222222"):
            jobs_db.create_job(conn, id=job_id, kind="scan", target="*", args={}, task_id=job_id)
            jobs_db.finish(conn, job_id, state="succeeded", from_states=("queued",))
    result, doc = run_json("jobs", "show", "abc")
    assert result.exit_code == 1 and doc["error"]["code"] == "ambiguous_match"
    assert "abc111111111" in doc["error"]["message"] and "abc222222222" in doc["error"]["message"]
    assert json.loads(run("jobs", "show", "abc2", "--json").stdout)["data"]["id"] == "abc222222222"


def test_request_scan_keeps_one_pending_scan_and_the_worker_runs_it(worker_manager, tiny_model):
    from mlxk import jobs

    first = jobs.enqueue_scan(["org/a"], start_worker=False)
    second = jobs.enqueue_scan(["org/b"], start_worker=False)
    assert second.job["id"] == first.job["id"] and not second.created
    assert second.job["args"]["repos"] == ["org/a", "org/b"]

    job_id = jobs.request_scan([tiny_model.repo_id])   # starts a background worker
    assert job_id == first.job["id"]
    final = wait_for(lambda: job_row(job_id)["state"] in ("succeeded", "failed") and job_row(job_id), timeout=30)
    assert final["state"] == "succeeded", final
    from mlxk.db import models as models_db

    with state_db() as conn:
        assert models_db.get_model(conn, tiny_model.repo_id)["health"] == "healthy"
    # Asking again right after that scan ended does not add another job (`list` would otherwise loop).
    assert jobs.request_scan([tiny_model.repo_id]) == job_id
    assert len(jobs.list_jobs(all_jobs=True, kind="scan")) == 1


# ---------------------------------------------------------------- broken state

def test_corrupt_queue_db_is_a_clear_error(worker_manager):
    home = Path(os.environ["MLXK_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "queue.db").write_bytes(b"this is not a database" * 200)

    result, doc = run_json("pull", "org/anything")

    assert result.exit_code == 1 and doc["error"]["code"] == "state_error"
    assert str(home / "queue.db") in doc["error"]["message"] and "delete" in doc["error"]["message"]
    from mlxk.db import jobs as jobs_db

    with state_db() as conn:
        assert jobs_db.list_jobs(conn) == []   # nothing recorded that could never run

    proc = subprocess.run([sys.executable, "-m", "mlxk.workers", "--no-scan"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 1 and "queue.db" in proc.stderr and "not a usable SQLite database" in proc.stderr


def _imports(path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_imports_go_one_way_workers_never_import_the_jobs_client_and_db_jobs_imports_nothing_of_ours():
    from tests.fixtures.cli import ROOT

    for path in (ROOT / "workers").glob("*.py"):
        bad = {m for m in _imports(path) if m in ("mlxk.jobs", "mlxk.cli", "mlxk.output")
               or m.startswith(("mlxk.commands", "mlxk.server"))}
        assert not bad, f"{path.name} imports {bad}"
    assert not {m for m in _imports(ROOT / "db" / "jobs.py") if m.startswith("mlxk") and not m.startswith("mlxk.db")}
    # The CLI asks mlxk.jobs; it starts the foreground worker (mlxk.workers.consumer) but uses no task internals.
    assert not {m for m in _imports(ROOT / "mlxk" / "commands" / "jobs.py") if m.startswith("mlxk.workers.tasks")}


def test_each_kind_is_declared_once_and_is_the_huey_task_of_that_name():
    from mlxk.workers import queue
    from mlxk.workers.tasks import KINDS

    huey = queue.get_huey()
    assert set(KINDS) == {"pull", "rm", "clone", "push", "scan"}
    assert {name.rsplit(".", 1)[-1] for name in huey._registry._registry} == set(KINDS)
    assert [k for k in KINDS.values() if k.inline] == [KINDS["rm"]]
