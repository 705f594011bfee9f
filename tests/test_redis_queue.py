"""The job queue on a REAL Redis server (MLXK_QUEUE_URL=redis://…): the scale-out path of DESIGN.md.

Each test starts its own `redis-server` on a free 127.0.0.1 port, persistence off, in a tmp dir, and points
MLXK_QUEUE_URL at it. Proven here: a CLI pull goes through Redis (no queue.db is made, the task sits in Redis until
a worker takes it) and ends healthy in `mlxk list`; two worker processes sharing the one queue both run jobs; a job
left running by a SIGKILLed worker is recovered through Redis; an unreachable Redis is a one-line error.

redis-server is a test requirement (`make test` installs it): when it is missing these tests FAIL, never skip,
so the Redis path cannot silently go untested.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.cli import MLXK, ROOT, run, run_json
from tests.fixtures.jobs import MiB, big_files, cdn_gets, job_row, repo_path, start_slow_pull, state_db, wait_for
from tests.fixtures.server import free_port

QUEUE_KEY = "huey.redis.mlxk"          # PriorityRedisHuey's queue (a sorted set) for QUEUE_NAME "mlxk"
SCHEDULE_KEY = "huey.schedule.mlxk"
INSTALL_HINT = "run `make test` (it installs it) or `apt-get install redis-server`"


@dataclass
class RedisServer:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=0, socket_connect_timeout=2)

    def queued(self) -> int:
        """Tasks waiting in the Redis queue (not yet taken by a worker)."""
        return self.client().zcard(QUEUE_KEY)


def _start_redis(exe: str, data_dir: Path) -> RedisServer:
    import redis

    for attempt in range(3):   # a free port can be taken between our probe and redis' bind: try another
        port = free_port()
        log = data_dir / f"redis-{attempt}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", str(data_dir)],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = RedisServer(proc, port, log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if server.client().ping():
                    return server
            except redis.ConnectionError:
                time.sleep(0.05)
        _stop(proc)
    raise AssertionError(f"redis-server did not answer PING:\n{log.read_text(errors='replace')[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def redis_server(tmp_path, monkeypatch) -> RedisServer:
    """A private redis-server for this test, with MLXK_QUEUE_URL pointing at it (workers started later inherit it).

    Request it BEFORE worker fixtures, so the workers are stopped while Redis still answers.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail(f"redis-server is not installed, and the Redis queue must be tested: {INSTALL_HINT}.")
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.fail("the `redis` Python client is not installed: run `make test` (the test extra has it) or "
                    "`.venv/bin/pip install redis`.")
    data_dir = tmp_path / "redis"
    data_dir.mkdir()
    server = _start_redis(exe, data_dir)
    monkeypatch.setenv("MLXK_QUEUE_URL", server.url)
    from mlxk.workers import queue

    queue.forget()
    yield server
    queue.forget()
    _stop(server.proc)


def queue_db() -> Path:
    return Path(os.environ["MLXK_HOME"]) / "queue.db"


def pid_of(worker_id: str) -> int:
    return int(worker_id.split(":")[1])


# ---------------------------------------------------------------- (1) a pull goes through Redis

def test_pull_goes_through_redis_and_the_model_is_healthy(redis_server, reap_workers, hub, model_factory,
                                                           monkeypatch):
    repo = hub.unique_repo("mlx-community/redis-tiny")
    hub.add_repo(repo, model_factory.files())
    from mlxk import jobs
    from mlxk.workers import queue

    # First with no worker allowed to start: the task must be sitting in Redis, and nowhere else.
    with monkeypatch.context() as patch:
        patch.setattr(jobs, "ensure_worker", lambda conn=None: None)
        queued = run("pull", repo)
    assert queued.exit_code == 0, queued.output
    job_id = queued.stdout.strip()
    assert redis_server.queued() == 1
    assert queue.pending_task_ids(queue.get_huey()) == {job_id}
    assert type(queue.get_huey().storage).__name__ == "PriorityRedisStorage"
    assert not queue_db().exists()

    # Now the real CLI path: `pull --wait` joins the queued job and starts a background worker, which inherits
    # MLXK_QUEUE_URL, takes the task from Redis and runs it.
    result, doc = run_json("pull", repo, "--wait")

    assert result.exit_code == 0, result.output
    job = doc["data"]
    assert job["id"] == job_id and job["state"] == "succeeded" and job["attempts"] == 1, job
    assert reap_workers.background_pids(), "the CLI should have started a background worker"
    assert redis_server.queued() == 0
    assert not queue_db().exists(), "the Redis queue must not fall back to queue.db"
    listed, listing = run_json("list")
    assert listed.exit_code == 0, listed.output
    model = next(m for m in listing["data"]["models"] if m["name"] == repo)
    assert model["health"] == "healthy" and model["hash"] == job["result"]["revision"][:len(model["hash"])], model


# ---------------------------------------------------------------- (2) scale-out: two workers, one queue

def test_two_workers_sharing_one_redis_queue_both_run_jobs(redis_server, worker_manager, hub):
    # Two separate worker processes, one task at a time each, as two hosts would run them.
    first = worker_manager.start(threads=1)
    second = worker_manager.start(threads=1)
    hub.faults.rate_limit_bps = 1 * MiB   # ~0.5 s a job, so one worker cannot drain the queue alone
    repos = []
    for i in range(6):
        repo = hub.unique_repo(f"org/redis-fanout-{i}")
        hub.add_repo(repo, big_files(512 * 1024, seed=repo.encode()))
        repos.append(repo)

    job_ids = [run("pull", repo).stdout.strip() for repo in repos]
    assert all(len(j) == 12 for j in job_ids), job_ids
    assert worker_manager.background_pids() == set(), "live workers exist: the CLI must not start another"

    final = wait_for(lambda: all(job_row(j)["state"] in ("succeeded", "failed", "cancelled") for j in job_ids)
                     and [job_row(j) for j in job_ids], timeout=30)
    assert [j["state"] for j in final] == ["succeeded"] * 6, [(j["id"], j["state"], j["error"]) for j in final]
    assert all(j["attempts"] == 1 for j in final), [j["attempts"] for j in final]
    ran_on = {pid_of(j["worker"]) for j in final}
    assert ran_on == {first.pid, second.pid}, (ran_on, first.pid, second.pid)
    for repo in repos:
        assert (repo_path(repo) / "refs" / "main").is_file()
    assert redis_server.queued() == 0
    assert not queue_db().exists()


# ---------------------------------------------------------------- (3) recovery through Redis

def test_sigkilled_workers_running_job_is_recovered_through_redis(redis_server, worker_manager, hub):
    worker = worker_manager.start()
    repo, job_id = start_slow_pull(hub, "org/redis-killed")
    before = job_row(job_id)
    assert before["state"] == "running" and pid_of(before["worker"]) == worker.pid

    worker.signal(signal.SIGKILL)
    worker.wait()
    # The task left Redis when the dead worker took it: only state.db still knows the job.
    assert redis_server.queued() == 0 and redis_server.client().zcard(SCHEDULE_KEY) == 0
    assert job_row(job_id)["state"] == "running"

    hub.faults.rate_limit_bps = None
    hub.clear_requests()
    successor = worker_manager.start()
    final = wait_for(lambda: job_row(job_id)["state"] in ("succeeded", "failed") and job_row(job_id), timeout=30)

    assert final["state"] == "succeeded", final
    assert final["attempts"] == 2 and pid_of(final["worker"]) == successor.pid
    assert final["task_id"] != before["task_id"], "recovery re-enqueues under a new task id"
    ranges = [r.range for r in cdn_gets(hub) if r.range]
    assert ranges and int(ranges[0].split("=")[1].split("-")[0]) > 0, ranges   # resumed, not restarted
    assert f"job {job_id} was left running by" in successor.output(), successor.output()
    assert not queue_db().exists()


# ---------------------------------------------------------------- (4) an unreachable Redis

def _dead_url(password: str | None = None) -> str:
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{free_port()}/0"   # a port nothing listens on


def _assert_one_line_error(text: str, url: str) -> None:
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text, text
    assert len(lines) == 1 and lines[0].startswith("Error: "), text
    assert f"MLXK_QUEUE_URL={url}" in lines[0] and "cannot be reached" in lines[0], text
    assert "Start Redis" in lines[0] and "unset MLXK_QUEUE_URL" in lines[0], text


def test_unreachable_redis_is_a_one_line_error_naming_the_url_and_the_fix():
    url = _dead_url()
    env = {**os.environ, "MLXK_QUEUE_URL": url}

    proc = subprocess.run([*MLXK, "pull", "org/nowhere"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30)

    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    _assert_one_line_error(proc.stderr, url)

    as_json = subprocess.run([*MLXK, "pull", "org/nowhere", "--json"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=30)
    assert as_json.returncode == 1 and "Traceback" not in as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["status"] == "error" and doc["error"]["code"] == "state_error"
    assert url in doc["error"]["message"] and doc["error"]["queue_url"] == url
    # It failed before anything was recorded: no job row, no queue.db, no worker left trying.
    history = subprocess.run([*MLXK, "jobs", "--all", "--json"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=30)
    assert json.loads(history.stdout)["data"] == []
    assert not queue_db().exists()


def test_worker_with_unreachable_redis_exits_1_and_hides_the_password():
    url = _dead_url(password="hunter2")
    shown = url.replace(":hunter2@", ":***@")

    proc = subprocess.run([sys.executable, "-m", "mlxk.workers", "--no-scan"], cwd=ROOT,
                          env={**os.environ, "MLXK_QUEUE_URL": url}, capture_output=True, text=True, timeout=30)

    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr and "hunter2" not in proc.stderr, proc.stderr
    assert f"Error: the job queue at MLXK_QUEUE_URL={shown} cannot be reached" in proc.stderr, proc.stderr


def test_redis_going_away_after_start_is_still_a_clear_error(redis_server, monkeypatch):
    from mlxk import jobs
    from mlxk.workers import queue

    monkeypatch.setattr(jobs, "ensure_worker", lambda conn=None: None)
    queue.get_huey()            # built and pinged while Redis was up
    _stop(redis_server.proc)

    result, doc = run_json("pull", "org/after-redis-died")

    assert result.exit_code == 1
    assert doc["error"]["code"] == "state_error", doc
    assert f"MLXK_QUEUE_URL={redis_server.url} cannot be reached" in doc["error"]["message"], doc
    with state_db() as conn:
        from mlxk.db import jobs as jobs_db

        rows = jobs_db.list_jobs(conn)
    assert [r["state"] for r in rows] == ["failed"], rows   # recorded as failed, never left queued forever


def test_redis_url_without_the_redis_client_names_the_extra(monkeypatch):
    # The test extra installs the client, so hide it: a later `import redis` raises ImportError.
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setenv("MLXK_QUEUE_URL", "redis://127.0.0.1:1/0")
    from mlxk.workers import queue

    queue.forget()
    result, doc = run_json("pull", "org/anything")

    assert result.exit_code == 1 and doc["error"]["code"] == "config_error", doc
    assert "mlxk[redis]" in doc["error"]["message"] and "redis://127.0.0.1:1/0" in doc["error"]["message"]
