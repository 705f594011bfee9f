"""mlxk.clone: a cached snapshot becomes a flat workspace of real files, never clobbering anything."""
from __future__ import annotations

import errno
import os

import pytest

from mlxk import clone as clonemod
from mlxk import errors, health


def _tree(root):
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_clone_copies_real_files_with_equal_bytes_and_is_healthy(tiny_model, tmp_path):
    dest = tmp_path / "work" / "tiny"
    seen = []
    result = clonemod.clone(tiny_model.snapshot_dir, dest, progress=seen.append)

    source, copied = _tree(tiny_model.snapshot_dir), _tree(dest)
    assert sorted(copied) == sorted(source)
    for name, path in copied.items():
        assert not path.is_symlink()
        assert path.read_bytes() == source[name].read_bytes()
    assert result.files == len(source) and result.bytes == sum(p.stat().st_size for p in copied.values())
    assert result.method in ("reflink", "copy", "clonefile") and result.dest == dest
    assert seen[-1].files_done == seen[-1].files_total == result.files
    assert health.check_integrity(health.inspect_dir(dest, "tiny")) == []

    # Editing the workspace must not reach the cache's blobs.
    (dest / "config.json").write_text("{}")
    assert (tiny_model.snapshot_dir / "config.json").read_text() != "{}"


def test_clone_into_an_empty_existing_folder(tiny_model, tmp_path):
    dest = tmp_path / "empty"
    dest.mkdir()
    assert clonemod.clone(tiny_model.snapshot_dir, dest).files > 0


def test_clone_refuses_a_non_empty_destination_and_touches_nothing(tiny_model, tmp_path):
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "config.json").write_text("mine")
    with pytest.raises(errors.Conflict, match="not empty"):
        clonemod.clone(tiny_model.snapshot_dir, dest)
    assert [p.name for p in dest.iterdir()] == ["config.json"] and (dest / "config.json").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(errors.Conflict, match="not a folder"):
        clonemod.clone(tiny_model.snapshot_dir, afile)


def test_copy_file_never_overwrites(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises((FileExistsError, errors.Conflict)):
        clonemod.copy_file(src, dst)
    assert dst.read_bytes() == b"old"


def test_plain_copy_fallback_when_reflink_is_not_supported(tiny_model, tmp_path, monkeypatch):
    """The seam: the FICLONE ioctl answers EOPNOTSUPP, as on ext4/tmpfs; the copy path must still be exact."""
    import fcntl

    def no_reflink(fd, request, arg):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(fcntl, "ioctl", no_reflink)
    dest = tmp_path / "plain"
    result = clonemod.clone(tiny_model.snapshot_dir, dest)
    assert result.method in ("copy", "clonefile")
    for name, path in _tree(tiny_model.snapshot_dir).items():
        assert (dest / name).read_bytes() == path.read_bytes()


def test_clone_of_a_broken_snapshot_fails_clearly(tiny_model, tmp_path):
    os.unlink(tiny_model.path("config.json").resolve())
    with pytest.raises(errors.CacheError, match="missing blob"):
        clonemod.clone(tiny_model.snapshot_dir, tmp_path / "broken")
    with pytest.raises(errors.ModelNotFound):
        clonemod.clone(tmp_path / "nope", tmp_path / "x")
