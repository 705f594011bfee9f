"""`mlxk show` (name resolution, --files, --config) and `mlxk health` (checks now, writes the index, exit codes)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlxk import db
from mlxk.db import models as queries
from mlxk.cli import cli
from tests import factory


def mlxk(*args):
    return CliRunner(catch_exceptions=False).invoke(cli, list(args))


def document(*args, code=0) -> dict:
    result = mlxk(*args, "--json")
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


# ---------------------------------------------------------------- show: names


def test_show_exact_fuzzy_and_case_insensitive(model_factory):
    repo = model_factory.repo("mlx-community/Tiny-Chat-4bit", quantize=True)
    model_factory.repo("mlx-community/other-base", chat_template=False)
    for name in ("mlx-community/Tiny-Chat-4bit", "mlx-community/tiny-chat-4bit", "tiny-chat", "CHAT-4"):
        data = document("show", name)["data"]
        assert data["model"]["name"] == repo.repo_id, name
        assert data["revision"] == repo.revision
    text = mlxk("show", "tiny-chat").stdout
    assert "Name:         mlx-community/Tiny-Chat-4bit" in text
    assert "Quantization: 4bit" in text and "Runtime:      pending" in text


def test_show_at_hash_picks_a_cached_revision(model_factory):
    first = model_factory.repo("mlx-community/tiny-chat")
    second = factory.add_revision(first, {"notes.txt": b"second commit"})
    data = document("show", f"tiny-chat@{first.revision[:7]}", "--files")["data"]
    # NAME@HASH describes that revision (mlx-knife's API): its hash, its files' bytes
    assert data["revision"] == first.revision and data["model"]["hash"] == first.revision
    assert data["model"]["size_bytes"] == sum(f["size_bytes"] for f in data["files"])
    assert "notes.txt" not in {f["name"] for f in data["files"]}
    data = document("show", f"tiny-chat@{second.revision[:7]}", "--files")["data"]
    assert "notes.txt" in {f["name"] for f in data["files"]}
    assert document("show", "tiny-chat@main")["data"]["revision"] == second.revision
    missing = document("show", "tiny-chat@abcdef0", code=1)
    assert missing["error"]["code"] == "model_not_found" and "not cached" in missing["error"]["message"]


def test_show_ambiguous_lists_the_matches(model_factory):
    model_factory.repo("mlx-community/qwen-a")
    model_factory.repo("mlx-community/qwen-b")
    error = document("show", "qwen", code=1)["error"]
    assert error["code"] == "ambiguous_match"
    assert error["matches"] == ["mlx-community/qwen-a", "mlx-community/qwen-b"]
    text = mlxk("show", "qwen")
    assert text.exit_code == 1 and "mlx-community/qwen-a, mlx-community/qwen-b" in text.stderr


def test_show_unknown_suggests_pull(model_factory):
    model_factory.repo("mlx-community/tiny-chat")
    error = document("show", "mlx-community/tiny-chatt", code=1)["error"]
    assert error["code"] == "model_not_found"
    assert "mlxk pull mlx-community/tiny-chatt" in error["message"]
    assert "Did you mean: mlx-community/tiny-chat" in error["message"]


BAD_NAMES = ["a//b", "org/name/extra", "o/" + "x" * 95, "bad\x00name", "bad\nname", ".x", "x-/y"]


@pytest.mark.parametrize("command", ["show", "health"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_before_anything_is_touched(command, name, model_factory, isolated):
    repo = model_factory.repo("mlx-community/tiny-chat")
    before = sorted(p.name for p in repo.repo_dir.rglob("*"))
    error = document(command, name, code=1)["error"]
    assert error["code"] == "invalid_name" and "invalid model name" in error["message"]
    assert not isolated.exists()
    assert sorted(p.name for p in repo.repo_dir.rglob("*")) == before


@pytest.mark.parametrize("command", ["show", "health"])
@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "./nowhere", "/", "/etc"])
def test_path_names_are_workspace_paths_read_only_outside_the_cache(command, name, model_factory, isolated):
    """mlx-knife's API takes workspace paths where a model name goes: a path is never a cache name (nothing in the
    cache is touched, no index opened); one that is not a model folder is not found, naming the path."""
    repo = model_factory.repo("mlx-community/tiny-chat")
    before = sorted(p.name for p in repo.repo_dir.rglob("*"))
    error = document(command, name, code=1)["error"]
    assert error["code"] == "model_not_found" and f"workspace {name!r} is not a " in error["message"]
    assert not isolated.exists()
    assert sorted(p.name for p in repo.repo_dir.rglob("*")) == before


def test_show_on_a_missing_cache_is_not_found(hf_cache):
    hf_cache.rmdir()
    error = document("show", "tiny-chat", code=1)["error"]
    assert error["code"] == "model_not_found"


# ---------------------------------------------------------------- show: files and config


def test_show_files_tells_lfs_from_regular_and_broken_links(hf_cache):
    repo = factory.make_variant(hf_cache, "dangling_symlink")
    files = {f["name"]: f for f in document("show", repo.repo_id, "--files")["data"]["files"]}
    assert files["model.safetensors"]["lfs"] is True and files["model.safetensors"]["link_ok"] is True
    assert files["model.safetensors"]["size_bytes"] == repo.files["model.safetensors"].size
    assert files["config.json"]["lfs"] is False and files["config.json"]["link_ok"] is True
    assert files["generation_config.json"]["link_ok"] is False
    text = mlxk("show", repo.repo_id, "--files").stdout
    assert "FILE" in text and "STORAGE" in text
    line = next(line for line in text.splitlines() if line.startswith("generation_config.json"))
    assert line.split()[-1] == "BROKEN"


def test_show_config(model_factory):
    repo = model_factory.repo("mlx-community/tiny-chat")
    config = json.loads(repo.read("config.json"))
    assert document("show", "tiny-chat", "--config")["data"]["config"] == config
    assert '"model_type": "llama"' in mlxk("show", "tiny-chat", "--config").stdout


def test_show_config_of_a_broken_repo_says_why(hf_cache):
    factory.make_variant(hf_cache, "config_invalid_json")
    data = document("show", "tiny-config-invalid-json", "--config")["data"]
    assert data["config"] is None and "not valid JSON" in data["config_error"]
    assert data["model"]["health"] == "unhealthy"


# ---------------------------------------------------------------- health


def test_health_all_checks_writes_and_summarises(hf_cache, isolated):
    for name in ("healthy_chat", "unsupported_model_type", "gguf", "config_missing", "shard_empty"):
        factory.make_variant(hf_cache, name)
    result = mlxk("health", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)["data"]
    assert data["summary"] == {"total": 5, "healthy_count": 3, "unhealthy_count": 2,  # mlx-knife's: files only
                               "healthy": 1, "unhealthy": 2, "not_runnable": 2, "pending": 0}
    assert sorted(entry["name"] for entry in data["unhealthy"]) == [
        "mlx-community/tiny-config-missing", "mlx-community/tiny-shard-empty"]
    assert {entry["status"] for entry in data["healthy"]} == {"healthy"}
    by_name = {m["name"]: m for m in data["models"]}
    assert by_name["mlx-community/tiny-unsupported-model-type"]["runtime_compatible"] is False
    assert "notamodel" in by_name["mlx-community/tiny-unsupported-model-type"]["reason"]
    # the verdicts are in state.db: list shows nothing pending any more
    conn = db.connect(isolated / "state.db")
    assert queries.pending_runtime(conn) == []
    assert queries.get_model(conn, "mlx-community/tiny-healthy-chat")["runtime_checked_at"]
    conn.close()
    text = mlxk("health").stdout
    assert text.splitlines()[0].split() == ["NAME", "HEALTH", "RUNTIME", "REASON"]
    assert text.strip().splitlines()[-1] == "1 healthy, 2 unhealthy, 2 not runnable."


def test_health_named_unhealthy_is_a_finding_exit_0_with_the_reason(hf_cache):
    """mlx-knife's API: `health NAME` succeeds and lists the model under `unhealthy` (it was an error, exit 1)."""
    factory.make_variant(hf_cache, "shard_empty")
    factory.make_variant(hf_cache, "healthy_chat")
    doc = document("health", "shard-empty")
    assert doc["status"] == "success" and doc["error"] is None and doc["data"]["healthy"] == []
    (entry,) = doc["data"]["unhealthy"]
    assert entry["name"] == "mlx-community/tiny-shard-empty" and "is empty (0 bytes)" in entry["reason"]
    assert [m["name"] for m in doc["data"]["models"]] == ["mlx-community/tiny-shard-empty"]
    text = mlxk("health", "shard-empty")
    assert text.exit_code == 0 and "unhealthy" in text.stdout and "is empty (0 bytes)" in text.stdout


def test_health_named_healthy_and_not_runnable_exit_0(hf_cache):
    factory.make_variant(hf_cache, "healthy_chat")
    factory.make_variant(hf_cache, "unsupported_model_type")
    ok = document("health", "tiny-healthy-chat")
    assert ok["data"]["summary"]["healthy"] == 1 and ok["data"]["models"][0]["runtime_compatible"] is True
    odd = document("health", "unsupported")
    assert odd["data"]["summary"]["not_runnable"] == 1


def test_health_unknown_and_empty(hf_cache):
    assert document("health")["data"]["summary"]["total"] == 0
    assert mlxk("health").stdout.strip() == "No models in the cache."


def test_health_of_a_name_nothing_matches_is_an_empty_report_that_says_so(model_factory):
    """mlx-knife 2.0.8 (a health NAME is a pattern): success, exit 0, nothing in healthy/unhealthy, total 0; mlxk
    adds what was not found and the close names, so a typo does not read as "nothing unhealthy"."""
    model_factory.repo("mlx-community/tiny-chat")
    doc = document("health", "tiny-caht")
    assert (doc["status"], doc["error"], doc["data"]["healthy"], doc["data"]["unhealthy"]) == ("success", None, [], [])
    assert doc["data"]["summary"]["total"] == doc["data"]["summary"]["unhealthy_count"] == 0
    assert doc["data"]["suggestions"] == ["mlx-community/tiny-chat"]
    assert doc["data"]["message"].startswith("no cached model matches 'tiny-caht'")
    result = mlxk("health", "tiny-caht")
    assert result.exit_code == 0 and result.stdout.startswith("No cached model matches 'tiny-caht'. Did you mean")
    # a revision that is not cached is still an error: the repo is there, the hash is wrong
    assert document("health", "tiny-chat@ffffff", code=1)["error"]["code"] == "model_not_found"


def test_health_rechecks_a_repo_that_broke_since_it_was_indexed(model_factory):
    repo = model_factory.repo("mlx-community/tiny-chat")
    assert document("health", "tiny-chat")["data"]["summary"]["healthy"] == 1
    # Damaged in place (same size, same mtime on the folders): only a forced re-inspection notices.
    blob = repo.blob_path("config.json")
    blob.write_bytes(b"{" + b" " * (blob.stat().st_size - 1))
    doc = document("health", "tiny-chat")
    assert "contains invalid JSON" in doc["data"]["unhealthy"][0]["reason"]


def test_show_a_mistyped_short_name_suggests_the_model(model_factory):
    model_factory.repo("mlx-community/Qwen3-0.6B-4bit")
    error = document("show", "quen", code=1)["error"]
    assert error["code"] == "model_not_found" and error["suggestions"] == ["mlx-community/Qwen3-0.6B-4bit"]
    assert "Did you mean: mlx-community/Qwen3-0.6B-4bit?" in mlxk("show", "quen").stderr
