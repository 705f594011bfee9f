"""`mlxk rm` on real cache layouts: exact names, fuzzy names that need --force, one revision (@hash) with only its
own blobs, refusal while a job holds the model, --dry-run touching nothing, the index row and lock files removed,
and every removal recorded as a job in the history."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures.cli import run, run_json
from tests.fixtures.jobs import job_row, state_db


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def indexed(model_factory):
    """A healthy model in the cache and in the index."""
    repo = model_factory.repo("mlx-community/Tiny-Chat-4bit")
    from mlxk.workers.tasks import _refresh_index

    _refresh_index({repo.repo_id}, runtime=False)
    return repo


def test_rm_exact_name_removes_repo_index_row_and_locks_and_records_a_job(indexed, hf_cache):
    lock_dir = hf_cache / ".locks" / indexed.repo_dir.name
    lock_dir.mkdir(parents=True)
    (lock_dir / "x.lock").write_text("")

    result, doc = run_json("rm", indexed.repo_id)

    assert result.exit_code == 0, result.output
    job = doc["data"]
    assert job["kind"] == "rm" and job["state"] == "succeeded" and job["target"] == indexed.repo_id
    assert job["result"]["whole_repo"] is True and job["result"]["bytes_freed"] >= indexed.size_bytes
    assert job["result"]["paths"] == [indexed.repo_dir.name]   # QA F3: relative to the HF cache, no cache paths
    assert not indexed.repo_dir.exists() and not lock_dir.exists()
    from mlxk.db import models as models_db

    with state_db() as conn:
        assert models_db.get_model(conn, indexed.repo_id) is None
    assert job_row(job["id"])["state"] == "succeeded"
    assert any(j["id"] == job["id"] for j in json.loads(run("jobs", "--json").stdout)["data"])


def test_fuzzy_name_needs_force_and_names_the_match(indexed):
    """mlx-knife's API: a fuzzy name without --force is `requires_confirmation` (success, exit 0), nothing removed."""
    result, doc = run_json("rm", "tiny-chat")

    assert result.exit_code == 0 and doc["status"] == "success"
    assert doc["data"]["action"] == "requires_confirmation" and doc["data"]["model"] == indexed.repo_id
    assert "--force" in doc["data"]["message"] and "Nothing was removed" in doc["data"]["message"]
    assert indexed.repo_dir.exists()

    forced = run("rm", "tiny-chat", "--force")
    assert forced.exit_code == 0, forced.output
    assert indexed.repo_id in forced.stderr and not indexed.repo_dir.exists()


def test_ambiguous_and_unknown_names(model_factory):
    model_factory.repo("org/alpha-one")
    model_factory.repo("org/alpha-two")
    result, doc = run_json("rm", "alpha", "--force")
    assert result.exit_code == 1 and doc["error"]["code"] == "ambiguous_match"
    assert doc["data"]["matches"] == ["org/alpha-one", "org/alpha-two"]  # in data, as mlx-knife's API has them
    result, doc = run_json("rm", "org/nothing-like-it")
    assert result.exit_code == 1 and doc["error"]["code"] == "model_not_found"


def test_rm_at_hash_removes_only_that_revision_and_its_own_blobs(model_factory):
    from tests.factory import ModelSpec

    old = model_factory.repo("org/two-revs", revision="a" * 40, ref=None)
    new = model_factory.repo("org/two-revs", ModelSpec(seed=7), revision="b" * 40)
    shared = {n for n in old.files if old.files[n].etag == new.files[n].etag}
    own = {n for n in old.files if n not in shared}
    assert shared and own

    result, doc = run_json("rm", "org/two-revs@aaaaaaa")

    assert result.exit_code == 0, result.output
    assert doc["data"]["result"]["whole_repo"] is False and doc["data"]["result"]["revisions"] == ["a" * 40]
    assert doc["data"]["action"] == "deleted" and doc["data"]["model"] == "org/two-revs@" + "a" * 40
    assert "settings" not in doc["data"]   # no cache paths in rm's document
    # QA F3: what went, relative to the HF cache: that snapshot and its own blobs, not the whole repo folder
    folder = old.repo_dir.name
    assert sorted(doc["data"]["result"]["paths"]) == sorted(
        {f"{folder}/snapshots/{'a' * 40}"} | {f"{folder}/blobs/{old.blob_path(n).name}" for n in own})
    assert not old.snapshot_dir.exists() and new.snapshot_dir.is_dir()
    for name in own:
        assert not old.blob_path(name).exists()
    for name in shared:
        assert new.blob_path(name).exists()
    assert (new.snapshot_dir / "config.json").read_bytes()


def test_rm_is_refused_while_a_job_holds_the_model(indexed):
    from mlxk.db import jobs as jobs_db

    with state_db() as conn:
        jobs_db.create_job(conn, id="feedbeef0001", kind="pull", target=indexed.repo_id, args={},
                           task_id="feedbeef0001")

    result, doc = run_json("rm", indexed.repo_id)

    assert result.exit_code == 1 and doc["error"]["code"] == "conflict"
    assert "feedbeef0001" in doc["error"]["message"] and "mlxk jobs cancel feedbeef0001" in doc["error"]["message"]
    assert indexed.repo_dir.exists()


def test_dry_run_prints_the_plan_and_touches_nothing(indexed, hf_cache):
    before = _tree(hf_cache)
    home = Path(os.environ["MLXK_HOME"])

    result = run("rm", indexed.repo_id, "--dry-run")
    result_json, doc = run_json("rm", indexed.repo_id, "--dry-run")

    assert result.exit_code == 0 and "Would remove " + indexed.repo_id in result.stdout
    assert str(indexed.repo_dir) in result.stdout
    assert doc["data"]["dry_run"] is True and doc["data"]["bytes_freed"] >= indexed.size_bytes
    assert doc["data"]["action"] == "would_delete" and doc["data"]["paths"] == [indexed.repo_dir.name]
    assert _tree(hf_cache) == before
    from mlxk.db import jobs as jobs_db

    with state_db() as conn:
        assert jobs_db.list_jobs(conn) == []
    assert not (home / "queue.db").exists()


def test_rm_at_hash_of_the_revision_refs_point_at_drops_those_refs_and_the_other_revision_becomes_current(
        model_factory):
    from tests.factory import ModelSpec

    kept = model_factory.repo("org/ref-target", ModelSpec(seed=7), revision="b" * 40, ref=None)
    removed = model_factory.repo("org/ref-target", revision="a" * 40, ref="main")
    refs = removed.repo_dir / "refs"
    (refs / "v1").write_text("a" * 40)          # a tag on the removed revision
    (refs / "stable").write_text("b" * 40)      # a ref on the kept one
    before = {m["name"]: m for m in run_json("list", "--all")[1]["data"]["models"]}
    assert before["org/ref-target"]["hash"] == "a" * 40   # refs/main names the revision about to go

    result, doc = run_json("rm", "org/ref-target@aaaaaaa")

    assert result.exit_code == 0, result.output
    assert doc["data"]["result"]["revisions"] == ["a" * 40] and doc["data"]["result"]["whole_repo"] is False
    assert not removed.snapshot_dir.exists() and kept.snapshot_dir.is_dir()
    # As huggingface_hub's delete_revisions does: refs naming the removed revision go, others stay untouched.
    assert not (refs / "main").exists() and not (refs / "v1").exists()
    assert (refs / "stable").read_text() == "b" * 40
    listed = {m["name"]: m for m in run_json("list", "--all")[1]["data"]["models"]}
    assert listed["org/ref-target"]["hash"] == "b" * 40
    assert not list(model_factory.cache_dir.glob(".trash-*"))


def test_dry_run_says_what_rm_would_do_refusals_and_fuzzy_names_included(indexed):
    """Issue 11: `--dry-run` promised a removal that rm then refused (a pull running), and refused a fuzzy name."""
    result, doc = run_json("rm", "tiny-chat", "--dry-run")
    assert result.exit_code == 0 and doc["data"]["action"] == "requires_confirmation"
    assert doc["data"]["model"] == indexed.repo_id and doc["data"]["bytes_freed"] >= indexed.size_bytes
    from mlxk.db import jobs as jobs_db

    with state_db() as conn:
        jobs_db.create_job(conn, id="feedbeef0002", kind="pull", target=indexed.repo_id, args={},
                           task_id="feedbeef0002")
    result, doc = run_json("rm", indexed.repo_id, "--dry-run")
    assert result.exit_code == 0 and doc["data"]["action"] == "would_refuse"
    assert "feedbeef0002" in doc["data"]["message"]
    text = run("rm", indexed.repo_id, "--dry-run")
    assert "in use by job feedbeef0002" in text.stdout and "Would remove" not in text.stdout
    result, doc = run_json("rm", indexed.repo_id)
    assert result.exit_code == 1 and doc["error"]["code"] == "conflict" and indexed.repo_dir.exists()


def test_rm_takes_branches_and_tags_like_show(model_factory):
    """Issue 11: `rm NAME@main` was refused where `show` and `run` accept branches and tags (one resolver now)."""
    repo = model_factory.repo("org/branchy")
    shown = json.loads(run("show", "org/branchy@main", "--json").stdout)["data"]
    result, doc = run_json("rm", "org/branchy@main", "--dry-run")
    assert result.exit_code == 0, result.output
    assert doc["data"]["revisions"] == [shown["revision"]] == [repo.revision]
    assert doc["data"]["model"] == f"org/branchy@{repo.revision}"
    result, doc = run_json("rm", "org/branchy@no-such-branch")
    assert result.exit_code == 1 and doc["error"]["code"] == "model_not_found"
    text = run("rm", "org/branchy@main")
    assert text.exit_code == 0 and f"org/branchy@{repo.revision[:12]}" in text.stderr


# ---------------------------------------------------------------- aliases (Ollama's /api/copy)


@pytest.fixture
def aliased(model_factory, indexed):
    """Two cached models, and the alias `pullme` on the first, made before the second (mlx-community/pullme) was
    pulled: an rm that ignored aliases picks mlx-community/pullme by its short name (QA's reproduction)."""
    from mlxk import index, names
    from mlxk.workers.tasks import _refresh_index

    with state_db() as conn:
        index.add_alias(conn, names.parse(indexed.repo_id), "pullme")
    other = model_factory.repo("mlx-community/pullme")
    _refresh_index({other.repo_id}, runtime=False)
    return indexed, other


def test_rm_of_an_alias_removes_the_alias_only(aliased):
    target, other = aliased
    shown = run_json("show", "pullme")[1]
    assert shown["data"]["model"]["name"] == target.repo_id   # what the name means everywhere

    plan = run_json("rm", "pullme", "--dry-run")[1]["data"]
    assert plan["action"] == "would_remove_alias" and plan["repo_id"] == target.repo_id and plan["paths"] == []
    assert "alias" in plan["message"] and f"{target.repo_id} stays cached" in plan["message"]

    result, doc = run_json("rm", "PULLME:latest", "--force")
    assert result.exit_code == 0, result.output
    data = doc["data"]
    assert data["action"] == "alias_removed" and data["alias"] == "pullme" and data["repo_id"] == target.repo_id
    assert target.repo_dir.exists() and other.repo_dir.exists()   # no model was deleted
    from mlxk.db import models as models_db

    with state_db() as conn:
        assert models_db.aliases(conn) == {}
    text = run("rm", "pullme")   # now an ordinary name again: the short name asks for --force
    assert "mlx-community/pullme" in text.stdout and other.repo_dir.exists()


def test_an_alias_is_an_exact_name_for_pull_and_with_a_revision_needs_force(aliased):
    from mlxk import jobs

    target, _other = aliased
    assert jobs.pull_name("pullme") == (target.repo_id, target.repo_id)
    hashes = [p.name for p in (target.repo_dir / "snapshots").iterdir()]
    removal = jobs.resolve_removal(f"pullme@{hashes[0][:8]}")
    assert removal.alias is None and removal.repo_id == target.repo_id and removal.fuzzy
    refused = run_json("rm", f"pullme@{hashes[0][:8]}")[1]["data"]
    assert refused["action"] == "requires_confirmation" and target.repo_dir.exists()
