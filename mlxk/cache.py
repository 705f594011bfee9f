"""The Hugging Face hub cache layout, read and edited the way huggingface_hub writes it.

    <cache>/models--org--name/
        blobs/<etag>                  file contents, named by sha256 (LFS) or git blob sha1
        blobs/<etag>[.<x>].incomplete a download in progress (or orphaned by a killed process)
        snapshots/<sha>/<path>        relative symlinks into blobs/
        refs/main                     the commit sha `main` points at
        trees/<sha>.json              the file listing huggingface_hub saw for <sha>
        .staging/<sha>.<pid>-<tid>    a snapshot mlxk's pull is building (published by rename; see mlxk.hub)

Paths in, no environment: callers pass the cache directory (mlxk.config resolves it).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mlxk.errors import CacheError

REPO_PREFIX = "models--"
INCOMPLETE_SUFFIX = ".incomplete"
STAGING_DIR = ".staging"   # beside snapshots/, not in it: huggingface_hub's cache scan takes every folder there


def repo_folder_name(repo_id: str) -> str:
    return REPO_PREFIX + repo_id.replace("/", "--")


def repo_id_from_folder(folder: str) -> str | None:
    if not folder.startswith(REPO_PREFIX):
        return None
    return folder[len(REPO_PREFIX):].replace("--", "/")


def repo_dir(cache_dir: Path, repo_id: str) -> Path:
    """The repo's folder; repo_id must already be validated (mlxk.names), so this cannot escape the cache."""
    return Path(cache_dir) / repo_folder_name(repo_id)


def lock_dir(cache_dir: Path | str, repo_id: str) -> Path:
    """Where huggingface_hub (and mlxk's fetch) keep a repo's per-file download locks: `.locks/models--org--name`."""
    return Path(cache_dir) / ".locks" / repo_folder_name(repo_id)


def iter_repo_dirs(cache_dir: Path):
    """(repo_id, DirEntry) for every model repo folder; a missing cache is empty, not an error."""
    try:
        entries = os.scandir(cache_dir)
    except FileNotFoundError:
        return
    except OSError as error:
        raise CacheError(f"cannot read the HF cache at {cache_dir}: {error.strerror}. "
                         "Check its permissions or set HF_HUB_CACHE.") from error
    with entries:
        for entry in entries:
            repo_id = repo_id_from_folder(entry.name)
            if repo_id and entry.is_dir(follow_symlinks=True):
                yield repo_id, entry


def read_ref(path: Path, ref: str = "main") -> str | None:
    try:
        return (path / "refs" / ref).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def list_revisions(path: Path) -> list[str]:
    """Snapshot hashes, newest first (by snapshot folder mtime)."""
    try:
        entries = [e for e in os.scandir(path / "snapshots") if e.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    entries.sort(key=lambda e: e.stat().st_mtime_ns, reverse=True)
    return [e.name for e in entries]


def current_revision(path: Path, revisions: list[str] | None = None) -> str | None:
    """What refs/main names when that snapshot exists, else the newest snapshot."""
    revisions = list_revisions(path) if revisions is None else revisions
    main = read_ref(path)
    if main and main in revisions:
        return main
    return revisions[0] if revisions else None


def refs(path: Path) -> dict[str, str]:
    """Every ref (`main`, `refs/pr/1`, tags) → sha."""
    root = path / "refs"
    found = {}
    for file in root.rglob("*") if root.is_dir() else ():
        if file.is_file():
            found[file.relative_to(root).as_posix()] = file.read_text().strip()
    return found


@dataclass
class SnapshotFile:
    name: str                # path inside the snapshot, posix
    path: Path               # the entry in snapshots/<sha>/
    is_symlink: bool
    target: Path | None      # the resolved blob, None when the link dangles
    size: int | None         # bytes of the resolved file, None when the link dangles


def snapshot_files(snapshot: Path) -> list[SnapshotFile]:
    files = []
    for root, dirs, names in os.walk(snapshot):
        for name in names:
            entry = Path(root) / name
            link = entry.is_symlink()
            try:
                size = entry.stat().st_size
                target = entry.resolve() if link else entry
            except (FileNotFoundError, OSError):
                size, target = None, None
            files.append(SnapshotFile(entry.relative_to(snapshot).as_posix(), entry, link, target, size))
    files.sort(key=lambda f: f.name)
    return files


def walk_files(folder: Path):
    """(posix path relative to `folder`, Path) for every name os.walk lists as a file, in sorted order (folders and
    names sorted), so what is copied or uploaded comes out the same on every filesystem."""
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            entry = Path(root) / name
            yield entry.relative_to(folder).as_posix(), entry


def incomplete_blobs(path: Path) -> list[Path]:
    """Partial downloads: huggingface_hub's `<etag>[.<x>].incomplete` and mlxk's own."""
    try:
        return sorted(Path(e.path) for e in os.scandir(path / "blobs") if e.name.endswith(INCOMPLETE_SUFFIX))
    except (FileNotFoundError, NotADirectoryError):
        return []


@dataclass
class Usage:
    size_bytes: int = 0          # complete blobs (each once) + regular files in snapshots
    incomplete_bytes: int = 0    # partial downloads


def disk_usage(path: Path) -> Usage:
    """Bytes on disk; blobs shared by several snapshots are counted once.

    Regular files under blobs/ and snapshots/ (a partial download's `.incomplete` blob counts the bytes it holds,
    `allocated_bytes`, not its preallocated size), symlinks skipped (snapshots link into blobs/) and not followed: told
    apart by the directory entry's type, so a snapshot's links cost no stat (a first index sizes 10,000 repos)."""
    usage = Usage()
    seen: set[tuple[int, int]] = set()
    folders = [os.path.join(path, "blobs"), os.path.join(path, "snapshots")]
    while folders:
        try:
            entries = os.scandir(folders.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_symlink():
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                if entry.name.endswith(INCOMPLETE_SUFFIX):
                    usage.incomplete_bytes += allocated_bytes(st)
                else:
                    usage.size_bytes += st.st_size
    return usage


def allocated_bytes(st: os.stat_result) -> int:
    """Bytes a file really holds on disk: st_blocks * 512 capped at st_size (a partial download is preallocated
    sparse to its full size, so st_size alone would count bytes never downloaded); st_size where the platform has
    no st_blocks."""
    blocks = getattr(st, "st_blocks", None)
    return st.st_size if blocks is None else min(blocks * 512, st.st_size)


def fingerprint(path: Path | str, revision: str | None, *, dir_fd: int | None = None, subdirs=()) -> str:
    """A cheap stat-based token that changes when files are added, completed, replaced or removed.

    Blobs land by rename (blobs/ mtime), snapshots get links (snapshot folder mtime), new revisions get folders
    (snapshots/ mtime), refs are rewritten (refs/main mtime); a deleted repo has no fingerprint at all. Four stats
    per repo keep `list` instant with 1,000s of repos; plain string paths because `list` calls this for every repo
    on every run, where pathlib's object churn would cost as much as the stats themselves. `dir_fd`: an open
    directory (`open_dir`) that `path` is relative to: `list` passes the cache and each repo's folder name, so the
    kernel does not walk the cache's own path again for each of 40,000 stats (~15 % of them at 10,000 repos).

    `subdirs`: folders inside the snapshot (relative, "sub" or "sub/deeper") whose mtimes join the token, one line
    each ("\n<mtime>:<folder>"): a file landing in `sub/` changes `sub`'s mtime, not the snapshot's. Inspection
    records them (`subdir_stamp`) and the stored token names them (`stamped_subdirs`), so only repos that have
    subfolders pay for them.
    """
    base = os.fspath(path)
    parts = []
    for sub in _FINGERPRINT_PARTS:
        try:
            parts.append(f"{os.stat(base + sub, dir_fd=dir_fd).st_mtime_ns:x}")
        except OSError:
            parts.append("-")
    if revision:
        try:
            parts.append(f"{os.stat(f'{base}/snapshots/{revision}', dir_fd=dir_fd).st_mtime_ns:x}")
        except OSError:
            parts.append("-")
    stamp = ":".join(parts)
    if subdirs and revision:
        stamp += _subdir_lines(f"{base}/snapshots/{revision}", subdirs, dir_fd)
    return stamp


def _subdir_lines(snapshot: str, subdirs, dir_fd: int | None) -> str:
    lines = []
    for sub in subdirs:
        try:
            lines.append(f"\n{os.stat(f'{snapshot}/{sub}', dir_fd=dir_fd).st_mtime_ns:x}:{sub}")
        except OSError:
            lines.append(f"\n-:{sub}")
    return "".join(lines)


def stamped_subdirs(stamp: str | None) -> list[str]:
    """The snapshot subfolders a stored `fingerprint` token covers (empty for the common repo without any)."""
    if not stamp or "\n" not in stamp:
        return []
    return [line.partition(":")[2] for line in stamp.split("\n")[1:]]


def subdir_stamp(path: Path | str, revision: str | None) -> str:
    """The subfolder lines of `fingerprint` for every folder inside the snapshot `revision` (recursively, symlinks
    not followed), taken now: inspection calls it BEFORE reading the snapshot's files. "" when there are none.
    Raises OSError when a folder cannot be read."""
    if not revision:
        return ""
    snapshot = f"{os.fspath(path)}/snapshots/{revision}"
    found: list[str] = []
    pending = [""]
    while pending:
        prefix = pending.pop()
        try:
            entries = list(os.scandir(f"{snapshot}/{prefix}" if prefix else snapshot))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                name = f"{prefix}{entry.name}"
                found.append(name)
                pending.append(f"{name}/")
    return _subdir_lines(snapshot, sorted(found), None)


_FINGERPRINT_PARTS = ("/blobs", "/snapshots", "/refs/main")


@contextmanager
def open_dir(folder: Path | str):
    """An fd of `folder` for `fingerprint(..., dir_fd=)`, closed on exit; None where os.stat takes no dir_fd or the
    folder cannot be opened (then callers pass full paths)."""
    fd = None
    if os.stat in os.supports_dir_fd:
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            fd = None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def extend_fingerprint(stamp: str, path: Path | str, revision: str | None) -> str:
    """`fingerprint(path, revision)` from a `fingerprint(path, None)` taken earlier: a reader stamps the repo before
    it lists the snapshots, then adds the snapshot it chose, so nothing it reads predates its stamp."""
    if not revision:
        return stamp
    try:
        return f"{stamp}:{os.stat(f'{os.fspath(path)}/snapshots/{revision}').st_mtime_ns:x}"
    except OSError:
        return f"{stamp}:-"


def last_modified(path: Path, revision: str | None) -> float:
    """Unix time the current snapshot last changed (falls back to the repo folder)."""
    for candidate in (path / "snapshots" / revision if revision else None, path):
        if candidate is None:
            continue
        try:
            return candidate.stat().st_mtime
        except OSError:
            continue
    return 0.0


@dataclass
class RemovalPlan:
    repo_id: str
    revisions: list[str]
    paths: list[Path] = field(default_factory=list)   # what would be deleted
    bytes_freed: int = 0
    whole_repo: bool = False
    linked_to: Path | None = None   # the repo folder is a link to this folder (another disk): removed too


def linked_repo(path: Path) -> Path | None:
    """Where a repo folder that is a link (the repo moved to another disk and linked back) really is, when the
    target is a repo folder (it has `snapshots/`): rm removes the files there too, as the link promised they were
    the model. A link to anything else is only unlinked."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target if (target / "snapshots").is_dir() and not path.parent.resolve() == target.parent and \
        target != Path(target.anchor) else None


def cache_relative(path: Path | str, cache_dir: Path | str) -> str:
    """`path` as job results and --json show it: relative to the HF cache ("models--org--name/snapshots/<rev>"),
    never absolute (mlx-knife's JSON carries no cache paths); a path outside the cache shows only its name."""
    try:
        return Path(path).relative_to(cache_dir).as_posix()
    except ValueError:
        return Path(path).name


def is_inside(path: Path | str, folder: Path | str) -> bool:
    """Is `path` (normalised, links not followed) `folder` or under it?"""
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)


def plan_remove(cache_dir: Path, repo_id: str, revision: str | None = None) -> RemovalPlan:
    """What `rm` deletes: the whole repo, or one revision plus the blobs no other revision uses.

    Only the repo's own folders: a snapshot link that points anywhere but the repo's `blobs/` (a hand-made link, a
    hostile one) is removed as a link, never followed to what it points at."""
    path = repo_dir(cache_dir, repo_id)
    revisions = list_revisions(path)
    if revision is None or revisions == [revision]:
        usage = disk_usage(path)
        linked = linked_repo(path)
        return RemovalPlan(repo_id, revisions, [path, *([linked] if linked else [])],
                           usage.size_bytes + usage.incomplete_bytes, whole_repo=True, linked_to=linked)
    if revision not in revisions:
        raise CacheError(f"{repo_id}@{revision[:12]} is not cached.")
    keep: set[Path] = set()
    for other in revisions:
        if other != revision:
            keep.update(f.target for f in snapshot_files(path / "snapshots" / other) if f.target)
    blobs = path / "blobs"
    drop = {f.target for f in snapshot_files(path / "snapshots" / revision)
            if f.is_symlink and f.target and is_inside(f.target, blobs)} - keep
    tree = path / "trees" / f"{revision}.json"
    staged = sorted((path / STAGING_DIR).glob(f"{revision}.*"))   # what a killed pull of it left
    paths = [path / "snapshots" / revision, *sorted(drop), *([tree] if tree.is_file() else []), *staged]
    return RemovalPlan(repo_id, [revision], paths, sum(p.stat().st_size for p in drop), whole_repo=False)


TRASH_PREFIX = ".trash-"     # <cache>/.trash-<job id>/: what an rm took out of the cache, until it is deleted
_PLAN = "plan.json"


def trash_dir(cache_dir: Path, job_id: str) -> Path:
    """Where the rm job `job_id` moves what it removes; no `models--` prefix, so no reader sees it as a repo."""
    return Path(cache_dir) / f"{TRASH_PREFIX}{job_id}"


def trash_dirs(cache_dir: Path) -> dict[str, Path]:
    """{job id: folder} of every trash folder in the cache (leftovers of an interrupted rm among them)."""
    try:
        entries = list(os.scandir(cache_dir))
    except OSError:
        return {}
    return {e.name[len(TRASH_PREFIX):]: Path(e.path) for e in entries if e.name.startswith(TRASH_PREFIX)}


def _moved_name(plan: dict) -> str:
    return repo_folder_name(plan["repo_id"]) if plan["whole_repo"] else f"snapshot-{plan['revisions'][0]}"


def read_trash_plan(trash: Path) -> dict | None:
    """The removal a trash folder belongs to (`repo_id, revisions, whole_repo, blobs, bytes_freed`), or None when
    its one rename never happened (the folder holds only a plan, or nothing)."""
    try:
        plan = json.loads((trash / _PLAN).read_text())
    except (OSError, ValueError):
        return None
    return plan if (trash / _moved_name(plan)).exists() else None


def move_to_trash(cache_dir: Path, plan: RemovalPlan, trash: Path) -> dict:
    """The destructive step of rm, atomic as every reader sees it: ONE rename takes the repo (or the revision's
    snapshot folder) out of the cache into `trash`; `finish_trash` does the rest. Returns the recorded plan."""
    path = repo_dir(cache_dir, plan.repo_id)
    record = {"repo_id": plan.repo_id, "revisions": plan.revisions, "whole_repo": plan.whole_repo,
              "bytes_freed": plan.bytes_freed, "linked_to": str(plan.linked_to) if plan.linked_to else None,
              "blobs": [] if plan.whole_repo else [p.name for p in plan.paths[1:] if p.parent.name == "blobs"]}
    trash.mkdir(parents=True, exist_ok=True)
    (trash / _PLAN).write_text(json.dumps(record))
    source = path if plan.whole_repo else path / "snapshots" / plan.revisions[0]
    try:
        os.rename(source, trash / _moved_name(record))
    except FileNotFoundError:
        raise CacheError(f"{plan.repo_id} changed while it was being removed ({source.name} is gone); "
                         f"run `mlxk rm {plan.repo_id}` again.") from None
    return record


def finish_trash(cache_dir: Path, trash: Path, record: dict) -> None:
    """The rest of a removal whose rename happened; safe to repeat after a kill. For one revision: refs that name
    it go (as huggingface_hub's delete_revisions does), then its blobs that no snapshot left in the repo uses
    (a newer pull that brought the revision back keeps its refs and blobs)."""
    import shutil  # lazy: keeps `mlxk list` light

    path = repo_dir(cache_dir, record["repo_id"])
    if record["whole_repo"]:
        shutil.rmtree(lock_dir(cache_dir, record["repo_id"]), ignore_errors=True)
        if record.get("linked_to"):  # the link went with the rename; the files it named are removed where they are
            shutil.rmtree(record["linked_to"], ignore_errors=True)
        return
    remaining = list_revisions(path)
    gone = [r for r in record["revisions"] if r not in remaining]
    for ref, sha in refs(path).items():
        if sha in gone:
            (path / "refs" / ref).unlink(missing_ok=True)
    for sha in gone:  # its listing and what a killed pull of it left; links are removed, never followed
        for leftover in [path / "trees" / f"{sha}.json", *(path / STAGING_DIR).glob(f"{sha}.*")]:
            if os.path.lexists(leftover):
                remove_path(leftover)
    keep: set[Path] = set()
    for other in remaining:
        keep.update(f.target for f in snapshot_files(path / "snapshots" / other) if f.target)
    (trash / "blobs").mkdir(exist_ok=True)
    for name in record["blobs"]:
        blob = path / "blobs" / name
        if blob.exists() and blob.resolve() not in keep:
            os.rename(blob, trash / "blobs" / name)


def empty_trash(trash: Path) -> None:
    import shutil  # lazy: keeps `mlxk list` light

    shutil.rmtree(trash, ignore_errors=True)


def apply_remove(cache_dir: Path, plan: RemovalPlan, *, trash: Path | None = None) -> None:
    """Remove what `plan` names through `trash` (move aside in one rename, finish, delete)."""
    if trash is None:
        import uuid

        trash = trash_dir(cache_dir, uuid.uuid4().hex[:12])
    if plan.whole_repo and not os.path.lexists(repo_dir(cache_dir, plan.repo_id)):
        return
    record = move_to_trash(cache_dir, plan, trash)
    finish_trash(cache_dir, trash, record)
    empty_trash(trash)


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree; a symlink (even to a folder) is unlinked, never followed (rmtree does not
    follow the links inside a tree either)."""
    import shutil  # lazy: keeps `mlxk list` light

    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)
