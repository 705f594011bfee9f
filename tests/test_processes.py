"""mlxk's background processes: isolated from the user's directory, listed by `mlxk processes`, stopped by
`mlxk processes stop`.

Everything here is real: the `mlxk` console script a user types, the job worker and the server it starts in the
background, the inference worker the server starts, the test Hub for a pull.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.fixtures.server import SCRIPTED_ID, SCRIPTED_REPLY, free_port, server_env, wait_healthy, write_models

MLXK = str(Path(sys.executable).parent / "mlxk")   # the console script, as a user runs it (not `python -c`)
TRAP = "raise SystemExit('imported {name} from the working directory instead of mlxk\\'s own')\n"


def trap_dir(root: Path) -> Path:
    """A working directory whose `db`, `mlxk` and `workers` folders break any process that imports them."""
    trap = root / "trap"
    for name in ("db", "mlxk", "workers"):
        (trap / name).mkdir(parents=True)
        (trap / name / "__init__.py").write_text(TRAP.format(name=name))
    return trap


def mlxk(*args, env=None, cwd=None, timeout=120, input=""):
    return subprocess.run([MLXK, *args], env=env or os.environ.copy(), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, input=input)


def stop_all(env: dict) -> None:
    """Whatever a test started, by the command under test, then by force for anything it missed."""
    mlxk("processes", "stop", "--all", env=env, timeout=60)
    home = Path(env["MLXK_HOME"]).resolve()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "mlxk" in " ".join(proc.info["cmdline"] or []) and proc.environ().get("MLXK_HOME") == str(home):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


# ---------------------------------------------------------------- isolated


def test_a_job_queued_from_a_directory_with_db_and_mlxk_folders_runs(hub, isolated, tmp_path):
    trap = trap_dir(tmp_path)
    repo = hub.unique_repo("org/isolated")
    hub.add_repo(repo, {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 64})
    # MLXK_HOME relative to where the user stands: the worker runs elsewhere and must still find this home.
    env = {**os.environ, "MLXK_HOME": os.path.relpath(isolated, trap)}
    done = mlxk("pull", repo, "--wait", env=env, cwd=trap)
    assert done.returncode == 0, done.stderr
    assert "imported" not in (isolated / "logs" / "worker.log").read_text()
    ours = [p for p in psutil.process_iter(["cmdline", "cwd"]) if "mlxk.workers" in " ".join(p.info["cmdline"] or [])
            and _home_of(p) == str(isolated)]
    assert ours and all(p.info["cwd"] == "/" for p in ours), "the worker runs in /, not in the user's directory"


def _home_of(proc) -> str | None:
    try:
        return proc.environ().get("MLXK_HOME")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def test_the_inference_worker_of_a_server_started_in_such_a_directory_works(tmp_path):
    root = tmp_path / "serve"
    write_models(root, {SCRIPTED_ID: {"reply": SCRIPTED_REPLY}})
    port = free_port()
    env = server_env(root, port)
    env.pop("PYTHONPATH")
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen([MLXK, "serve"], cwd=trap_dir(tmp_path), env=env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                           json={"model": SCRIPTED_ID, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, (reply.text, (tmp_path / "serve.log").read_text())
        assert reply.json()["choices"][0]["message"]["content"] == SCRIPTED_REPLY
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def test_run_from_a_directory_with_db_and_mlxk_folders_works(tmp_path):
    root = tmp_path / "run"
    write_models(root, {SCRIPTED_ID: {"reply": SCRIPTED_REPLY}})
    env = server_env(root, free_port(), MLXK_SERVER_IDLE=60)
    env.pop("PYTHONPATH")   # as a user has it: the installed mlxk only
    trap = trap_dir(tmp_path)
    try:
        done = mlxk("run", "tiny-scripted", "Say hello", env=env, cwd=trap)
        assert done.returncode == 0, done.stderr + (root / "mlxk" / "logs" / "server.log").read_text()
        assert done.stdout == SCRIPTED_REPLY + "\n"
        # and once more from anywhere: the server that `run` left behind is a working one
        again = mlxk("run", SCRIPTED_ID, "Again", env=env, cwd=tmp_path)
        assert again.returncode == 0 and again.stdout == SCRIPTED_REPLY + "\n"
    finally:
        stop_all(env)


# ---------------------------------------------------------------- visible and stoppable


def processes(env) -> list[dict]:
    done = mlxk("processes", "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["data"]["processes"]


def test_processes_lists_what_mlxk_run_and_a_job_started_and_stop_ends_them(tmp_path):
    root = tmp_path / "home"
    write_models(root, {SCRIPTED_ID: {"reply": SCRIPTED_REPLY}})
    env = server_env(root, free_port(), MLXK_SERVER_IDLE=60, MLXK_WORKER_IDLE=60, HF_HUB_OFFLINE="0",
                     HF_ENDPOINT="http://127.0.0.1:9")
    try:
        assert mlxk("run", SCRIPTED_ID, "hi", env=env).returncode == 0
        assert mlxk("health", "--scan", env=env).returncode == 0    # a job: starts a background worker
        found = processes(env)
        by_role = {p["role"]: p for p in found}
        assert sorted(by_role) == ["api", "inference", "worker"] and len(found) == 3, found
        api, worker, inference = by_role["api"], by_role["worker"], by_role["inference"]
        assert api["started_by"] == "mlxk run" and api["address"] == f"http://127.0.0.1:{env['MLXK_PORT']}"
        assert api["idle_exit_s"] == 60 and 0 < api["idle_left_s"] <= 60 and api["background"]
        assert inference["started_by"] == f"api (pid {api['pid']})" and inference["address"].endswith(".sock")
        assert worker["started_by"] == "mlxk health" and worker["idle_exit_s"] == 60
        assert worker["address"] == str(root / "mlxk" / "queue.db")
        table = mlxk("processes", env=env).stdout
        assert "mlxk run" in table and "IDLE EXIT IN" in table and str(api["pid"]) in table

        probe = processes(env)   # looking (GET /health) is not use: the server's idle clock keeps running
        assert {p["role"]: p for p in probe}["api"]["idle_left_s"] < api["idle_left_s"] + 0.5

        done = mlxk("processes", "stop", "--json", env=env)
        assert done.returncode == 0, done.stderr
        stopped = json.loads(done.stdout)["data"]
        assert sorted(p["role"] for p in stopped["stopped"]) == ["api", "inference", "worker"]
        assert stopped["killed"] == []
        for process in found:
            assert not psutil.pid_exists(process["pid"]) or psutil.Process(process["pid"]).status() == "zombie"
        assert processes(env) == []
        assert not (root / "mlxk" / "run" / "server.pid").exists()
    finally:
        stop_all(env)


def test_stop_leaves_what_a_person_started_unless_all_and_never_touches_other_processes(tmp_path):
    root = tmp_path / "home"
    env = server_env(root, free_port())
    write_models(root, {SCRIPTED_ID: {"reply": SCRIPTED_REPLY}})
    other_env = server_env(tmp_path / "other", free_port())
    with open(tmp_path / "serve.log", "wb") as log:
        mine = subprocess.Popen([MLXK, "serve", "--api-key", "sekrit-key"], env=env, stdout=log, stderr=log)
        # same command line, another MLXK_HOME: not ours to list or stop
        theirs = subprocess.Popen([MLXK, "worker"], env=other_env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{env['MLXK_PORT']}"
        wait_healthy(url)
        chat = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer sekrit-key"}, timeout=60,
                          json={"model": SCRIPTED_ID, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200, chat.text   # the server has started its own inference worker now
        found = processes(env)
        assert [(p["role"], p["started_by"], p["background"]) for p in found] == \
               [("api", "user", False), ("inference", f"api (pid {mine.pid})", False)]
        assert found[0]["pid"] == mine.pid
        assert "sekrit" not in json.dumps(found) and found[0]["command"].endswith(" serve")

        kept = json.loads(mlxk("processes", "stop", "--json", env=env).stdout)["data"]
        assert kept["stopped"] == [] and [p["pid"] for p in kept["skipped"]] == [p["pid"] for p in found]
        assert mine.poll() is None and psutil.pid_exists(found[1]["pid"])

        refused = mlxk("processes", "stop", str(theirs.pid), env=env)
        assert refused.returncode == 1 and f"no mlxk process with pid {theirs.pid}" in refused.stderr
        assert theirs.poll() is None

        done = mlxk("processes", "stop", "--all", env=env)
        assert done.returncode == 0 and f"stopped api (pid {mine.pid}, started by user)" in done.stdout
        assert mine.wait(10) is not None and theirs.poll() is None
    finally:
        for proc in (mine, theirs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)


# ---------------------------------------------------------------- make run


def test_make_run_takes_over_from_mlxk_run_and_ctrl_c_leaves_nothing(tmp_path):
    """The Makefile for real: a server `mlxk run` left behind is stopped with one line, the stack comes up with one
    scan, and Ctrl-C (SIGINT to make's process group, as a terminal sends it) leaves no mlxk process behind."""
    from tests.fixtures.server import REPO_ROOT

    root = tmp_path / "home"
    write_models(root, {SCRIPTED_ID: {"reply": SCRIPTED_REPLY}})
    env = server_env(root, free_port(), MLXK_SERVER_IDLE=120)
    env.pop("PYTHONPATH")
    make = None
    try:
        assert mlxk("run", SCRIPTED_ID, "hi", env=env).returncode == 0
        left = {p["role"]: p["pid"] for p in processes(env)}
        assert set(left) == {"api", "inference"}

        out = open(tmp_path / "make.log", "wb")
        make = subprocess.Popen(["make", "-s", "-C", str(REPO_ROOT), "run"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            roles = sorted(p["role"] for p in processes(env) if p["started_by"] == "make run")
            if roles == ["api", "inference", "worker"]:
                break
            assert make.poll() is None, (tmp_path / "make.log").read_text()
            time.sleep(0.5)
        log = (tmp_path / "make.log").read_text()
        assert f"stopped api (pid {left['api']}, started by mlxk run)" in log, log
        assert "already serving" not in log
        assert not psutil.pid_exists(left["api"]) or psutil.Process(left["api"]).status() == "zombie"
        wait_healthy(f"http://127.0.0.1:{env['MLXK_PORT']}")
        chat = httpx.post(f"http://127.0.0.1:{env['MLXK_PORT']}/v1/chat/completions", timeout=60,
                          json={"model": SCRIPTED_ID, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200, chat.text

        jobs = json.loads(mlxk("jobs", "--all", "--json", env=env).stdout)["data"]
        assert [j["kind"] for j in jobs] == ["scan"], jobs    # one scan: honcho's worker's, none from the index step
        running = processes(env)
        assert all(p["started_by"] == "make run" for p in running), running

        os.killpg(make.pid, signal.SIGINT)
        make.wait(60)
        deadline = time.monotonic() + 30
        while processes(env) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes(env) == []
        log = (tmp_path / "make.log").read_text()
        assert "terminate called" not in log and "Traceback" not in log, log
    finally:
        if make is not None and make.poll() is None:
            os.killpg(make.pid, signal.SIGTERM)
            make.wait(30)
        stop_all(env)


# ---------------------------------------------------------------- a job worker's exit


@pytest.mark.parametrize("argv", [[sys.executable, "-m", "mlxk.workers"], [MLXK, "worker"]],
                         ids=["python -m mlxk.workers", "mlxk worker"])
def test_a_job_worker_stopped_while_a_task_thread_has_run_mlx_exits_cleanly(argv, isolated, model_factory, tmp_path):
    """The task thread has just run mlx-lm's runtime check (paused at index.runtime_checked) when SIGTERM comes:
    the consumer re-queues the job and returns, the thread is still alive, and a normal interpreter exit ran MLX's
    C++ destructors under it: "terminate called without an active exception", SIGABRT (6 of 6 runs before)."""
    from tests.fixtures.pause import wait_paused

    model_factory.repo("mlx-community/tiny-chat")
    env = {**os.environ, "MLXK_TEST_PAUSE_AT": "index.runtime_checked"}
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=tmp_path)
    try:
        assert wait_paused(isolated, "index.runtime_checked") == worker.pid
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    output = (tmp_path / "worker.log").read_text()
    assert code == 0 and "terminate called" not in output, output
    assert "re-queued" in output and "stopped" in output   # cleaned up before leaving
    jobs = json.loads(mlxk("jobs", "--json", env={**os.environ, "MLXK_WORKER_IDLE": "1"}).stdout)["data"]
    assert [(j["kind"], j["state"]) for j in jobs] == [("scan", "queued")]


def test_a_worker_on_another_host_is_listed_from_its_heartbeat_and_never_signalled(isolated):
    """A second machine cannot run here: its worker is a heartbeat row written as that machine's worker writes it
    (the seam is the shared `workers` table). Its pid is this test's own, so a wrong signal would end the test."""
    from contextlib import closing

    from mlxk.db import jobs as jobs_db
    from mlxk.jobs import connect

    with closing(connect()) as conn:
        jobs_db.register_worker(conn, id=f"gpu-box:{os.getpid()}:1", kind="queue", pid=os.getpid(), host="gpu-box")
    found = processes(os.environ.copy())
    assert [(p["role"], p["host"], p["pid"], p["background"]) for p in found] == \
           [("worker", "gpu-box", os.getpid(), False)]
    assert "gpu-box (not stopped from here)" in mlxk("processes").stdout
    done = mlxk("processes", "stop", "--all", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["data"]["stopped"] == []
    named = mlxk("processes", "stop", str(os.getpid()))
    assert named.returncode == 1 and f"no mlxk process with pid {os.getpid()}" in named.stderr
