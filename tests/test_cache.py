"""mlxk.cache against hand-built layouts (the factory builds full models; these pin the layout rules)."""
import os
import time

import pytest

from mlxk import cache
from mlxk.errors import CacheError

SHA1 = "a" * 40
SHA2 = "b" * 40


def _repo(tmp_path, repo_id="org/model", revisions=((SHA1, {"config.json": b"{}", "w.bin": b"1234"}),), ref=SHA1):
    path = tmp_path / cache.repo_folder_name(repo_id)
    for revision, files in revisions:
        for name, data in files.items():
            blob = path / "blobs" / f"{name}-{len(data)}-{data[:4].hex()}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = path / "snapshots" / revision / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        time.sleep(0.01)  # distinct snapshot mtimes: newest-first ordering
    if ref:
        (path / "refs").mkdir(parents=True, exist_ok=True)
        (path / "refs" / "main").write_text(ref)
    return path


def test_folder_names_round_trip():
    assert cache.repo_folder_name("mlx-community/Qwen3-4B") == "models--mlx-community--Qwen3-4B"
    assert cache.repo_id_from_folder("models--mlx-community--Qwen3-4B") == "mlx-community/Qwen3-4B"
    assert cache.repo_id_from_folder("datasets--x--y") is None


def test_missing_cache_is_empty(tmp_path):
    assert list(cache.iter_repo_dirs(tmp_path / "nope")) == []


def test_unreadable_cache_is_a_clear_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(CacheError, match="HF_HUB_CACHE"):
        list(cache.iter_repo_dirs(not_a_dir))


def test_current_revision_prefers_refs_main_then_newest(tmp_path):
    path = _repo(tmp_path, revisions=((SHA1, {"a": b"1"}), (SHA2, {"a": b"2"})), ref=SHA1)
    assert cache.current_revision(path) == SHA1
    (path / "refs" / "main").unlink()
    assert cache.current_revision(path) == SHA2  # newest snapshot
    (path / "refs" / "main").write_text("c" * 40)  # names a snapshot that is not there
    assert cache.current_revision(path) == SHA2


def test_shared_blobs_are_counted_once_and_partials_apart(tmp_path):
    files = {"config.json": b"{}", "w.bin": b"x" * 1000}
    path = _repo(tmp_path, revisions=((SHA1, files), (SHA2, files)))
    (path / "blobs" / "deadbeef.incomplete").write_bytes(b"y" * 300)
    usage = cache.disk_usage(path)
    assert usage.size_bytes == 1002
    assert usage.incomplete_bytes == 300
    assert [p.name for p in cache.incomplete_blobs(path)] == ["deadbeef.incomplete"]


def test_dangling_links_are_reported_not_raised(tmp_path):
    path = _repo(tmp_path)
    for blob in (path / "blobs").iterdir():
        if blob.name.startswith("w.bin"):
            blob.unlink()
    files = {f.name: f for f in cache.snapshot_files(path / "snapshots" / SHA1)}
    assert files["w.bin"].target is None and files["w.bin"].size is None
    assert files["config.json"].size == 2


def test_fingerprint_changes_when_files_land_or_leave(tmp_path):
    path = _repo(tmp_path)
    before = cache.fingerprint(path, SHA1)
    assert cache.fingerprint(path, SHA1) == before
    time.sleep(0.01)
    (path / "blobs" / "new").write_bytes(b"z")
    after_blob = cache.fingerprint(path, SHA1)
    assert after_blob != before
    time.sleep(0.01)
    (path / "snapshots" / SHA1 / "config.json").unlink()
    assert cache.fingerprint(path, SHA1) != after_blob


def test_remove_one_revision_keeps_shared_blobs(tmp_path):
    shared = {"config.json": b"{}"}
    path = _repo(tmp_path, revisions=((SHA1, {**shared, "w.bin": b"old!"}), (SHA2, {**shared, "w.bin": b"new!!"})),
                 ref=SHA2)
    plan = cache.plan_remove(tmp_path, "org/model", SHA1)
    assert not plan.whole_repo and plan.bytes_freed == 4
    cache.apply_remove(tmp_path, plan)
    assert cache.list_revisions(path) == [SHA2]
    assert all(f.target for f in cache.snapshot_files(path / "snapshots" / SHA2))
    assert (path / "refs" / "main").read_text() == SHA2


def test_remove_whole_repo_and_locks(tmp_path):
    path = _repo(tmp_path)
    locks = tmp_path / ".locks" / path.name
    locks.mkdir(parents=True)
    plan = cache.plan_remove(tmp_path, "org/model")
    assert plan.whole_repo
    cache.apply_remove(tmp_path, plan)
    assert not path.exists() and not locks.exists()


def test_disk_usage_counts_regular_files_in_nested_folders_and_never_follows_links(tmp_path):
    """Sizes by directory-entry type: a regular file copied into a snapshot (nested or not) counts, links (to files,
    to folders, dangling) neither count nor lead anywhere."""
    files = {"config.json": b"{}", "w.bin": b"x" * 1000}
    path = _repo(tmp_path, revisions=((SHA1, files),))
    snapshot = path / "snapshots" / SHA1
    (snapshot / "sub" / "deeper").mkdir(parents=True)
    (snapshot / "sub" / "deeper" / "copied.txt").write_bytes(b"z" * 50)
    (snapshot / "plain.txt").write_bytes(b"p" * 7)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"o" * 5000)
    (snapshot / "linked-folder").symlink_to(outside)
    (snapshot / "dangling").symlink_to(tmp_path / "nowhere")
    assert cache.disk_usage(path).size_bytes == 1002 + 50 + 7
