"""Copy a cached snapshot into a flat, editable workspace, copy-on-write where the filesystem allows.

A snapshot is a folder of symlinks into shared blobs; editing through them would corrupt the cache for every
revision that shares the blob. A clone therefore gets real files. On APFS (`clonefile`) and on Linux
filesystems with reflinks (btrfs, XFS: the `FICLONE` ioctl) those files share the blob's extents until written,
so a 10 GB clone takes no time and no space; elsewhere it is a plain kernel-side copy. Existing files are never
overwritten: every destination file is created with O_EXCL.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mlxk import cache, errors
from mlxk.faults import checkpoint

log = logging.getLogger("mlxk.clone")

FICLONE = 0x40049409          # _IOW(0x94, 9, int) from linux/fs.h
_COPY_CHUNK = 64 * 1024 * 1024
_NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS,
                  errno.EPERM}
_STRENGTH = {"clonefile": 0, "reflink": 0, "copy": 1}


@dataclass
class CloneResult:
    dest: Path
    files: int
    bytes: int
    method: str      # "clonefile" | "reflink" | "copy" (the weakest method any file needed)


def staging_dir(dest: Path, owner: str) -> Path:
    """Where the clone by `owner` (a job id) is written before it becomes `dest`: a hidden sibling, same folder, so
    the publishing rename stays on one filesystem. Its name marks the work as `owner`'s: a retry of the same job
    finds it and starts it over; nobody else's output is ever taken for its own."""
    return dest.parent / f".{dest.name}.mlxk-clone-{owner}"


def clone(snapshot: Path, dest: Path, *, progress=None, owner: str | None = None) -> CloneResult:
    """Copy every file of `snapshot` (symlinks resolved) into `dest`, which must not exist or be empty.

    With `owner`, the files go to `staging_dir(dest, owner)` first and `dest` appears in one rename when all are
    there: a clone killed half-way leaves `dest` as it was, and the owner's next attempt restarts its staging.
    """
    from mlxk.hub import Progress   # the one progress shape of the domain

    snapshot, dest = Path(snapshot), Path(dest)
    if not snapshot.is_dir():
        raise errors.ModelNotFound(f"snapshot {snapshot} is not in the cache; pull it first.", name=str(snapshot))
    _check_dest(dest)
    files = _list(snapshot)
    total = sum(size for _rel, _src, size in files)
    work = staging_dir(dest, owner) if owner else dest
    if owner and work.exists():
        log.info("restarting the unfinished clone in %s", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    done, method, last = 0, None, 0.0
    for index, (rel, src, size) in enumerate(files, 1):
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        used = copy_file(src, target)
        method = used if method is None or _STRENGTH[used] > _STRENGTH[method] else method
        done += size
        if progress and (index == len(files) or time.monotonic() - last >= 0.25):
            last = time.monotonic()
            progress(Progress(done, total, index, len(files), rel))
        checkpoint("clone.copying")
    if owner:
        _publish(work, dest)
    method = method or "copy"
    log.info("cloned %s to %s: %d files, %d bytes by %s", snapshot, dest, len(files), total, method)
    return CloneResult(dest, len(files), total, method)


def _publish(work: Path, dest: Path) -> None:
    """`work` becomes `dest` in one rename (POSIX rename replaces an empty folder, never a non-empty one)."""
    try:
        os.rename(work, dest)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            shutil.rmtree(work, ignore_errors=True)
            raise errors.Conflict(f"{dest} was filled by something else while the clone ran; nothing was "
                                  "overwritten. Clone into a new or empty folder.", path=str(dest)) from None
        raise


def _check_dest(dest: Path) -> None:
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise errors.Conflict(f"{dest} exists and is not a folder; choose another destination.", path=str(dest))
    if dest.is_dir() and any(dest.iterdir()):
        raise errors.Conflict(f"{dest} is not empty; clone into a new or empty folder (nothing was overwritten).",
                              path=str(dest))


def _list(snapshot: Path) -> list[tuple[str, Path, int]]:
    """(relative path, resolved source, size) of every file; a dangling link is a broken snapshot."""
    found = []
    for rel, entry in cache.walk_files(snapshot):
        source = entry.resolve()
        if not source.is_file():
            raise errors.CacheError(f"{rel} in {snapshot} points to a missing blob; the snapshot is "
                                    "incomplete: pull the model again.", path=str(entry))
        found.append((rel, source, source.stat().st_size))
    return found


def copy_file(src: Path, dst: Path) -> str:
    """Copy one file without clobbering `dst`; returns the method that worked."""
    if sys.platform == "darwin" and _clonefile(src, dst):
        return "clonefile"
    fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with open(src, "rb") as fin:
            if sys.platform.startswith("linux") and _reflink(fin.fileno(), fd_out):
                return "reflink"
            _plain_copy(fin.fileno(), fd_out)
            return "copy"
    except BaseException as error:
        os.close(fd_out)
        fd_out = -1
        dst.unlink(missing_ok=True)   # we created it (O_EXCL): never leave half a file behind
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise errors.DiskFull(f"the disk filled up while copying {src.name} to {dst.parent}; free some space "
                                  "and clone again into an empty folder.", path=str(dst)) from error
        raise
    finally:
        if fd_out >= 0:
            os.close(fd_out)


def _clonefile(src: Path, dst: Path) -> bool:
    """macOS clonefile(2): copy-on-write on APFS; fails (EEXIST) rather than overwrite."""
    libc = _libc()
    func = getattr(libc, "clonefile", None) if libc else None
    if func is None:
        return False
    if func(os.fsencode(src), os.fsencode(dst), 0) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise errors.Conflict(f"{dst} already exists; nothing was overwritten.", path=str(dst))
    return False


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


def _reflink(fd_in: int, fd_out: int) -> bool:
    try:
        fcntl.ioctl(fd_out, FICLONE, fd_in)
        return True
    except OSError as error:
        if error.errno in _NOT_SUPPORTED:
            return False
        raise


def _plain_copy(fd_in: int, fd_out: int) -> None:
    """copy_file_range (in-kernel, and reflinks on some filesystems), else sendfile, else read/write."""
    if hasattr(os, "copy_file_range"):
        try:
            while os.copy_file_range(fd_in, fd_out, _COPY_CHUNK):
                pass
            return
        except OSError as error:
            if error.errno not in _NOT_SUPPORTED:
                raise
            os.lseek(fd_in, 0, os.SEEK_SET)
            os.ftruncate(fd_out, 0)
            os.lseek(fd_out, 0, os.SEEK_SET)
    with open(fd_in, "rb", closefd=False) as fin, open(fd_out, "wb", closefd=False) as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)
