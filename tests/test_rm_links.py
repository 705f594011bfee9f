"""`mlxk rm` removes everything the model owns and nothing else: a snapshot link (or a whole repo folder) that points
outside the repo is removed as a link, never followed, so no file outside the cache is ever deleted."""
from __future__ import annotations

import os
from pathlib import Path

from tests.factory import ModelSpec
from tests.fixtures.cli import run, run_json

PRECIOUS = b"not the cache's to delete\n"


def _precious(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(PRECIOUS)
    return victim


def test_rm_of_one_revision_never_deletes_what_a_link_points_at_outside(model_factory, tmp_path):
    victim = _precious(tmp_path)
    old = model_factory.repo("org/linked", revision="a" * 40, ref=None)
    new = model_factory.repo("org/linked", ModelSpec(seed=7), revision="b" * 40)
    (old.snapshot_dir / "notes.txt").symlink_to(os.path.relpath(victim, old.snapshot_dir))   # a hostile link
    (old.snapshot_dir / "abs.txt").symlink_to(victim)
    tree = old.repo_dir / "trees" / f"{old.revision}.json"
    tree.parent.mkdir(exist_ok=True)
    tree.write_text("{}")
    staged = old.repo_dir / ".staging" / f"{old.revision}.999999999"   # a killed pull of it
    staged.mkdir(parents=True)

    result, doc = run_json("rm", "org/linked@aaaaaaa")

    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == PRECIOUS
    assert str(victim) not in doc["data"]["result"]["paths"]
    assert not old.snapshot_dir.exists() and not tree.exists() and not staged.exists()
    assert new.snapshot_dir.is_dir() and (new.snapshot_dir / "config.json").read_bytes()


def test_rm_of_a_repo_with_links_out_removes_the_repo_and_only_it(model_factory, tmp_path, hf_cache):
    victim = _precious(tmp_path)
    outside_dir = tmp_path / "elsewhere"
    outside_dir.mkdir()
    (outside_dir / "keep.txt").write_bytes(PRECIOUS)
    repo = model_factory.repo("org/links-out")
    (repo.snapshot_dir / "notes.txt").symlink_to(victim)
    (repo.snapshot_dir / "folder").symlink_to(outside_dir, target_is_directory=True)
    (repo.repo_dir / "blobs" / "stray").symlink_to(victim)

    result, doc = run_json("rm", "org/links-out")

    assert result.exit_code == 0, result.output
    assert not repo.repo_dir.exists() and not (hf_cache / ".locks" / repo.repo_dir.name).exists()
    assert victim.read_bytes() == PRECIOUS and (outside_dir / "keep.txt").read_bytes() == PRECIOUS


def test_rm_of_a_repo_folder_that_is_a_link_to_something_else_unlinks_it_and_keeps_its_target(
        model_factory, tmp_path, hf_cache):
    """A repo folder linked to a folder that is no repo (no snapshots/): rm removes the link only."""
    repo = model_factory.repo("org/moved")
    moved = tmp_path / "other-disk" / repo.repo_dir.name
    moved.parent.mkdir()
    os.rename(repo.repo_dir, moved)
    repo.repo_dir.symlink_to(moved, target_is_directory=True)
    os.rename(moved / "snapshots", moved / "kept")
    before = sorted(p.relative_to(moved) for p in moved.rglob("*"))

    result, doc = run_json("rm", "org/moved")

    assert result.exit_code == 0, result.output
    assert not repo.repo_dir.is_symlink() and not repo.repo_dir.exists()
    assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == before


def test_rm_of_a_repo_moved_to_another_disk_removes_its_files_there_and_the_link(model_factory, tmp_path, hf_cache):
    """Issue 11: `rm` of a repo folder that is a link to another disk raised `OSError: Cannot call rmtree on a
    symbolic link` after `--dry-run` promised the bytes; now the files go where they are, and the link."""
    repo = model_factory.repo("org/moved")
    moved = tmp_path / "other-disk" / repo.repo_dir.name
    moved.parent.mkdir()
    os.rename(repo.repo_dir, moved)
    repo.repo_dir.symlink_to(moved, target_is_directory=True)

    _, plan = run_json("rm", "org/moved", "--dry-run")
    assert plan["data"]["action"] == "would_delete" and plan["data"]["bytes_freed"] >= repo.size_bytes
    text = run("rm", "org/moved", "--dry-run").stdout
    assert str(moved) in text and moved.is_dir()

    result, doc = run_json("rm", "org/moved")

    assert result.exit_code == 0, result.output
    assert doc["data"]["action"] == "deleted" and doc["data"]["result"]["bytes_freed"] == plan["data"]["bytes_freed"]
    assert not os.path.lexists(repo.repo_dir) and not moved.exists() and moved.parent.is_dir()
    assert not any(p.name.startswith(".trash-") for p in hf_cache.iterdir())
