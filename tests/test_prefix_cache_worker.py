"""The prompt-prefix cache on disk in the real inference worker process: a restart hit, and what it may write where."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from mlxk.workers.inference import protocol
from tests import factory
from tests.test_inference_worker import WorkerLauncher, collect, stop_worker

# Long enough for the worker's defaults (prefixcache.MIN_TOKENS 256, blocks of 64) with the tiny tokenizer.
SYSTEM = " ".join(f"Rule {i}: keep every answer short, polite and on topic for the user." for i in range(40))


@pytest.fixture
def launcher(tmp_path):
    with contextlib.closing(WorkerLauncher(tmp_path)) as launched:
        yield launched


@pytest.fixture
def model(tmp_path) -> dict:
    repo = factory.write_repo(tmp_path / "hub", "mlx-community/tiny-chat", factory.tiny_model_files())
    return {"key": f"{repo.repo_id}@{repo.revision}", "path": str(repo.snapshot_dir)}


def ask(sock: str, model: dict, user: str = "hello") -> list[dict]:
    payload = {"op": "generate", "id": "r", "model": model, "kind": "chat", "prompt": None,
               "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
               "params": {"max_tokens": 12, "temperature": 0}}
    events = asyncio.run(collect(sock, payload))
    assert events[-1]["event"] == "done", events[-1]
    return events


def text(events: list[dict]) -> str:
    return "".join(e.get("content", "") for e in events if e["event"] == "delta")


def tree(root: Path, skip: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if skip not in p.parents and p != skip}


def test_a_restarted_worker_restores_the_prefix_from_disk_and_writes_only_under_its_home(launcher, model, tmp_path):
    home = tmp_path / "home"
    before = tree(tmp_path, home)
    proc, sock = launcher.start()
    cold = ask(sock, model)
    assert cold[0]["cached_tokens"] == 0 and cold[0]["prompt_tokens"] > 320
    assert stop_worker(proc) == 0                      # SIGTERM: queued blocks are written before it exits
    files = sorted((home / "prefix-cache").rglob("*.safetensors"))
    assert files and all(not f.name.startswith(".") for f in files)

    proc, sock = launcher.start()
    warm = ask(sock, model)
    assert warm[0]["cached_tokens"] >= 256 and warm[0]["cached_tokens"] % 64 == 0
    assert warm[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == warm[0]["cached_tokens"]
    assert text(warm) == text(cold)                    # temperature 0: the restored KV gives the cold answer
    other = ask(sock, model, "tell me something else")  # same system prompt, another user turn
    assert other[0]["cached_tokens"] >= 256
    status = protocol.call(sock, {"op": "status"})["prefix_cache"]
    assert status["enabled"] and status["hits"] >= 1 and status["bytes"] > 0
    assert status["dir"] == str(home / "prefix-cache")
    assert stop_worker(proc) == 0

    after = tree(tmp_path, home)
    new = set(after) - set(before)
    # nothing outside MLXK_HOME but what the test placed there itself: the log, the socket's lock (--socket)
    assert new <= {str(tmp_path / "worker.log"), f"{launcher.sock}.lock"}, new
    assert {k: v for k, v in after.items() if k in before} == before


def test_zero_bytes_writes_nothing(launcher, model, tmp_path):
    launcher.env["MLXK_PREFIX_CACHE_BYTES"] = "0"
    proc, sock = launcher.start()
    ask(sock, model)
    assert protocol.call(sock, {"op": "status"})["prefix_cache"]["enabled"] is False
    assert stop_worker(proc) == 0
    assert not (tmp_path / "home" / "prefix-cache").exists()


def test_an_unwritable_cache_directory_leaves_generation_working(launcher, model, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "prefix-cache").write_text("a file, so nothing can be created under it")
    proc, sock = launcher.start()
    assert ask(sock, model)[-1]["finish_reason"] in ("stop", "length")
    assert protocol.call(sock, {"op": "status"})["prefix_cache"]["enabled"] is False
    assert stop_worker(proc) == 0
    assert "prompt-prefix cache on disk is off" in (tmp_path / "worker.log").read_text()


def test_a_bad_size_setting_is_named(launcher):
    launcher.env["MLXK_PREFIX_CACHE_BYTES"] = "lots"
    result = launcher.run_second()
    assert result.returncode == 1 and "MLXK_PREFIX_CACHE_BYTES" in result.stderr and "10G" in result.stderr
    assert "Traceback" not in result.stderr
