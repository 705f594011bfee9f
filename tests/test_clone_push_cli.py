"""`mlxk clone` and `mlxk push` as jobs: a cached model clones without the network, an uncached one is pulled
first, the workspace is checked, `push --check-only` is offline and immediate, and a push round trip lands the
workspace's files on the test Hub."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.cli import run, run_json
from tests.fixtures.jobs import job_row, state_db


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_clone_of_a_cached_model_needs_no_network(hub, worker, tiny_model, tmp_path):
    dest = tmp_path / "ws"

    result, doc = run_json("clone", tiny_model.repo_id, str(dest), "--wait")

    assert result.exit_code == 0, result.output
    job = doc["data"]
    assert job["kind"] == "clone" and job["state"] == "succeeded"
    assert job["result"]["pulled"] is None and job["result"]["findings"] == []
    assert _files(dest) == {name: tiny_model.read(name) for name in tiny_model.files}
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert [r for r in hub.requests if r.origin in ("hub", "cdn")] == []


def test_clone_of_an_uncached_model_pulls_it_first(hub, worker, model_factory, tmp_path):
    repo = hub.unique_repo("mlx-community/remote")
    files = model_factory.files()
    hub.add_repo(repo, files)
    dest = tmp_path / "ws"

    result, doc = run_json("clone", repo, str(dest), "--wait")

    assert result.exit_code == 0, result.output
    job = doc["data"]
    assert job["result"]["pulled"]["repo_id"] == repo and job["result"]["findings"] == []
    # QA F3: no cache paths in job results: the snapshot relative to the HF cache
    folder = "models--" + repo.replace("/", "--")
    assert job["result"]["snapshot"].startswith(f"{folder}/snapshots/")
    assert job["result"]["pulled"]["snapshot_path"] == job["result"]["snapshot"]
    assert _files(dest) == files


def test_clone_into_a_non_empty_directory_is_refused(tiny_model, tmp_path, reap_workers):
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    result, doc = run_json("clone", tiny_model.repo_id, str(dest))
    assert result.exit_code == 1 and doc["error"]["code"] == "conflict"
    assert (dest / "keep.txt").read_text() == "mine"


def test_push_check_only_is_offline_and_immediate(tiny_model, tmp_path, reap_workers):
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in tiny_model.files:
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_bytes(tiny_model.read(name))

    ok = run("push", str(ws), "org/target", "--check-only", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["data"]["ok"] is True

    (ws / "config.json").unlink()
    bad, doc = run_json("push", str(ws), "org/target", "--check-only")
    assert bad.exit_code == 1 and doc["error"]["code"] == "workspace_invalid"
    assert "config.json" in doc["error"]["message"]
    from mlxk.db import jobs as jobs_db

    with state_db() as conn:
        assert jobs_db.list_jobs(conn) == []


def test_push_round_trip(hub, worker_manager, tiny_model, tmp_path, monkeypatch):
    hub.add_token("hf_writer", user="alice")
    monkeypatch.setenv("HF_TOKEN", "hf_writer")
    worker_manager.start()
    ws = tmp_path / "ws"
    assert run("clone", tiny_model.repo_id, str(ws), "--wait").exit_code == 0
    (ws / "README.md").write_text("---\nlibrary_name: mlx\n---\n# tuned\n")
    repo = hub.unique_repo("alice/tuned")

    result, doc = run_json("push", str(ws), repo, "--private", "--message", "first upload", "--wait")

    assert result.exit_code == 0, result.output
    job = doc["data"]
    assert job["kind"] == "push" and job["target"] == repo and job["state"] == "succeeded"
    assert job["result"]["created"] is True and job["result"]["private"] is True
    remote = hub.repo(repo)
    # A new repo starts with the Hub's default .gitattributes; everything else is the workspace, byte for byte.
    assert {n: remote.read(n) for n in remote.files() if n != ".gitattributes"} == _files(ws)
    assert remote.history()[0].title == "first upload"
    assert job_row(job["id"])["result"]["repo_id"] == repo


def _copy_model(model, dest: Path) -> Path:
    for name in model.files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(model.read(name))
    return dest


def test_push_dry_run_prints_the_plan_and_says_would_push(hub, worker, tiny_model, tmp_path, monkeypatch):
    hub.add_token("hf_writer", user="alice")
    monkeypatch.setenv("HF_TOKEN", "hf_writer")
    ws = _copy_model(tiny_model, tmp_path / "ws")
    repo = hub.unique_repo("alice/planned")

    result = run("push", str(ws), repo, "--private", "--dry-run")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ACTION", "PATH", "SIZE"]
    assert sorted(line.split()[2] for line in lines[1:]) == sorted(tiny_model.files)
    assert all(line.startswith("would upload") for line in lines[1:])
    assert f"Dry run: would push {len(tiny_model.files)} file(s)" in result.stderr
    assert f"to a new private repo {repo}; nothing was uploaded." in result.stderr
    assert "Pushed" not in result.output
    with pytest.raises(KeyError):
        hub.repo(repo)


def test_push_refuses_what_check_only_rejects_unless_forced(tiny_model, tmp_path, reap_workers, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # the forced job below must never reach a real Hub
    ws = _copy_model(tiny_model, tmp_path / "ws")
    weights = ws / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])   # truncated, as a killed copy leaves it

    check, check_doc = run_json("push", str(ws), "org/target", "--check-only")
    refused, doc = run_json("push", str(ws), "org/target", "--private")

    assert check.exit_code == 1 and refused.exit_code == 1
    assert doc["error"]["code"] == "workspace_invalid" and "--force" in doc["error"]["message"]
    assert doc["error"]["findings"][0]["rule"] == check_doc["data"]["findings"][0]["rule"]
    from mlxk.db import jobs as jobs_db

    with state_db() as conn:
        assert jobs_db.list_jobs(conn) == []        # refused before anything was queued
    forced, doc = run_json("push", str(ws), "org/target", "--private", "--force")
    assert forced.exit_code == 0 and doc["data"]["args"]["force"] is True


def test_clone_of_an_unhealthy_cached_model_says_what_is_wrong(hub, worker, hf_cache, tmp_path):
    from tests import factory

    repo = "mlx-community/tiny-broken"
    factory.make_variant(hf_cache, "shard_empty", repo_id=repo)    # cached, not on the Hub
    assert run_json("health", repo)[1]["data"]["summary"]["unhealthy_count"] == 1

    result, doc = run_json("clone", repo, str(tmp_path / "ws"), "--wait")

    assert result.exit_code == 1
    error = doc["error"]
    assert error["code"] == "cache_error" and error["reason"]
    assert f"{repo} is cached but unhealthy: {error['reason']}" in error["message"]
    assert f"`mlxk health {repo}`" in error["message"]
    assert "the Hub could not replace it (repo_not_found)" in error["message"]
    assert "was not found" not in error["message"] and "token" not in error["message"].lower()
    assert error["pull_error"]["type"] == "repo_not_found"   # what the Hub said stays available, not the headline


def test_clone_with_an_ambiguous_hash_prefix_lists_the_matches_offline(model_factory, tmp_path):
    """Issue 11: the prefix went to the network instead of listing the cached matches (one resolver now)."""
    from tests.factory import ModelSpec

    model_factory.repo("org/twice", revision="abc1" + "0" * 36, ref=None)
    model_factory.repo("org/twice", ModelSpec(seed=7), revision="abc2" + "0" * 36)
    result, doc = run_json("clone", "org/twice@abc", str(tmp_path / "ws"))
    assert result.exit_code == 1 and doc["error"]["code"] == "ambiguous_match"
    assert sorted(doc["error"]["matches"]) == ["abc1" + "0" * 36, "abc2" + "0" * 36]
    assert not (tmp_path / "ws").exists()
