"""The inference worker as a real process over its real Unix socket."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import factory
from mlxk.workers.inference import protocol

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "hello world"}]


class WorkerLauncher:
    """Starts `python -m mlxk.workers.inference` processes in one directory (socket, log and MLXK_HOME under it), and on
    close() kills and reaps whichever of them still runs, so a failed assertion leaves no process behind."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.sock = str(tmp / "inference.sock")
        self.env = {**os.environ, "MLXK_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        self.started: list[subprocess.Popen] = []

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mlxk.workers.inference", "--socket", self.sock, *args]

    def start(self, *args: str) -> tuple[subprocess.Popen, str]:
        """A worker answering pings on the socket."""
        log_path = self.tmp / "worker.log"
        with open(log_path, "ab") as log:   # the child keeps its own copy of the handle
            proc = subprocess.Popen(self.argv(*args), cwd=str(self.tmp), env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT)
        self.started.append(proc)
        deadline = time.time() + 60
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited with {proc.returncode}: {log_path.read_text()}")
            try:
                if protocol.call(self.sock, {"op": "ping"}, timeout=5)["event"] == "pong":
                    return proc, self.sock
            except OSError:
                time.sleep(0.05)
        raise AssertionError("worker did not start")

    def run_second(self) -> subprocess.CompletedProcess:
        """One more worker on the same socket, run to its end."""
        return subprocess.run(self.argv(), cwd=str(self.tmp), env=self.env, capture_output=True, text=True,
                              timeout=60)

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def stop_worker(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return proc.returncode


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    repos = {
        "hello": factory.write_repo(cache, "org/hello", factory.tiny_model_files(reply="Hello world!")),
        "chat": factory.write_repo(cache, "mlx-community/tiny-chat", factory.tiny_model_files()),
    }
    return {name: {"key": f"{r.repo_id}@{r.revision}", "path": str(r.snapshot_dir)} for name, r in repos.items()}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with contextlib.closing(WorkerLauncher(tmp_path_factory.mktemp("worker"))) as launched:
        proc, sock = launched.start("--max-loaded", "2")
        yield sock
        assert stop_worker(proc) == 0


@pytest.fixture
def launcher(tmp_path):
    """Workers of one test, in tmp_path; any still running at teardown are killed."""
    with contextlib.closing(WorkerLauncher(tmp_path)) as launched:
        yield launched


def generate(model: dict, max_tokens: int = 20, **params) -> dict:
    return {"op": "generate", "id": "req-1", "model": model, "kind": "chat", "messages": HELLO, "prompt": None,
            "params": {"max_tokens": max_tokens, **params}}


async def collect(sock: str, payload: dict) -> list[dict]:
    return [event async for event in protocol.request(sock, payload)]


def test_generate_streams_events_in_order(worker, models):
    events = asyncio.run(collect(worker, generate(models["hello"])))
    assert events[0]["event"] == "accepted" and events[0]["prompt_tokens"] > 0
    deltas = [e for e in events if e["event"] == "delta"]
    assert "".join(d["content"] for d in deltas) == "Hello world!"
    assert len(deltas) >= 2  # streamed as produced
    done = events[-1]
    assert done["event"] == "done" and done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 4
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + 4


def test_concurrent_clients_are_batched(worker, models):
    async def both():
        return await asyncio.gather(*(collect(worker, generate(models["chat"], 40)) for _ in range(3)))

    results = asyncio.run(both())
    texts = {"".join(e.get("content", "") for e in r if e["event"] == "delta") for r in results}
    assert len(texts) == 1 and all(r[-1]["finish_reason"] == "length" for r in results)
    assert protocol.call(worker, {"op": "status"})["peak_batch_rows"] >= 2


def test_status_and_unload(worker, models):
    asyncio.run(collect(worker, generate(models["hello"], 2)))
    status = protocol.call(worker, {"op": "status"})
    assert status["event"] == "status" and status["pid"] > 0
    assert models["hello"]["key"] in [m["key"] for m in status["models"]]
    assert status["counters"]["requests_total"] >= 1 and status["running"] == 0
    reply = protocol.call(worker, {"op": "unload", "model": "org/hello"})
    assert reply == {"event": "unloaded", "models": [models["hello"]["key"]]}
    status = protocol.call(worker, {"op": "status"})
    assert models["hello"]["key"] not in [m["key"] for m in status["models"]]


def test_load_op_and_bad_path(worker, models, tmp_path):
    assert protocol.call(worker, {"op": "load", "model": models["hello"], "keep_alive": 30}) == {
        "event": "loaded", "key": models["hello"]["key"]}
    reply = protocol.call(worker, {"op": "load", "model": {"key": "org/nope@" + "0" * 40, "path": str(tmp_path)}})
    assert reply["event"] == "error" and reply["type"] == "load_failed" and "\n" not in reply["message"]


@pytest.mark.parametrize("line, fragment", [
    (b"not json\n", "not valid JSON"),
    (b'{"op": "frobnicate"}\n', "unknown op"),
    (b'{"op": "generate", "kind": "chat", "messages": []}\n', "messages"),
])
def test_bad_requests_get_bad_request(worker, line, fragment):
    import json
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(worker)
        s.sendall(line)
        reply = json.loads(s.makefile("rb").readline())
    assert reply["type"] == "bad_request" and reply["status"] == 400 and fragment in reply["message"]


def test_client_disconnect_cancels(worker, models):
    async def start_and_hang_up():
        events = []
        async with contextlib.aclosing(protocol.request(worker, generate(models["chat"], 1800))) as stream:
            async for event in stream:
                events.append(event)
                if len(events) == 3:
                    break  # aclosing closes the connection: that is the cancel
        return events

    before = protocol.call(worker, {"op": "status"})["counters"]["generation_tokens_total"]
    assert [e["event"] for e in asyncio.run(start_and_hang_up())] == ["accepted", "delta", "delta"]
    deadline = time.time() + 10
    while protocol.call(worker, {"op": "status"})["running"] and time.time() < deadline:
        time.sleep(0.02)
    status = protocol.call(worker, {"op": "status"})
    assert status["running"] == 0
    generated = status["counters"]["generation_tokens_total"] - before
    assert generated < 1800
    time.sleep(0.2)
    assert protocol.call(worker, {"op": "status"})["counters"]["generation_tokens_total"] - before == generated


def test_sigterm_fails_in_flight_with_retryable_error_and_removes_socket(launcher, models):
    proc, sock = launcher.start()

    async def in_flight():
        events = []
        async for event in protocol.request(sock, generate(models["chat"], 1800)):
            events.append(event)
            if len(events) == 2:
                proc.send_signal(signal.SIGTERM)
        return events

    events = asyncio.run(in_flight())
    assert events[-1]["event"] == "error" and events[-1]["retryable"] is True and events[-1]["status"] == 503
    assert proc.wait(20) == 0
    assert not Path(sock).exists()


def test_idle_exit(launcher):
    proc, sock = launcher.start("--idle-exit", "0.5")
    assert proc.wait(20) == 0
    assert not Path(sock).exists()


def test_stale_socket_file_is_replaced(launcher):
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(launcher.sock)
    stale.close()  # the file stays, nobody listens: a crashed worker's leftover
    proc, sock = launcher.start()
    assert protocol.call(sock, {"op": "ping"})["pid"] == proc.pid
    assert stop_worker(proc) == 0


def test_second_worker_on_a_live_socket_refuses_and_leaves_it_alone(launcher):
    proc, sock = launcher.start()
    second = launcher.run_second()
    assert second.returncode == 1 and "already serving" in second.stderr
    assert protocol.call(sock, {"op": "ping"})["pid"] == proc.pid
    assert stop_worker(proc) == 0


def test_worker_holds_the_socket_lock_so_a_racing_second_worker_refuses(launcher):
    """Two workers starting together (honcho's and the api's) must not both bind: the lock decides, before
    either touches the socket path, and the kernel frees it when its holder dies."""
    import fcntl

    from mlxk.workers.inference.server import socket_lock_path

    sock = launcher.sock
    with open(socket_lock_path(sock), "w") as held:  # a worker that is still starting: lock taken, no socket yet
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = launcher.run_second()
        assert second.returncode == 1 and "already serving" in second.stderr
        assert not Path(sock).exists()
    proc, sock = launcher.start()
    with open(socket_lock_path(sock), "w") as probe, pytest.raises(BlockingIOError):
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    proc.kill()
    proc.wait(10)
    with open(socket_lock_path(sock), "w") as probe:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a killed worker leaves no lock behind
