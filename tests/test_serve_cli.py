"""`mlxk serve` and `mlxk run` as real processes: bind refusal, clean SIGTERM, and `run` starting its own server."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from tests.fixtures.cli import MLXK
from tests.fixtures.pause import release, wait_paused
from tests.fixtures.server import (RANDOM_ID, SCRIPTED_ID, SCRIPTED_REPLY, free_port, server_env, spawn_server,
                                   write_models)


def mlxk(env: dict, *args, input: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([*MLXK, *args], env=env, input=input if input is not None else "",
                          capture_output=True, text=True, timeout=timeout)


def test_serve_refuses_public_bind_without_api_key(tmp_path):
    env = server_env(tmp_path, free_port())
    result = mlxk(env, "serve", "--host", "0.0.0.0")
    assert result.returncode == 1
    assert "refusing to listen on 0.0.0.0 without an API key" in result.stderr
    result = mlxk(env, "serve", "--host", "0.0.0.0", "--json")
    doc = json.loads(result.stdout)
    assert result.returncode == 1 and doc["error"]["code"] == "config_error"


def test_sigterm_stops_worker_and_cleans_up(tmp_path):
    srv = spawn_server(tmp_path, models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}})
    try:
        response = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                              json={"model": SCRIPTED_ID, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200
        worker = psutil.Process(srv.health()["worker"]["pid"])
        sock = Path(srv.env["MLXK_HOME"]) / "inference.sock"
        pid_file = Path(srv.env["MLXK_HOME"]) / "run" / "server.pid"
        assert sock.exists() and json.loads(pid_file.read_text())["pid"] == srv.proc.pid
        os.kill(srv.proc.pid, signal.SIGTERM)  # the api only: it must stop its worker itself
        # uvicorn shuts down gracefully, then re-raises the signal it caught (the conventional exit status).
        assert srv.proc.wait(20) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in srv.log()
        worker.wait(10)
        assert not worker.is_running()
        assert not sock.exists() and not pid_file.exists()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/health", timeout=2)
    finally:
        srv.stop()


def test_server_started_for_run_exits_when_idle(tmp_path):
    srv = spawn_server(tmp_path, args=("--idle-exit", "1"))
    try:
        assert srv.proc.wait(15) in (0, -signal.SIGTERM)
        assert "no request for 1s: exiting" in srv.log()
        assert not (Path(srv.env["MLXK_HOME"]) / "run" / "server.pid").exists()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    """An MLXK_HOME with models and no server; `mlxk run` starts one in the background, killed at the end."""
    root = tmp_path_factory.mktemp("run")
    write_models(root, {SCRIPTED_ID: {"reply": SCRIPTED_REPLY}, RANDOM_ID: {}})
    env = server_env(root, free_port(), MLXK_SERVER_IDLE=120)
    yield env
    pid_file = Path(env["MLXK_HOME"]) / "run" / "server.pid"
    if pid_file.exists():
        pid = json.loads(pid_file.read_text())["pid"]
        try:
            os.killpg(pid, signal.SIGTERM)  # started with its own session: the group is server + worker
            psutil.Process(pid).wait(15)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass


def test_run_one_shot_starts_a_background_server(run_env):
    result = mlxk(run_env, "run", "tiny-scripted", "Say hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == SCRIPTED_REPLY + "\n"
    record = json.loads((Path(run_env["MLXK_HOME"]) / "run" / "server.pid").read_text())
    assert psutil.pid_exists(record["pid"])
    assert (Path(run_env["MLXK_HOME"]) / "logs" / "server.log").exists()
    again = mlxk(run_env, "run", SCRIPTED_ID, "Again")
    assert again.returncode == 0 and "Starting a server" not in again.stderr


def test_run_json_and_piped_stdin(run_env):
    plain = mlxk(run_env, "run", SCRIPTED_ID, "Summarize", "--json")
    doc = json.loads(plain.stdout)
    assert plain.returncode == 0 and doc["status"] == "success" and doc["command"] == "run"
    assert doc["data"]["content"] == SCRIPTED_REPLY and doc["data"]["finish_reason"] == "stop"
    # mlx-knife's run fields (issue 12): the answer in `response`, the prompt, counts and time
    assert (doc["data"]["response"], doc["data"]["prompt"]) == (SCRIPTED_REPLY, "Summarize")
    assert doc["data"]["tokens_generated"] == doc["data"]["usage"]["completion_tokens"] > 0
    assert doc["data"]["generation_time_s"] > 0
    words = json.loads(mlxk(run_env, "run", SCRIPTED_ID, "Summarize", "this", "--json").stdout)
    assert words["data"]["prompt"] == "Summarize this"   # unquoted words are one prompt
    option = json.loads(mlxk(run_env, "run", SCRIPTED_ID, "--prompt", "Summarize that", "--json").stdout)
    assert option["status"] == "success" and option["data"]["prompt"] == "Summarize that"
    piped = json.loads(mlxk(run_env, "run", SCRIPTED_ID, "Summarize", "--json",
                            input="a long document " * 20).stdout)
    assert piped["data"]["usage"]["prompt_tokens"] > doc["data"]["usage"]["prompt_tokens"] + 20
    only_stdin = mlxk(run_env, "run", SCRIPTED_ID, input="just stdin")
    assert only_stdin.returncode == 0 and only_stdin.stdout == SCRIPTED_REPLY + "\n"


def test_run_options_reach_the_server(run_env):
    doc = json.loads(mlxk(run_env, "run", SCRIPTED_ID, "x", "--max-tokens", "2", "--system", "Be brief",
                          "--temperature", "0", "--json").stdout)
    assert doc["data"]["finish_reason"] == "length" and doc["data"]["usage"]["completion_tokens"] == 2


def test_run_not_runnable_or_unknown_model_gives_reason(run_env):
    from tests import factory

    factory.make_variant(Path(run_env["HF_HUB_CACHE"]), "shard_empty", repo_id="mlx-community/tiny-broken")
    result = mlxk(run_env, "run", "tiny-broken", "hi")
    assert result.returncode == 1
    assert "mlx-community/tiny-broken cannot be run" in result.stderr and "Traceback" not in result.stderr
    result = mlxk(run_env, "run", "no-such-model", "hi", "--json")
    doc = json.loads(result.stdout)
    assert result.returncode == 1 and doc["error"]["code"] == "model_not_found"


def _read_until(fd: int, needle: str, timeout: float = 60) -> str:
    seen, deadline = "", time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 4096).decode(errors="replace")
            except OSError:
                break
    return seen


@contextmanager
def terminal_session(env: dict, *args: str):
    """`mlxk <args>` on a pseudo-terminal: yields (process, the terminal's fd); killed and reaped if still running."""
    leader, follower = pty.openpty()
    # A bare pty answers no cursor-position request; prompt_toolkit's setting for such terminals (see test_chat_cli).
    env = {**env, "PROMPT_TOOLKIT_NO_CPR": "1"}
    proc = subprocess.Popen([*MLXK, *args], env=env, stdin=follower, stdout=follower, stderr=follower,
                            close_fds=True)
    os.close(follower)
    try:
        yield proc, leader
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(leader)


def test_interactive_chat_in_a_terminal(run_env):
    with terminal_session(run_env, "run", SCRIPTED_ID) as (proc, leader):
        assert ">>>" in _read_until(leader, ">>>")
        os.write(leader, b"hi\n")
        assert SCRIPTED_REPLY in _read_until(leader, SCRIPTED_REPLY)
        os.write(leader, b'"""\nline one\nline two\n"""\n')
        assert SCRIPTED_REPLY in _read_until(leader, SCRIPTED_REPLY)
        os.write(leader, b"/clear\n")
        assert "Cleared" in _read_until(leader, "Cleared")
        os.write(leader, b"/bye\n")
        assert proc.wait(30) == 0


def test_interactive_ctrl_c_stops_the_reply_not_the_session(tmp_path):
    """The reply is held before its prefill (the worker's test-only pause point), so Ctrl-C always lands while the
    reply is still owed, however fast the tiny model would have finished it."""
    write_models(tmp_path, {RANDOM_ID: {}})
    env = server_env(tmp_path, free_port(), MLXK_SERVER_IDLE=60, MLXK_TEST_PAUSE_AT="inference.admit")
    home = Path(env["MLXK_HOME"])
    try:
        with terminal_session(env, "run", RANDOM_ID, "--max-tokens", "2000") as (proc, leader):
            _read_until(leader, ">>>")
            os.write(leader, b"tell me everything\n")
            wait_paused(home, "inference.admit")   # the request is out; its reply cannot begin
            time.sleep(0.5)   # prompt_toolkit hands the terminal (and SIGINT) back after the request went
            proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
            seen = _read_until(leader, "[reply stopped]", timeout=15)
            assert "[reply stopped]" in seen
            release(home, "inference.admit")
            after = seen.split("[reply stopped]", 1)[1]
            if ">>>" not in after:
                after += _read_until(leader, ">>>")
            assert ">>>" in after
            assert proc.poll() is None
            os.write(leader, b"/bye\n")
            assert proc.wait(30) == 0
    finally:
        release(home, "inference.admit")
        pid_file = home / "run" / "server.pid"
        if pid_file.exists():
            try:
                os.killpg(json.loads(pid_file.read_text())["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_serve_on_a_busy_port_is_one_line_and_exit_1(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = server_env(tmp_path, port)
        result = mlxk(env, "serve")
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"Error: port {port} on 127.0.0.1 is in use by another program (another `mlxk serve`?): stop it "
            "(`mlxk processes`) or choose another port with --port or MLXK_PORT."]
        doc = json.loads(mlxk(env, "serve", "--json").stdout)
        assert doc["status"] == "error" and doc["error"]["code"] == "conflict" and doc["error"]["port"] == port


@pytest.mark.parametrize("args, env_port, words", [
    (("--port", "99999"), None, "99999 is not in the range 1<=x<=65535"),
    (("--port", "0"), None, "0 is not in the range 1<=x<=65535"),
    ((), "99999", "MLXK_PORT=99999 is not a TCP port"),
])
def test_serve_with_an_impossible_port_is_refused_without_a_traceback(tmp_path, args, env_port, words):
    env = server_env(tmp_path, free_port())
    if env_port:
        env["MLXK_PORT"] = env_port
    result = mlxk(env, "serve", *args)
    assert result.returncode == (2 if args else 1) and words in result.stderr
    assert "Traceback" not in result.stderr
    doc = json.loads(mlxk(env, "serve", *args, "--json").stdout)
    assert doc["error"]["code"] == ("usage" if args else "config_error")


def test_serve_json_prints_one_envelope_when_stopped(tmp_path):
    srv = spawn_server(tmp_path, args=("--json",))
    try:
        os.kill(srv.proc.pid, signal.SIGTERM)
        assert srv.proc.wait(20) == 0
    finally:
        srv.stop()
    out = srv.log().splitlines()
    envelopes = [json.loads(line) for line in out if line.startswith("{")]
    assert len(envelopes) == 1
    assert envelopes[0]["status"] == "success" and envelopes[0]["command"] == "serve"
    assert envelopes[0]["data"]["signal"] == "SIGTERM" and envelopes[0]["data"]["port"] == srv.port


def test_worker_json_prints_one_envelope_when_stopped(tmp_path):
    import threading

    env = server_env(tmp_path, free_port())
    proc = subprocess.Popen([*MLXK, "worker", "--no-scan", "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("consumer started" in line for line in lines):
        time.sleep(0.2)
    time.sleep(1.0)   # huey logs "started" just before it installs its signal handlers
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(30) == 0, "".join(lines)
    doc = json.loads(out)
    assert doc["status"] == "success" and doc["command"] == "worker" and doc["data"]["exit_code"] == 0


def test_a_cli_user_without_the_api_key_is_told_to_set_mlxk_api_key(server):
    env = dict(server.env)
    env.pop("MLXK_API_KEY", None)
    result = mlxk(env, "run", SCRIPTED_ID, "hi")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"Error: the server at {server.url} needs an API key: set MLXK_API_KEY to the key "
                                     "it was started with (`export MLXK_API_KEY=...`) and run the command again.")
    wrong = json.loads(mlxk({**env, "MLXK_API_KEY": "not-it"}, "ps", "--json").stdout)
    assert wrong["error"]["code"] == "invalid_api_key"
    assert "refused the one in MLXK_API_KEY" in wrong["error"]["message"] and "Authorization" not in \
        wrong["error"]["message"]
    assert json.loads(mlxk({**env, "MLXK_API_KEY": server.api_key}, "ps", "--json").stdout)["status"] == "success"
