"""Pull and push against the Hugging Face Hub, as plain domain functions the job queue calls.

Why our own fetcher: huggingface_hub 2.4 restarts every download from zero in a new process and orphans its
`<etag>.<8hex>.incomplete` files, and it checks plain-HTTP downloads by size only. A job queue whose worker gets
killed and whose job is retried needs downloads that resume across processes and bytes that are verified. So
`pull` lists the files itself (revision + tree API) and writes the standard cache layout the way huggingface_hub
does — `blobs/<etag>`, relative `snapshots/<sha>/<path>` links, `refs/<ref>` written last — into a stable
`blobs/<etag>.incomplete` that a later process finds and continues with `Range`. It takes huggingface_hub's own
per-blob lock files, so a concurrent `hf download` of the same blob waits instead of colliding.

Push goes through huggingface_hub's `HfApi` (create_repo + create_commit); only the policy (private/public,
.hfignore, dry-run planning, token) is ours.
"""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import quote, urljoin, urlsplit

from mlxk import cache, errors, names

log = logging.getLogger("mlxk.hub")

CHUNK_SIZE = 4 * 1024 * 1024        # bytes per read: big reads keep a single 1 GiB file fast
PROGRESS_INTERVAL_S = 0.25
RETRIES = 5                         # dropped connections retried (with Range) within one call
RETRY_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0)
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
_SHA40 = re.compile(r"^[0-9a-f]{40}$")
_OUR_PARTIAL = ".incomplete"


# --------------------------------------------------------------------------------------------------------------
# Public data


@dataclass
class Progress:
    """Reported every ~0.25 s and at file boundaries (not per chunk), from any thread."""
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    message: str = ""


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]   # polled between chunks; True -> errors.Cancelled, partial data kept


@dataclass
class PullResult:
    repo_id: str
    revision: str            # the 40-hex commit
    ref: str                 # the ref written (branch/tag name), or the sha for a sha-pinned pull
    files: int
    bytes_downloaded: int    # bytes that crossed the network in this call
    bytes_total: int         # size of the wanted files
    up_to_date: bool
    snapshot_path: Path


@dataclass
class PushResult:
    repo_id: str
    url: str
    revision: str | None
    created: bool
    private: bool
    dry_run: bool
    plan: list[dict] = field(default_factory=list)   # {"path", "action": "upload"|"unchanged", "size", "lfs"}
    bytes_uploaded: int = 0


@dataclass(frozen=True)
class RemoteFile:
    """One file of a commit, as the tree API lists it."""
    path: str
    size: int
    blob_id: str                 # git blob sha1
    lfs_sha256: str | None = None

    @property
    def etag(self) -> str:
        """The blob's name in the cache: what huggingface_hub names it (sha256 for LFS, else git sha1)."""
        return self.lfs_sha256 or self.blob_id


# --------------------------------------------------------------------------------------------------------------
# HTTP: one client per call, errors mapped to the mlxk family


def _token(token: str | bool | None) -> str | None:
    if token is False:   # the caller decided there is none (a job queued without a token): never fall back
        return None
    if token:
        return token
    from mlxk.config import settings

    return settings().hf_token


def _headers(token: str | None) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    # token=False: never let huggingface_hub pick a token up on its own; mlxk.config decides which one is used.
    headers = build_hf_headers(token=token or False)
    headers["accept-encoding"] = "identity"   # sizes and Range offsets are about the stored bytes
    return headers


def _client():
    import httpx

    return httpx.Client(follow_redirects=False,
                        timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                        limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))


def _error_for(response, repo_id: str, *, endpoint: str, token: str | None, revision: str | None = None,
               what: str = "") -> errors.MlxkError:
    """The mlxk error a Hub error response means (the Hub says which in X-Error-Code)."""
    code = response.headers.get("x-error-code", "")
    hub_message = response.headers.get("x-error-message", "")
    status = response.status_code
    page = f"{endpoint}/{repo_id}"
    auth_hint = ("set HF_TOKEN or run `hf auth login`" if not token
                 else "check that your token (HF_TOKEN or `hf auth login`) has access")
    if code == "GatedRepo":
        if token:
            return errors.GatedRepo(f"{repo_id} is gated and your token has not been granted access yet: request "
                                    f"access at {page} and retry once it is approved.", repo=repo_id, url=page)
        return errors.GatedRepo(f"{repo_id} is gated: request access at {page}, then set HF_TOKEN or run "
                                "`hf auth login` with an approved account.", repo=repo_id, url=page)
    if code == "RepoNotFound":
        return errors.RepoNotFound(f"{repo_id} was not found on {endpoint}. Check the name; if it is a private "
                                   f"repo, {auth_hint}.", repo=repo_id)
    if code == "RevisionNotFound":
        return errors.RevisionNotFound(f"revision {revision!r} does not exist in {repo_id}. Use a branch, tag or "
                                       "commit hash of the repo.", repo=repo_id, revision=revision)
    if code == "EntryNotFound":
        return errors.HubError(f"{what or 'a file'} of {repo_id} does not exist at that revision.", repo=repo_id)
    if "disabled" in hub_message.lower():
        return errors.HubError(f"{repo_id} has been disabled on the Hub: {hub_message}", repo=repo_id)
    if status == 401:
        detail = hub_message or "unauthorized"
        if token:
            return errors.AuthError(f"the Hub rejected your token ({detail}). Set a valid HF_TOKEN or run "
                                    "`hf auth login` again.", repo=repo_id)
        return errors.AuthError(f"the Hub requires authentication for {repo_id} ({detail}): set HF_TOKEN or run "
                                "`hf auth login`.", repo=repo_id)
    if status == 403:
        return errors.AuthError(f"your token is not allowed to access {repo_id} ({hub_message or 'forbidden'}).",
                                repo=repo_id)
    return errors.HubError(f"the Hub answered {status} for {what or repo_id}"
                           f"{': ' + hub_message if hub_message else ''}. Try again later.",
                           repo=repo_id, status=status)


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def _unreachable(endpoint: str, error: Exception) -> errors.HubError:
    return errors.HubError(f"cannot reach the Hub at {endpoint}: {error}. Check your connection (or HF_ENDPOINT) "
                           "and try again.", endpoint=endpoint)


def _get_json(client, url: str, *, headers, repo_id, endpoint, token, revision=None, params=None):
    import httpx

    try:
        response = client.get(url, headers=headers, params=params)
    except httpx.HTTPError as error:
        raise _unreachable(endpoint, error) from error
    if response.status_code != 200:
        raise _error_for(response, repo_id, endpoint=endpoint, token=token, revision=revision)
    return response


def _revision_info(client, repo_id: str, revision: str, *, endpoint: str, headers, token) -> dict:
    url = f"{endpoint}/api/models/{repo_id}/revision/{quote(revision, safe='')}"
    info = _get_json(client, url, headers=headers, repo_id=repo_id, endpoint=endpoint, token=token,
                     revision=revision).json()
    if not _SHA40.match(str(info.get("sha", ""))):
        raise errors.HubError(f"the Hub did not say which commit {repo_id}@{revision} is (no sha in its answer).",
                              repo=repo_id)
    return info


def _tree(client, repo_id: str, sha: str, *, endpoint: str, headers, token) -> list[RemoteFile]:
    url = f"{endpoint}/api/models/{repo_id}/tree/{sha}"
    params = {"recursive": "true", "expand": "false"}
    files: list[RemoteFile] = []
    while url:
        response = _get_json(client, url, headers=headers, repo_id=repo_id, endpoint=endpoint, token=token,
                             revision=sha, params=params)
        for entry in response.json():
            if entry.get("type") != "file":
                continue
            lfs = entry.get("lfs") or {}
            files.append(RemoteFile(entry["path"], int(entry.get("size", 0)), entry["oid"],
                                    lfs.get("oid") or lfs.get("sha256")))
        url = response.links.get("next", {}).get("url")
        params = None   # the next-page link carries its own query
    return files


def _check_access(client, repo_id: str, sha: str, file: RemoteFile, *, endpoint: str, headers, token) -> None:
    """Gated repos answer info and tree publicly; only /resolve tells whether we may download."""
    import httpx

    url = _resolve_url(endpoint, repo_id, sha, file.path)
    try:
        response = client.head(url, headers=headers)
    except httpx.HTTPError as error:
        raise _unreachable(endpoint, error) from error
    if response.status_code >= 400:
        raise _error_for(response, repo_id, endpoint=endpoint, token=token, revision=sha, what=file.path)


def _resolve_url(endpoint: str, repo_id: str, sha: str, path: str) -> str:
    return f"{endpoint}/{repo_id}/resolve/{sha}/{quote(path)}"


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


# --------------------------------------------------------------------------------------------------------------
# Choosing files


def _as_patterns(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _pattern_match(path: str, pattern: str) -> bool:
    # Like huggingface_hub's filter_repo_objects: a trailing "/" means the whole folder.
    if pattern.endswith("/"):
        pattern += "*"
    return fnmatch.fnmatch(path, pattern)


def select_files(files: Iterable[RemoteFile], include=None, exclude=None) -> list[RemoteFile]:
    allow, ignore = _as_patterns(include), _as_patterns(exclude)
    chosen = []
    for file in files:
        if allow and not any(_pattern_match(file.path, p) for p in allow):
            continue
        if ignore and any(_pattern_match(file.path, p) for p in ignore):
            continue
        chosen.append(file)
    return chosen


# --------------------------------------------------------------------------------------------------------------
# Cache state


def _blob(repo: Path, file: RemoteFile) -> Path:
    return repo / "blobs" / file.etag


def _partial(repo: Path, file: RemoteFile) -> Path:
    return repo / "blobs" / (file.etag + _OUR_PARTIAL)


def _lock_path(cache_dir: Path, repo_id: str, etag: str) -> Path:
    return cache.lock_dir(cache_dir, repo_id) / f"{etag}.lock"


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _have_blob(repo: Path, file: RemoteFile) -> bool:
    return _size_or_none(_blob(repo, file)) == file.size


def _snapshot_complete(repo: Path, sha: str, files: list[RemoteFile]) -> bool:
    snapshot = repo / "snapshots" / sha
    return all(_size_or_none(snapshot / f.path) == f.size for f in files)


def _ref_for(revision: str | None, sha: str) -> str | None:
    """The ref file a pull writes: the branch/tag asked for; none when pinned to a full sha (as huggingface_hub)."""
    if revision is None:
        return "main"
    return None if revision == sha else revision


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _fmt(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _check_disk(cache_dir: Path, repo_id: str, needed: int) -> None:
    if needed <= 0:
        return
    where = _existing_parent(cache_dir)
    free = shutil.disk_usage(where).free
    if needed > free:
        raise errors.DiskFull(f"not enough disk space for {repo_id}: it needs {_fmt(needed)} more, but only "
                              f"{_fmt(free)} are free on the filesystem of {cache_dir}. Free some space "
                              "(e.g. `mlxk rm` an unused model) or set HF_HUB_CACHE to a bigger disk.",
                              needed_bytes=needed, free_bytes=free, path=str(cache_dir))


# --------------------------------------------------------------------------------------------------------------
# Progress across download threads


class _Tracker:
    def __init__(self, progress: ProgressFn | None, *, bytes_total: int, files_total: int, bytes_done: int,
                 files_done: int):
        self._progress = progress
        self._lock = threading.Lock()
        self.bytes_total, self.files_total = bytes_total, files_total
        self.bytes_done, self.files_done = bytes_done, files_done
        self.downloaded = 0
        self._last = 0.0

    def add(self, n: int, *, network: bool = True) -> None:
        with self._lock:
            self.bytes_done += n
            if network:
                self.downloaded += n
        self._maybe_report()

    def file_done(self, name: str) -> None:
        with self._lock:
            self.files_done += 1
        self._maybe_report(force=True, message=name)

    def report(self, message: str = "") -> None:
        self._maybe_report(force=True, message=message)

    def _maybe_report(self, *, force: bool = False, message: str = "") -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < PROGRESS_INTERVAL_S:
                return
            self._last = now
            snapshot = Progress(self.bytes_done, self.bytes_total, self.files_done, self.files_total, message)
        self._progress(snapshot)


# --------------------------------------------------------------------------------------------------------------
# Fetching one file: resumable, verified


class _Transient(Exception):
    """A failure worth another attempt with Range (dropped connection, timeout, 5xx)."""


class _Verifier:
    """Hashes exactly the bytes written to the partial file, so the blob can be checked without re-reading it."""

    def __init__(self, file: RemoteFile):
        self.file = file
        self.reset()

    def reset(self) -> None:
        if self.file.lfs_sha256:
            self.hash = hashlib.sha256()
        else:
            self.hash = hashlib.sha1()
            self.hash.update(b"blob %d\0" % self.file.size)   # git's blob id: sha1 of header + content

    def update(self, data) -> None:
        self.hash.update(data)

    def expected(self) -> str:
        return self.file.lfs_sha256 or self.file.blob_id

    def ok(self) -> bool:
        return self.hash.hexdigest() == self.expected()


@dataclass
class _Job:
    repo_id: str
    repo: Path
    cache_dir: Path
    sha: str
    endpoint: str
    headers: dict
    token: str | None
    client: object
    tracker: _Tracker
    stopped: Callable[[], bool]


def _hash_existing(path: Path, verifier: _Verifier, size: int) -> None:
    with open(path, "rb") as f:
        while size > 0:
            data = f.read(min(CHUNK_SIZE, size))
            if not data:
                break
            verifier.update(data)
            size -= len(data)


def _adopt_orphan(repo: Path, file: RemoteFile, partial: Path) -> None:
    """Continue a download huggingface_hub left behind (`<etag>.<8hex>.incomplete`) instead of starting over.

    Called with the blob's lock held, so no `hf download` is writing those files right now.
    """
    orphans = sorted(repo.glob(f"blobs/{file.etag}.*{_OUR_PARTIAL}"), key=lambda p: _size_or_none(p) or 0)
    orphans = [p for p in orphans if p != partial]
    if not orphans:
        return
    if not partial.exists() and (_size_or_none(orphans[-1]) or 0) <= file.size:
        os.replace(orphans.pop(), partial)
    for orphan in orphans:
        orphan.unlink(missing_ok=True)


def _fetch(job: _Job, file: RemoteFile) -> None:
    """Download `file` into blobs/<etag> (resuming blobs/<etag>.incomplete), verified, under the blob's lock."""
    from filelock import FileLock

    blob, partial = _blob(job.repo, file), _partial(job.repo, file)
    lock_path = _lock_path(job.cache_dir, job.repo_id, file.etag)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    _acquire(job, lock, file)
    try:
        if _have_blob(job.repo, file):     # another process finished it while we waited for the lock
            return
        _adopt_orphan(job.repo, file, partial)
        verifier = _Verifier(file)
        have = _size_or_none(partial) or 0
        if have > file.size:
            partial.unlink()
            have = 0
        if have:
            _hash_existing(partial, verifier, have)    # resume: the hash covers the bytes already on disk
        for attempt in range(RETRIES + 1):
            if have >= file.size:
                break
            try:
                have = _stream(job, file, partial, verifier, have)
            except _Transient as problem:
                have = _size_or_none(partial) or 0
                if attempt == RETRIES:
                    raise errors.HubError(
                        f"downloading {file.path} of {job.repo_id} failed {RETRIES + 1} times ({problem}); "
                        f"{_fmt(have)} of {_fmt(file.size)} are kept and the next pull resumes from there.",
                        repo=job.repo_id, file=file.path, bytes_kept=have) from None
                log.info("download of %s %s interrupted (%s); resuming at byte %d", job.repo_id, file.path,
                         problem, have)
                _sleep_unless_stopped(job, RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
        _finish(job, file, partial, blob, verifier)
    finally:
        lock.release()


def _acquire(job: _Job, lock, file: RemoteFile) -> None:
    """Wait for the blob's lock (an `hf download` of the same blob may hold it), staying cancellable."""
    from filelock import Timeout

    while True:
        try:
            lock.acquire(timeout=0.5)
            return
        except Timeout:
            if job.stopped():
                raise errors.Cancelled(f"pull of {job.repo_id} cancelled while waiting for another download "
                                       f"of {file.path}.") from None


def _sleep_unless_stopped(job: _Job, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if job.stopped():
            raise errors.Cancelled(f"pull of {job.repo_id} cancelled; partial files are kept for a later pull.")
        time.sleep(0.05)


def _finish(job: _Job, file: RemoteFile, partial: Path, blob: Path, verifier: _Verifier) -> None:
    size = _size_or_none(partial)
    if size != file.size or not verifier.ok():
        partial.unlink(missing_ok=True)
        what = "sha256" if file.lfs_sha256 else "git blob sha1"
        got = f"{size} bytes" if size != file.size else f"{what} {verifier.hash.hexdigest()}"
        raise errors.IntegrityError(
            f"{file.path} of {job.repo_id}@{job.sha[:12]} arrived corrupted: expected {file.size} bytes with "
            f"{what} {verifier.expected()}, got {got}. The bad download was deleted; pull again.",
            repo=job.repo_id, file=file.path)
    os.replace(partial, blob)
    job.tracker.file_done(file.path)


def _open_stream(job: _Job, file: RemoteFile, have: int):
    """GET the file from `have` on; follows redirects by hand so the token never goes to another origin."""
    import httpx

    url = _resolve_url(job.endpoint, job.repo_id, job.sha, file.path)
    headers = dict(job.headers)
    if have:
        headers["range"] = f"bytes={have}-"
    for _hop in range(5):
        try:
            request = job.client.build_request("GET", url, headers=headers)
            response = job.client.send(request, stream=True)
        except httpx.TransportError as error:
            raise _Transient(f"{type(error).__name__}: {error}") from error
        if response.status_code not in (301, 302, 303, 307, 308):
            return response
        location = urljoin(url, response.headers.get("location", ""))
        response.close()
        if _origin(location) != _origin(url):
            # The CDN URL is presigned; the Hub token must not leak to it.
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        url = location
    raise errors.HubError(f"too many redirects while downloading {file.path} of {job.repo_id}.", repo=job.repo_id)


def _check_range(response, file: RemoteFile, have: int) -> bool:
    """True to append at `have`; False when the server sent the whole file (200) and we must start over."""
    if not have or response.status_code == 200:
        return False
    content_range = response.headers.get("content-range", "")
    match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range)
    if not match or int(match.group(1)) != have:
        raise _Transient(f"server answered Range bytes={have}- with Content-Range {content_range!r}")
    return True


def _stream(job: _Job, file: RemoteFile, partial: Path, verifier: _Verifier, have: int) -> int:
    import httpx

    response = _open_stream(job, file, have)
    try:
        if response.status_code not in (200, 206):
            if _retryable_status(response.status_code):
                raise _Transient(f"HTTP {response.status_code}")
            response.read()
            raise _error_for(response, job.repo_id, endpoint=job.endpoint, token=job.token, revision=job.sha,
                             what=file.path)
        append = _check_range(response, file, have)
        if not append and have:
            log.info("server ignored Range for %s; starting it over", file.path)
            job.tracker.add(-have, network=False)
            verifier.reset()
            have = 0
        with open(partial, "ab" if append else "wb") as out:
            sink = _Sink(out, verifier, job, partial)
            pending = bytearray()   # network pieces are small; write and hash in CHUNK_SIZE blocks

            def flush() -> None:
                nonlocal have, pending
                if pending:
                    sink.put(pending)
                    have += len(pending)
                    job.tracker.add(len(pending))
                    pending = bytearray()

            try:
                last_flush = time.monotonic()
                for data in response.iter_raw():
                    if have + len(pending) + len(data) > file.size:
                        raise _Transient("server sent more bytes than the file has")
                    pending += data
                    if len(pending) >= CHUNK_SIZE or time.monotonic() - last_flush >= PROGRESS_INTERVAL_S:
                        flush()
                        last_flush = time.monotonic()
                        if job.stopped():
                            raise errors.Cancelled(f"pull of {job.repo_id} cancelled; {file.path} is kept at "
                                                   f"{_fmt(have)} of {_fmt(file.size)} and a later pull resumes.")
                flush()
            except httpx.TransportError as error:   # dropped mid-body, read timeout: keep what did arrive
                flush()
                raise _Transient(f"{type(error).__name__}: {error}") from error
            finally:
                sink.close()    # every byte counted in `have` is on disk and hashed before we go on
        if have < file.size:
            raise _Transient(f"connection closed at byte {have} of {file.size}")
        return have
    finally:
        response.close()


class _Sink:
    """Writes and hashes in its own thread, so the next network read overlaps them (both release the GIL)."""

    def __init__(self, out, verifier: _Verifier, job: _Job, partial: Path):
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._args = (out, verifier, job, partial)
        self._thread = threading.Thread(target=self._run, name="mlxk-pull-sink", daemon=True)
        self._thread.start()

    def put(self, data: bytearray) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def _run(self) -> None:
        out, verifier, job, partial = self._args
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    _write(out, data, job, partial)
                    verifier.update(data)
                except BaseException as error:   # handed to the download thread by put()/close()
                    self._error = error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _write(out, data: bytes, job: _Job, partial: Path) -> None:
    try:
        out.write(data)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise errors.DiskFull(f"the disk holding {job.cache_dir} filled up while downloading {job.repo_id}; "
                                  f"the partial download {partial.name} is kept. Free some space and pull again "
                                  "to resume.", path=str(partial)) from error
        raise


# --------------------------------------------------------------------------------------------------------------
# Writing the snapshot


def _link(repo: Path, sha: str, file: RemoteFile) -> None:
    link = repo / "snapshots" / sha / file.path
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(_blob(repo, file), link.parent)
    try:
        if os.readlink(link) == target:
            return
        link.unlink()
    except FileNotFoundError:
        pass
    except OSError:   # a regular file or folder where the link goes: replace it
        link.unlink()
    os.symlink(target, link)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_tree(repo: Path, sha: str, files: list[RemoteFile]) -> None:
    """trees/<sha>.json in huggingface_hub's format, so `hf` (offline) and the health rules see the full listing."""
    entries = {}
    for f in files:
        entry = {"size": f.size, "blob_id": f.blob_id}
        if f.lfs_sha256:
            entry.update(lfs_sha256=f.lfs_sha256, lfs_size=f.size)
        entries[f.path] = entry
    _atomic_write(repo / "trees" / f"{sha}.json", json.dumps({"format_version": 1, "files": entries}, indent=2))


# --------------------------------------------------------------------------------------------------------------
# pull


@dataclass
class _Remote:
    sha: str
    files: list[RemoteFile]      # all files of the commit
    wanted: list[RemoteFile]


def _cached_tree(repo: Path, sha: str) -> list[RemoteFile] | None:
    """A commit's listing never changes: trees/<sha>.json (ours or huggingface_hub's) saves the tree call."""
    try:
        data = json.loads((repo / "trees" / f"{sha}.json").read_text())
        return [RemoteFile(path, int(e["size"]), e["blob_id"], e.get("lfs_sha256"))
                for path, e in data["files"].items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _preflight(client, repo_id: str, revision: str | None, *, repo: Path, include, exclude, endpoint: str,
               headers, token) -> _Remote:
    """Everything that can fail for a reason the user must fix, checked before a byte is written."""
    info = _revision_info(client, repo_id, revision or "main", endpoint=endpoint, headers=headers, token=token)
    sha = info["sha"]
    files = _cached_tree(repo, sha)
    if files is None:
        files = _tree(client, repo_id, sha, endpoint=endpoint, headers=headers, token=token)
    wanted = select_files(files, include, exclude)
    if not wanted:
        raise errors.HubError(f"no file of {repo_id}@{revision or 'main'} matches include={include!r} "
                              f"exclude={exclude!r}.", repo=repo_id)
    if info.get("gated") or info.get("private"):
        _check_access(client, repo_id, sha, wanted[0], endpoint=endpoint, headers=headers, token=token)
    return _Remote(sha, files, wanted)


def _refuse_offline(repo_id: str) -> None:
    from mlxk.config import settings

    if settings().hub_offline:
        raise errors.HubError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded; unset it to pull.",
                              repo=repo_id)


def remote_revision(repo_id: str, *, revision: str | None = None, endpoint: str, token: str | None = None) -> str:
    """The commit sha `revision` (default main) names on the Hub; raises the typed errors pull would."""
    names.validate_repo_id(repo_id)
    token = _token(token)
    endpoint = endpoint.rstrip("/")
    with _client() as client:
        return _revision_info(client, repo_id, revision or "main", endpoint=endpoint, headers=_headers(token),
                              token=token)["sha"]


def pull(repo_id: str, *, revision: str | None = None, include=None, exclude=None, cache_dir: Path,
         endpoint: str, token: str | None = None, progress: ProgressFn | None = None,
         should_stop: StopFn | None = None, max_workers: int = 8) -> PullResult:
    """Download `repo_id@revision` (the files matching include/exclude) into the HF cache; resumes partials."""
    names.validate_repo_id(repo_id)
    _refuse_offline(repo_id)
    cache_dir, endpoint, token = Path(cache_dir), endpoint.rstrip("/"), _token(token)
    headers = _headers(token)
    repo = cache.repo_dir(cache_dir, repo_id)
    with _client() as client:
        remote = _preflight(client, repo_id, revision, repo=repo, include=include, exclude=exclude, endpoint=endpoint,
                            headers=headers, token=token)
        sha, wanted = remote.sha, remote.wanted
        ref = _ref_for(revision, sha)
        snapshot = repo / "snapshots" / sha
        total = sum(f.size for f in wanted)
        if (ref is None or cache.read_ref(repo, ref) == sha) and _snapshot_complete(repo, sha, wanted):
            if progress:
                progress(Progress(total, total, len(wanted), len(wanted), "up to date"))
            return PullResult(repo_id, sha, ref or sha, len(wanted), 0, total, True, snapshot)

        missing = [f for f in _unique_blobs(wanted) if not _have_blob(repo, f)]
        on_disk = {f.etag: min(_size_or_none(_partial(repo, f)) or 0, f.size) for f in missing}
        _check_disk(cache_dir, repo_id, sum(f.size - on_disk[f.etag] for f in missing))

        done_bytes = total - sum(f.size for f in wanted if f in missing) + sum(on_disk.values())
        tracker = _Tracker(progress, bytes_total=total, files_total=len(wanted), bytes_done=done_bytes,
                           files_done=len(wanted) - len(missing))
        tracker.report(f"fetching {len(missing)} of {len(wanted)} files")
        stop = threading.Event()

        def stopped() -> bool:
            if not stop.is_set() and should_stop is not None and should_stop():
                stop.set()
            return stop.is_set()

        job = _Job(repo_id, repo, cache_dir, sha, endpoint, headers, token, client, tracker, stopped)
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        _download_all(job, missing, max_workers, stop)

    for file in wanted:
        _link(repo, sha, file)
    if not _as_patterns(include) and not _as_patterns(exclude):
        _write_tree(repo, sha, remote.files)
    if ref is not None:
        _atomic_write(repo / "refs" / ref, sha)   # last: the snapshot only counts once all its files are there
    sweep_partials(cache_dir, repo_id, keep=())
    tracker.report("done")
    log.info("pulled %s@%s: %d files, %d bytes downloaded", repo_id, sha[:12], len(wanted), tracker.downloaded)
    return PullResult(repo_id, sha, ref or sha, len(wanted), tracker.downloaded, total, False, snapshot)


def _unique_blobs(files: list[RemoteFile]) -> list[RemoteFile]:
    """One file per blob (identical files share a blob), largest first so big files start early."""
    seen: dict[str, RemoteFile] = {}
    for f in files:
        seen.setdefault(f.etag, f)
    return sorted(seen.values(), key=lambda f: f.size, reverse=True)


def _download_all(job: _Job, files: list[RemoteFile], max_workers: int, stop: threading.Event) -> None:
    if not files:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(files))),
                            thread_name_prefix="mlxk-pull") as pool:
        futures = [pool.submit(_fetch, job, f) for f in files]
        done, _pending = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() for f in done):
            stop.set()      # the first failure stops the others between chunks; their partials are kept
        wait(futures)
    problems = [f.exception() for f in futures if f.exception() is not None]
    if problems:
        # A real failure explains more than the Cancelled it caused in the other threads.
        problems.sort(key=lambda e: isinstance(e, errors.Cancelled))
        raise problems[0]


def sweep_partials(cache_dir: Path, repo_id: str, *, keep=()) -> int:
    """Delete partial downloads of `repo_id` nobody is writing; keeps mlxk's own `<etag>.incomplete` for `keep`.

    huggingface_hub's `<etag>.<8hex>.incomplete` files are only removed when their blob's lock is free (a live
    `hf download` holds it). Returns the bytes freed.
    """
    from filelock import FileLock, Timeout

    keep = set(keep)
    freed = 0
    for path in cache.incomplete_blobs(cache.repo_dir(cache_dir, repo_id)):
        stem = path.name[: -len(_OUR_PARTIAL)]
        etag, _, suffix = stem.partition(".")
        if not suffix and etag in keep:
            continue
        lock_path = _lock_path(cache_dir, repo_id, etag)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(lock_path), timeout=0):
                size = _size_or_none(path) or 0
                path.unlink(missing_ok=True)
                freed += size
        except Timeout:
            log.debug("not sweeping %s: its download is in progress", path)
    if freed:
        log.info("swept %d bytes of partial downloads of %s", freed, repo_id)
    return freed


# --------------------------------------------------------------------------------------------------------------
# push

HFIGNORE = ".hfignore"
_ALWAYS_SKIPPED = (".git/", ".cache/huggingface/", HFIGNORE)   # what upload_folder never sends, plus .hfignore
_LFS_GUESS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".npz", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024


@dataclass
class _LocalFile:
    path: str           # posix, relative to the workspace
    disk: Path
    size: int
    sha256: str
    git_sha1: str
    lfs: bool


@dataclass
class _RemoteRepo:
    private: bool
    sha: str | None
    files: dict[str, RemoteFile]


def read_hfignore(workspace: Path) -> list[str]:
    """Patterns of `<workspace>/.hfignore`: gitignore-style, one per line, `#` comments, `!` re-includes."""
    try:
        lines = (Path(workspace) / HFIGNORE).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _ignore_match(path: str, pattern: str) -> bool:
    directory_only = pattern.endswith("/")
    pattern = pattern.strip("/") if directory_only else pattern.lstrip("/")
    parts = path.split("/")
    # Which candidates the pattern is tested against: a folder pattern against the file's folders, a file pattern
    # against the file (and its folders, since ignoring a folder ignores what is in it).
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + (0 if directory_only else 1))]
    if "/" in pattern:                      # anchored at the workspace root
        return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)
    return any(fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], pattern) for prefix in prefixes)


def is_ignored(path: str, patterns: list[str]) -> bool:
    if any(path == skip or path.startswith(skip) for skip in _ALWAYS_SKIPPED if skip.endswith("/")) \
            or path == HFIGNORE:
        return True
    ignored = False
    for pattern in patterns:   # gitignore: the last matching pattern wins
        negate = pattern.startswith("!")
        if _ignore_match(path, pattern[1:] if negate else pattern):
            ignored = not negate
    return ignored


def _hash_local(disk: Path, size: int) -> tuple[str, str, bytes]:
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    head = b""
    with open(disk, "rb") as f:
        while data := f.read(CHUNK_SIZE):
            head = head or data[:512]
            sha256.update(data)
            sha1.update(data)
    return sha256.hexdigest(), sha1.hexdigest(), head


def _local_files(workspace: Path) -> list[_LocalFile]:
    patterns = read_hfignore(workspace)
    found = []
    for rel, disk in cache.walk_files(workspace):
        if is_ignored(rel, patterns) or not disk.is_file():
            continue
        size = disk.stat().st_size
        sha256, sha1, head = _hash_local(disk, size)
        lfs = size >= LFS_MIN_SIZE or disk.name.endswith(_LFS_GUESS_SUFFIXES) or b"\0" in head
        found.append(_LocalFile(rel, disk, size, sha256, sha1, lfs))
    return found


def _hf_error(error: Exception, repo_id: str, endpoint: str) -> errors.MlxkError:
    """huggingface_hub's exceptions as mlxk errors (its HTTP errors carry the response)."""
    response = getattr(error, "response", None)
    if response is not None and getattr(response, "status_code", 0) >= 400:
        return _error_for(response, repo_id, endpoint=endpoint, token="set", what=repo_id)
    return errors.HubError(f"push of {repo_id} failed: {error}", repo=repo_id)


def _remote_repo(api, repo_id: str, endpoint: str) -> _RemoteRepo | None:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        info = api.repo_info(repo_id)
    except RepositoryNotFoundError:
        return None
    except HfHubHTTPError as error:
        raise _hf_error(error, repo_id, endpoint) from error
    files: dict[str, RemoteFile] = {}
    if info.sha:
        try:
            for entry in api.list_repo_tree(repo_id, recursive=True, revision=info.sha):
                if hasattr(entry, "blob_id"):
                    lfs = getattr(entry, "lfs", None)
                    files[entry.path] = RemoteFile(entry.path, entry.size, entry.blob_id,
                                                   lfs.sha256 if lfs else None)
        except HfHubHTTPError as error:
            raise _hf_error(error, repo_id, endpoint) from error
    return _RemoteRepo(bool(info.private), info.sha, files)


def _plan(local: list[_LocalFile], remote: _RemoteRepo | None) -> list[dict]:
    plan = []
    for f in local:
        theirs = remote.files.get(f.path) if remote else None
        same = theirs is not None and theirs.size == f.size and (
            theirs.lfs_sha256 == f.sha256 if theirs.lfs_sha256 else theirs.blob_id == f.git_sha1)
        lfs = bool(theirs.lfs_sha256) if same else f.lfs
        plan.append({"path": f.path, "action": "unchanged" if same else "upload", "size": f.size, "lfs": lfs})
    return plan


def _push_token(token: str | None, repo_id: str) -> str:
    token = _token(token)
    if not token:
        raise errors.AuthError(f"pushing to {repo_id} needs a Hugging Face token with write access: set HF_TOKEN "
                               "or run `hf auth login`.", repo=repo_id)
    return token


def push(workspace: Path, repo_id: str, *, private: bool = False, public: bool = False, dry_run: bool = False,
         endpoint: str, token: str | None = None, message: str | None = None, progress: ProgressFn | None = None,
         should_stop: StopFn | None = None) -> PushResult:
    """Upload a flat workspace to `repo_id` (only what changed); refuses to publish anything by accident.

    A new repo is created private with private=True, public with public=True, and not at all with neither. An
    existing public repo is only written to with public=True. dry_run compares against the remote and writes
    nothing anywhere.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    names.validate_repo_id(repo_id)
    workspace = Path(workspace)
    if not workspace.is_dir():
        raise errors.ModelNotFound(f"workspace {workspace} does not exist or is not a folder.", name=str(workspace))
    if private and public:
        raise errors.ConfigError("choose one of --private and --public.")
    token = _push_token(token, repo_id)
    endpoint = endpoint.rstrip("/")
    # Xet uploads need a CAS server; the LFS batch API works against the Hub and any Hub-compatible server.
    constants.HF_HUB_DISABLE_XET = True
    api = HfApi(endpoint=endpoint, token=token)
    url = f"{endpoint}/{repo_id}"

    remote = _remote_repo(api, repo_id, endpoint)
    if remote is not None and not remote.private and not public:
        raise errors.Conflict(f"{repo_id} already exists and is PUBLIC; mlxk will not upload into a public repo "
                              "unless you say so: add --public (or push to a new name with --private).",
                              repo=repo_id, url=url)
    if remote is None and not (private or public):
        raise errors.Conflict(f"{repo_id} does not exist yet: add --private to create it as a private repo "
                              "(or --public to publish it).", repo=repo_id)
    local = _local_files(workspace)
    if not local:
        raise errors.ConfigError(f"nothing to push: {workspace} has no files (after {HFIGNORE}).")
    plan = _plan(local, remote)
    uploads = [f for f, step in zip(local, plan) if step["action"] == "upload"]
    upload_bytes = sum(f.size for f in uploads)
    is_private = remote.private if remote else private
    if dry_run:
        return PushResult(repo_id, url, remote.sha if remote else None, False, is_private, True, plan, 0)
    if should_stop is not None and should_stop():
        raise errors.Cancelled(f"push of {repo_id} cancelled before anything was uploaded.")

    if progress:
        progress(Progress(0, upload_bytes, 0, len(uploads), f"uploading {len(uploads)} files"))
    try:
        created = remote is None
        if created:
            api.create_repo(repo_id, private=private, exist_ok=False)
        revision = remote.sha if remote else None
        if uploads:
            revision = _commit(api, repo_id, uploads, message, parent=remote.sha if remote else None)
        elif revision is None:
            revision = api.repo_info(repo_id).sha
    except HfHubHTTPError as error:
        raise _hf_error(error, repo_id, endpoint) from error
    if progress:
        progress(Progress(upload_bytes, upload_bytes, len(uploads), len(uploads), "done"))
    log.info("pushed %s: %d files uploaded (%d bytes), revision %s", repo_id, len(uploads), upload_bytes,
             revision)
    return PushResult(repo_id, url, revision, created, is_private, False, plan, upload_bytes)


def _commit(api, repo_id: str, uploads: list[_LocalFile], message: str | None, *, parent: str | None) -> str:
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.disk)) for f in uploads]
    summary = message or f"Upload {len(uploads)} file{'s' if len(uploads) != 1 else ''} with mlxk"
    # parent_commit: a concurrent push to the same branch makes this one fail instead of silently interleaving.
    info = api.create_commit(repo_id, operations, commit_message=summary, parent_commit=parent)
    return info.oid


def check_workspace(workspace: Path) -> list:
    """Offline integrity findings of a folder about to be pushed ([] = healthy): `push --check-only`."""
    from mlxk import health

    workspace = Path(workspace)
    return health.check_integrity(health.inspect_dir(workspace, workspace.name))
