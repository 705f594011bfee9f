"""A pull never exposes a half-written snapshot: it is built in `<repo>/.staging/` and published by one rename,
`refs/<ref>` last. A worker killed (kill -9, at a named pause point: mlxk.faults) or a pull failing at any step
leaves the old state for `mlxk list` / `mlxk health`, and the next pull resumes and succeeds."""
from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest

from mlxk import errors
from mlxk import hub as hubmod   # `hub` is the test server fixture
from tests.fixtures.cli import run, run_json
from tests.fixtures.jobs import job_row, repo_path, wait_for
from tests.fixtures.pause import kill_paused

STEPS = ["pull.linking", "pull.publishing", "pull.ref"]


def _safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 8


def _files(version: str) -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "llama"}', "model.safetensors": _safetensors(),
            "tokenizer.json": b'{"version": "1.0"}', "tokenizer_config.json": b"{}",
            "README.md": f"# {version}".encode(), f"notes-{version}.txt": version.encode()}


def _listed(repo: str) -> dict | None:
    _result, doc = run_json("list")
    return {m["name"]: m for m in doc["data"]["models"]}.get(repo)


def _finish(job_id: str) -> dict:
    return wait_for(lambda: job_row(job_id)["state"] in ("succeeded", "failed") and job_row(job_id), timeout=60)


@pytest.mark.parametrize("step", STEPS)
def test_killed_first_pull_is_never_healthy_and_the_next_worker_finishes_it(hub, isolated, worker_manager, step):
    repo = hub.unique_repo("org/first")
    sha = hub.add_repo(repo, _files("v1"))
    paused = worker_manager.start(env={"MLXK_TEST_PAUSE_AT": step})
    job_id = run("pull", repo).stdout.strip()

    assert kill_paused(isolated, step) == paused.pid
    paused.wait()

    listed = _listed(repo)
    if step == "pull.ref":
        # Published, complete, only refs/main missing: the whole new snapshot (the newest one) is what list sees.
        assert listed["hash"] == sha and listed["health"] == "healthy", listed
    else:
        # Nothing published: list may show the repo (its blobs are there) but never as healthy.
        assert listed is None or listed["health"] != "healthy", listed
        assert not (repo_path(repo) / "snapshots" / sha).exists()
        result, doc = run_json("health", repo)
        assert result.exit_code == 0 and doc["data"]["summary"]["unhealthy_count"] == 1, doc  # a finding, exit 0

    worker_manager.start()
    final = _finish(job_id)
    assert final["state"] == "succeeded", final
    assert (repo_path(repo) / "refs" / "main").read_text() == sha
    assert not (repo_path(repo) / ".staging").exists()
    listed = _listed(repo)
    assert listed["hash"] == sha and listed["health"] == "healthy", listed


@pytest.mark.parametrize("step", STEPS)
def test_killed_update_keeps_the_old_snapshot_until_the_new_one_is_whole(hub, isolated, worker_manager, step):
    repo = hub.unique_repo("org/update")
    old = hub.add_repo(repo, _files("v1"))
    hubmod.pull(repo, cache_dir=Path(os.environ["HF_HUB_CACHE"]), endpoint=hub.endpoint)
    new = hub.add_repo(repo, _files("v2"))
    paused = worker_manager.start(env={"MLXK_TEST_PAUSE_AT": step})
    job_id = run("pull", repo).stdout.strip()

    kill_paused(isolated, step)
    paused.wait()

    listed = _listed(repo)
    assert listed["hash"] == old and listed["health"] == "healthy", listed
    result, doc = run_json("health", repo)
    assert result.exit_code == 0 and doc["data"]["models"][0]["hash"] == old, doc
    snapshots = {p.name for p in (repo_path(repo) / "snapshots").iterdir()}
    assert snapshots == ({old, new} if step == "pull.ref" else {old})

    worker_manager.start()
    assert _finish(job_id)["state"] == "succeeded"
    listed = _listed(repo)
    assert listed["hash"] == new and listed["health"] == "healthy", listed
    assert (repo_path(repo) / "snapshots" / new / "notes-v2.txt").read_bytes() == b"v2"
    assert not (repo_path(repo) / ".staging").exists()


def test_a_pull_failing_while_linking_publishes_nothing_and_names_the_file(hub, monkeypatch):
    """The seam: os.symlink is made to fail (EIO) on the third link, as a full or failing disk would; a real one
    cannot be produced here."""
    import errno

    cache = Path(os.environ["HF_HUB_CACHE"])
    repo = hub.unique_repo("org/failing")
    old = hub.add_repo(repo, _files("v1"))
    hubmod.pull(repo, cache_dir=cache, endpoint=hub.endpoint)
    new = hub.add_repo(repo, _files("v2"))
    real_symlink, calls = os.symlink, []

    def failing_symlink(src, dst, *args, **kw):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_symlink(src, dst, *args, **kw)

    monkeypatch.setattr(os, "symlink", failing_symlink)
    with pytest.raises(errors.CacheError) as raised:
        hubmod.pull(repo, cache_dir=cache, endpoint=hub.endpoint)
    staging = repo_path(repo) / ".staging" / f"{new}.{os.getpid()}-{threading.get_ident()}"
    failed_file = Path(calls[2]).relative_to(staging).as_posix()
    assert raised.value.type == "cache_error" and raised.value.details["file"] == failed_file
    assert f"cannot write {failed_file} of {repo}@{new[:12]}" in raised.value.message
    assert "Input/output error" in raised.value.message
    assert {p.name for p in (repo_path(repo) / "snapshots").iterdir()} == {old}
    assert (repo_path(repo) / "refs" / "main").read_text() == old
    assert not (repo_path(repo) / ".staging").exists()

    monkeypatch.setattr(os, "symlink", real_symlink)
    result = hubmod.pull(repo, cache_dir=cache, endpoint=hub.endpoint)
    assert result.revision == new and (repo_path(repo) / "refs" / "main").read_text() == new
    assert result.bytes_downloaded == 0   # the blobs were all there: only the links were missing


@pytest.mark.parametrize("exchange", ["atomic", "two-renames"])
def test_pulling_more_files_of_a_cached_commit_replaces_the_snapshot_whole(hub, monkeypatch, exchange):
    """An --include pull, then a full one of the same commit: the snapshot is rebuilt beside it and swapped in,
    keeping what it had but a link out of blobs/; a staging folder a dead process left behind is swept. `two-renames`: the seam
    hub._exchange says the kernel has no atomic exchange (as on an old kernel or filesystem)."""
    if exchange == "two-renames":
        monkeypatch.setattr(hubmod, "_exchange", lambda a, b: False)
    cache = Path(os.environ["HF_HUB_CACHE"])
    repo = hub.unique_repo("org/grow")
    sha = hub.add_repo(repo, _files("v1"))
    first = hubmod.pull(repo, cache_dir=cache, endpoint=hub.endpoint, include=["*.json"])
    snapshot = repo_path(repo) / "snapshots" / sha
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    (snapshot / "planted.txt").symlink_to("../../../../../victim.txt")   # a link out, from before the checks
    stale = repo_path(repo) / ".staging" / f"{sha}.999999999"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "x").symlink_to("../../../blobs/nothing")

    full = hubmod.pull(repo, cache_dir=cache, endpoint=hub.endpoint)

    assert first.snapshot_path == full.snapshot_path == snapshot
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == _files("v1")
    assert all(p.is_symlink() and os.readlink(p).startswith("../../blobs/") for p in snapshot.iterdir())
    assert not (repo_path(repo) / ".staging").exists()
    assert hubmod.pull(repo, cache_dir=cache, endpoint=hub.endpoint).up_to_date


def test_an_oserror_while_downloading_is_a_cache_error_naming_the_file(hub, monkeypatch):
    """The seam: os.replace fails (EROFS) when a finished blob is moved into blobs/, as a disk remounted read-only
    would; a real one cannot be produced here."""
    import errno

    cache = Path(os.environ["HF_HUB_CACHE"])
    repo = hub.unique_repo("org/readonly")
    hub.add_repo(repo, {"config.json": b'{"model_type": "llama"}'})
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kw):
        if "/blobs/" in str(dst):
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_replace(src, dst, *args, **kw)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(errors.CacheError) as raised:
        hubmod.pull(repo, cache_dir=cache, endpoint=hub.endpoint)
    assert raised.value.details["file"] == "config.json" and "Read-only file system" in raised.value.message
    assert not (repo_path(repo) / "snapshots").exists() and not (repo_path(repo) / "refs").exists()


def test_another_live_process_staging_is_left_alone(hub):
    """Only dead owners' (and this thread's own) staging folders are swept: a concurrent `mlxk` pulling into the same
    cache from another process keeps its half-built snapshot."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    repo = hub.unique_repo("org/shared-cache")
    sha = hub.add_repo(repo, _files("v1"))
    live = repo_path(repo) / ".staging" / f"{sha}.{os.getppid()}-1"   # our parent: alive for sure
    live.mkdir(parents=True)
    (live / "config.json").symlink_to("../../blobs/whatever")

    result = hubmod.pull(repo, cache_dir=cache, endpoint=hub.endpoint)

    assert result.revision == sha and (result.snapshot_path / "config.json").is_file()
    assert (live / "config.json").is_symlink()
