"""Faults of the job system, each reached deterministically at a named pause point (mlxk.faults) and ended with
kill -9 of the real process there: a worker killed mid-pull is shown as interrupted and resumes by itself; a
state.db rebuilt mid-pull gets the job's row back; an rm killed mid-delete never deletes a model pulled after it
and never blocks a new rm; a clone killed mid-copy resumes its own workspace."""
from __future__ import annotations

import json
import os
import subprocess
from contextlib import closing

import pytest
from pathlib import Path

from tests.fixtures.cli import MLXK, ROOT, run, run_json
from tests.fixtures.jobs import MiB, big_files, job_row, repo_path, wait_for
from tests.fixtures.pause import kill_paused, release, wait_paused
from tests.fixtures.queue import reap_background_workers

FINISHED = ("succeeded", "failed", "cancelled")


def _home() -> Path:
    return Path(os.environ["MLXK_HOME"])


def _cli(*args, env: dict | None = None) -> subprocess.Popen:
    """`mlxk ARGS` as its own process (so it can be killed at a pause point)."""
    return subprocess.Popen([*MLXK, *args], cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _final(job_id: str, timeout: float = 40.0) -> dict:
    return wait_for(lambda: job_row(job_id)["state"] in FINISHED and job_row(job_id), timeout=timeout)


def _api_job(job_id: str) -> dict:
    """The job as GET /api/jobs shows it (the web page reads the same route): the real app in process, with its
    state but without its lifespan (which would start an inference worker this test has no use for)."""
    from fastapi.testclient import TestClient

    from mlxk.server.app import create_app
    from mlxk.server.deps import ServerConfig, ServerState
    from mlxk.server.supervisor import Supervisor

    config = ServerConfig.from_settings()
    app = create_app(config)
    app.state.mlxk = ServerState(config, Supervisor(config.worker_options()))
    jobs = TestClient(app, base_url="http://127.0.0.1").get("/api/jobs").json()["jobs"]
    return next(j for j in jobs if j["id"] == job_id)


# ---------------------------------------------------------------- a worker killed mid-pull

def test_worker_killed_mid_pull_is_shown_interrupted_and_resumes_without_user_action(hub, worker_manager):
    repo = hub.unique_repo("org/dead-worker")
    hub.add_repo(repo, big_files(3 * MiB))
    first = worker_manager.start(env={"MLXK_TEST_PAUSE_AT": "pull.progress"})
    job_id = run("pull", repo).stdout.strip()

    assert kill_paused(_home(), "pull.progress") == first.pid
    first.wait()
    assert job_row(job_id)["state"] == "running"   # what the dead worker left behind

    # Every view, at once: not "running", but interrupted and resuming.
    # The first view notices and re-queues it (the worker it starts needs far longer than the re-read to claim it).
    listed = next(j for j in run_json("jobs")[1]["data"] if j["id"] == job_id)
    assert listed["state"] == "queued", listed
    assert "interrupted" in listed["message"] and "resuming" in listed["message"], listed
    assert str(first.pid) in listed["message"]
    # The others agree: queued and interrupted, or already running again under a new attempt.
    for view in (run_json("jobs", "show", job_id)[1]["data"], _api_job(job_id)):
        assert (view["state"] == "queued" and "interrupted" in view["message"]) or view["attempts"] == 2, view

    # Nobody runs anything more: the worker the view started finishes the job.
    final = _final(job_id)
    assert final["state"] == "succeeded" and final["attempts"] == 2, final


@pytest.mark.parametrize("damage", ["replaced by garbage", "truncated in place"])
def test_state_db_rebuilt_mid_pull_gets_the_running_job_back(hub, worker_manager, damage):
    repo = hub.unique_repo("org/rebuilt-db")
    hub.add_repo(repo, big_files(2 * MiB))
    worker_manager.start(env={"MLXK_TEST_PAUSE_AT": "pull.progress"})
    job_id = run("pull", repo).stdout.strip()
    wait_paused(_home(), "pull.progress")

    # Damage state.db under the running job (whose worker holds open connections to it): the next opener moves a
    # corrupt file aside, or replaces a 0-byte one, and rebuilds; it must neither hang on the worker's locks nor
    # lose the job.
    state = _home() / "state.db"
    if damage == "truncated in place":
        with open(state, "r+b") as f:   # same inode, -wal and -shm left as they are: `: > state.db`
            f.truncate(0)
    else:
        garbage = state.with_name("garbage")
        garbage.write_bytes(b"this is not a database" * 200)
        os.replace(garbage, state)
        for suffix in ("-wal", "-shm"):
            Path(f"{state}{suffix}").unlink(missing_ok=True)
    listed = subprocess.run([*MLXK, "jobs", "--json"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    if damage == "truncated in place":
        assert "was empty (0 bytes)" in listed.stderr
    else:
        assert list(_home().glob("state.db.corrupt-*"))

    def released_row():   # the step pauses at every progress write while armed: let each one go
        release(_home(), "pull.progress")
        return job_row(job_id)

    restored = wait_for(released_row, timeout=20)
    assert restored["kind"] == "pull" and restored["target"] == repo
    assert run_json("jobs", "show", job_id[:8])[1]["data"]["id"] == job_id
    final = wait_for(lambda: released_row()["state"] in FINISHED and job_row(job_id), timeout=40)
    assert final["state"] == "succeeded", final


# ---------------------------------------------------------------- rm interrupted

def _assert_whole(repo: str) -> None:
    """The repo's snapshot holds every file the Hub has, byte for byte."""
    (snapshot,) = (repo_path(repo) / "snapshots").iterdir()
    for name, data in big_files(1 * MiB).items():
        assert (snapshot / name).read_bytes() == data, name


def _pulled(hub, name: str) -> str:
    repo = hub.unique_repo(name)
    hub.add_repo(repo, big_files(1 * MiB))
    result = run("pull", repo, "--wait")
    assert result.exit_code == 0, result.output
    return repo


def test_rm_killed_mid_delete_never_deletes_the_model_pulled_after_it(hub, reap_workers, hf_cache):
    repo = _pulled(hub, "org/rm-then-pull")
    rm = _cli("rm", repo, "--json", env={"MLXK_TEST_PAUSE_AT": "rm.deleting"})
    kill_paused(_home(), "rm.deleting")
    rm.wait(timeout=10)
    rm_job = run_json("jobs", "--all")[1]["data"]
    rm_id = next(j["id"] for j in rm_job if j["kind"] == "rm")

    # The one rename happened: the repo is out of the cache as every reader sees it, its bytes in the trash.
    assert not repo_path(repo).exists()
    assert list(hf_cache.glob(".trash-*"))
    listed = run_json("list", "--all")[1]["data"]
    assert repo not in json.dumps(listed)

    pulled = run("pull", repo, "--wait")
    assert pulled.exit_code == 0, pulled.output
    final = _final(rm_id)
    assert final["state"] in ("succeeded", "cancelled"), final
    # Whatever order the worker ran them in, the model pulled after the rm is there and whole.
    _assert_whole(repo)
    assert run_json("show", repo)[1]["status"] == "success"
    assert not list(hf_cache.glob(".trash-*"))


def test_rm_killed_before_it_moved_anything_is_superseded_by_a_newer_pull(hub, reap_workers):
    repo = _pulled(hub, "org/rm-superseded")
    reap_background_workers(_home())   # no worker may re-run the dead rm before the pull below is queued
    rm = _cli("rm", repo, env={"MLXK_TEST_PAUSE_AT": "rm.moving"})
    kill_paused(_home(), "rm.moving")
    rm.wait(timeout=10)
    rm_id = next(j["id"] for j in run_json("jobs", "--all")[1]["data"] if j["kind"] == "rm")

    pulled = run("pull", repo, "--wait")
    assert pulled.exit_code == 0, pulled.output

    final = _final(rm_id)
    assert final["state"] == "cancelled" and "superseded" in final["message"], final
    assert final["error"]["superseded_by"]
    _assert_whole(repo)


def test_a_dead_rm_never_blocks_a_new_rm(model_factory, reap_workers, hf_cache):
    repo = model_factory.repo("org/rm-twice").repo_id
    rm = _cli("rm", repo, env={"MLXK_TEST_PAUSE_AT": "rm.moving"})
    kill_paused(_home(), "rm.moving")
    rm.wait(timeout=10)

    result, doc = run_json("rm", repo)

    assert result.exit_code == 0, doc
    assert doc["data"]["state"] == "succeeded"
    assert not repo_path(repo).exists()
    old = next(j for j in run_json("jobs", "--all")[1]["data"] if j["kind"] == "rm" and j["id"] != doc["data"]["id"])
    assert _final(old["id"])["state"] in ("succeeded", "cancelled")
    assert not list(hf_cache.glob(".trash-*"))


def test_leftover_trash_of_a_dead_rm_is_finished_by_the_next_rm(model_factory, hf_cache):
    gone = model_factory.repo("org/left-behind")
    trash = hf_cache / ".trash-0123456789ab"
    trash.mkdir()
    (trash / "plan.json").write_text(json.dumps({"repo_id": gone.repo_id, "revisions": [], "whole_repo": True,
                                                 "bytes_freed": 0, "blobs": []}))
    os.rename(gone.repo_dir, trash / gone.repo_dir.name)
    other = model_factory.repo("org/removed-next").repo_id

    assert run("rm", other).exit_code == 0

    assert not trash.exists()


# ---------------------------------------------------------------- clone interrupted

def test_clone_killed_mid_copy_resumes_its_own_workspace(model_factory, worker_manager, tmp_path):
    repo = model_factory.repo("org/clone-killed").repo_id
    dest = tmp_path / "workspace"
    first = worker_manager.start(env={"MLXK_TEST_PAUSE_AT": "clone.copying"})
    job_id = run("clone", repo, str(dest)).stdout.strip()

    kill_paused(_home(), "clone.copying")
    first.wait()
    staging = list(tmp_path.glob(f".workspace.mlxk-clone-{job_id}"))
    assert staging and not (dest.exists() and any(dest.iterdir()))   # half a copy, never in `dest`

    run("jobs")   # a reader notices the dead worker; the worker it starts resumes the clone
    final = _final(job_id)
    assert final["state"] == "succeeded", final
    assert (dest / "config.json").is_file() and not list(tmp_path.glob(".workspace.mlxk-clone-*"))


# ---------------------------------------------------------------- mlxk serve keeps a worker

def test_serve_resumes_the_job_of_a_killed_worker_with_nobody_reading(hub_server, hub, tmp_path_factory):
    import signal
    import sqlite3

    from tests.fixtures.jobs import hub_env
    from tests.fixtures.server import spawn_server

    root = tmp_path_factory.mktemp("keeper")
    home = root / "mlxk"
    srv = spawn_server(root, env=hub_env(hub_server))

    def row(job_id):   # state.db read directly: no mlxk reader may notice the dead worker for the api
        with closing(sqlite3.connect(home / "state.db", timeout=10)) as conn:
            return dict(zip(("state", "worker", "bytes_done", "attempts"), conn.execute(
                "SELECT state, worker, bytes_done, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()))

    try:
        repo = hub.unique_repo("org/served")
        hub.add_repo(repo, big_files(3 * MiB))
        hub.faults.rate_limit_bps = 1 * MiB
        with srv.http(timeout=30) as http:
            job_id = http.post("/api/jobs/pull", json={"model": repo}).json()["id"]
        running = wait_for(lambda: (row(job_id)["bytes_done"] or 0) > 0 and row(job_id), timeout=30)
        os.kill(int(running["worker"].split(":")[1]), signal.SIGKILL)
        hub.faults.rate_limit_bps = None

        final = wait_for(lambda: row(job_id)["state"] in FINISHED and row(job_id), timeout=40)
        assert final["state"] == "succeeded" and final["attempts"] == 2, final
    finally:
        srv.stop()
        reap_background_workers(home)
