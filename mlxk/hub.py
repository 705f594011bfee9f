"""Pull and push against the Hugging Face Hub, as plain domain functions the job queue calls.

Why our own fetcher: huggingface_hub 2.4 restarts every download from zero in a new process and orphans its
`<etag>.<8hex>.incomplete` files, and it checks plain-HTTP downloads by size only. A job queue whose worker gets
killed and whose job is retried needs downloads that resume across processes and bytes that are verified. So
`pull` lists the files itself (revision + tree API) and writes the standard cache layout the way huggingface_hub
does — `blobs/<etag>`, relative `snapshots/<sha>/<path>` links, `refs/<ref>` written last — into a stable
`blobs/<etag>.incomplete` that a later process finds and continues with `Range`. It takes huggingface_hub's own
per-blob lock files, so a concurrent `hf download` of the same blob waits instead of colliding.

The Hub is untrusted input (DESIGN, trust boundaries): `validate_files` checks every path, oid and size of the listing
before the first write, so no answer can make pull write, link or lock outside the repo's folder. A snapshot is
built in `<repo>/.staging/<sha>.<pid>-<tid>` and published by one rename, `refs/<ref>` last, so a killed or failed pull
never shows a half-written snapshot. Test-only pause points (mlxk.faults): `pull.part` (every connection of a file
split into ranged parts has written its first chunk), `pull.linking` (one link staged), `pull.publishing` (staged,
not published), `pull.ref` (published, ref not written).

Large files come over several ranged connections at once (see "Fetching one large file" below), and `max_rate`
caps a pull's bandwidth across all of them.

Push goes through huggingface_hub's `HfApi` (create_repo + create_commit); only the policy (private/public,
.hfignore, dry-run planning, token) is ours.
"""
from __future__ import annotations

import ctypes
import errno
import fnmatch
import hashlib
import http.client
import json
import logging
import os
import platform
import queue
import re
import shutil
import struct
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import quote, urljoin, urlsplit
from urllib.request import getproxies_environment, proxy_bypass_environment

from mlxk import __version__, cache, errors, names
from mlxk.config import settings
from mlxk.faults import checkpoint

log = logging.getLogger("mlxk.hub")

CHUNK_SIZE = 4 * 1024 * 1024        # bytes per read of a local file (hashing what is already on disk)
SINK_BUFFER = 256 * 1024            # bytes per write + hash of a download: small enough to stay in the CPU's cache
PROGRESS_INTERVAL_S = 0.25
RETRIES = 5                         # dropped connections retried (with Range) within one call
RETRY_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0)
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
_SHA40 = re.compile(r"^[0-9a-f]{40}$")
_SHA64 = re.compile(r"^[0-9a-f]{64}$")
NAME_MAX = 255                      # bytes per path component, where the filesystem does not say (pathconf)
PATH_MAX = 4096
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
    return settings().hf_token


def _headers(token: str | None) -> dict[str, str]:
    """The headers of every Hub request: mlxk's user agent, and the token only when mlxk.config chose one.

    Built here rather than with huggingface_hub's build_hf_headers: that one costs an import of ~0.4 s CPU and,
    once a day per HF_HOME, a request for its agent-detection registry, all before a pull's first byte; and it
    names the caller "unknown/None"."""
    headers = {"user-agent": f"mlxk/{__version__}; python/{platform.python_version()}",
               "accept-encoding": "identity"}   # sizes and Range offsets are about the stored bytes
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


def _client(max_connections: int = 64):
    import httpx  # lazy: keeps `mlxk pull` light

    return httpx.Client(follow_redirects=False,
                        timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=32))


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
    import httpx  # lazy: keeps `mlxk pull` light

    try:
        response = client.get(url, headers=headers, params=params)
    except httpx.HTTPError as error:
        raise _unreachable(endpoint, error) from error
    if response.status_code != 200:
        raise _error_for(response, repo_id, endpoint=endpoint, token=token, revision=revision)
    return response


def _revision_info(client, repo_id: str, revision: str, *, endpoint: str, headers, token) -> dict:
    url = f"{endpoint}/api/models/{repo_id}/revision/{quote(revision, safe='')}"
    info = _json(_get_json(client, url, headers=headers, repo_id=repo_id, endpoint=endpoint, token=token,
                           revision=revision), repo_id, "revision info")
    if not isinstance(info, dict) or not _SHA40.match(str(info.get("sha", ""))):
        raise errors.HubError(f"the Hub did not say which commit {repo_id}@{revision} is (no sha in its answer).",
                              repo=repo_id)
    return info


def _json(response, repo_id: str, what: str):
    try:
        return response.json()
    except ValueError:
        raise errors.InvalidHubReply(f"the Hub's {what} for {repo_id} is not valid JSON; nothing was written. "
                                     "Check HF_ENDPOINT, or try again later.", repo=repo_id) from None


def _tree(client, repo_id: str, sha: str, *, endpoint: str, headers, token) -> list[RemoteFile]:
    """Every file of commit `sha`, as the Hub lists it: unchecked; `validate_files` runs before anything is written."""
    url = f"{endpoint}/api/models/{repo_id}/tree/{sha}"
    params = {"recursive": "true", "expand": "false"}
    files: list[RemoteFile] = []
    while url:
        response = _get_json(client, url, headers=headers, repo_id=repo_id, endpoint=endpoint, token=token,
                             revision=sha, params=params)
        entries = _json(response, repo_id, "file listing")
        if not isinstance(entries, list):
            raise _invalid(repo_id, sha, _NO_FILE, "the file listing is not a list")
        files += [f for f in (_entry_file(e, repo_id, sha) for e in entries) if f is not None]
        url = response.links.get("next", {}).get("url")
        if url and _origin(urljoin(endpoint, url)) != _origin(endpoint):
            # The next page would get our token: only the Hub itself may be asked.
            raise _invalid(repo_id, sha, _NO_FILE, f"its next page is on another server ({_origin(url)[1]})")
        url = url and urljoin(endpoint, url)
        params = None   # the next-page link carries its own query
    return files


def _entry_file(entry, repo_id: str, sha: str) -> RemoteFile | None:
    """A tree entry as a RemoteFile (None for folders); values are kept as sent, for validate_files to judge."""
    if not isinstance(entry, dict):
        raise _invalid(repo_id, sha, _NO_FILE, f"an entry of its file listing is not an object: {str(entry)[:80]!r}")
    if entry.get("type") != "file":
        return None
    lfs = entry.get("lfs")
    lfs_oid = (lfs.get("oid") or lfs.get("sha256") or "") if isinstance(lfs, dict) else lfs
    return RemoteFile(entry.get("path"), entry.get("size"), entry.get("oid"), lfs_oid)


def _check_access(client, repo_id: str, sha: str, file: RemoteFile, *, endpoint: str, headers, token) -> None:
    """Gated repos answer info and tree publicly; only /resolve tells whether we may download."""
    import httpx  # lazy: keeps `mlxk pull` light

    url = _resolve_url(endpoint, repo_id, sha, file.path)
    try:
        response = client.head(url, headers=headers)
    except httpx.HTTPError as error:
        raise _unreachable(endpoint, error) from error
    if response.status_code >= 400:
        raise _error_for(response, repo_id, endpoint=endpoint, token=token, revision=sha, what=file.path)


# --------------------------------------------------------------------------------------------------------------
# File bodies: stdlib http.client, read straight into our buffers


# httpx reads a body 64 KiB at a time through httpcore and h11 (several Python calls and copies per read); at
# loopback or 10 Gb/s speeds that costs as much CPU as sha256 itself. File bodies therefore come over plain
# http.client connections (keep-alive, one idle list per origin) read with `readinto1` into a preallocated buffer:
# one system call and no copy per read. The listing and every JSON call stay on httpx. When an HTTP(S) proxy
# applies (HTTP_PROXY/HTTPS_PROXY/ALL_PROXY, minus NO_PROXY), bodies go through the httpx client instead, which
# honours the proxy settings the same way the rest of the pull does.

_REDIRECTS = (301, 302, 303, 307, 308)


class _Origins:
    """Idle keep-alive http.client connections of one pull, per (scheme, host:port)."""

    def __init__(self):
        self._idle: dict[tuple[str, str], list] = {}
        self._lock = threading.Lock()
        self._ssl = None

    def take(self, scheme: str, netloc: str):
        """(connection, reused): an idle connection to the origin, or a new one (connected lazily)."""
        with self._lock:
            idle = self._idle.get((scheme, netloc))
            if idle:
                return idle.pop(), True
            if scheme == "https" and self._ssl is None:
                import httpx

                self._ssl = httpx.create_ssl_context()   # certifi + SSL_CERT_FILE/SSL_CERT_DIR, as httpx does
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=CONNECT_TIMEOUT_S, context=self._ssl), False
        return http.client.HTTPConnection(netloc, timeout=CONNECT_TIMEOUT_S), False

    def give_back(self, scheme: str, netloc: str, conn) -> None:
        with self._lock:
            self._idle.setdefault((scheme, netloc), []).append(conn)

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


def _proxied(url: str) -> bool:
    """True when the environment routes `url` through a proxy (then httpx carries the body)."""
    parts = urlsplit(url)
    proxies = getproxies_environment()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not proxy_bypass_environment(parts.hostname or "", proxies)


class _Body:
    """One response from a file GET: `status_code`, `headers` (case-insensitive `get`), `readinto(view)` -> bytes
    read (at least 1; only what has arrived, so progress and cancel stay live), `read()` for a small error body,
    `close()`. Transport failures raise _Transient; the connection goes back to its pool only when the body was
    read to its end."""

    def __init__(self, origins: _Origins, origin: tuple[str, str], conn, response):
        self._origins, self._origin, self._conn, self._response = origins, origin, conn, response
        self.status_code = response.status
        self.headers = response.headers
        # Content-Length bodies are read from the socket file directly (readinto1: what has arrived, without
        # waiting to fill the buffer); chunked or unsized ones through http.client's own readinto.
        self._left = None if response.chunked else response.length

    def readinto(self, view) -> int:
        try:
            if self._left is None:
                n = self._response.readinto(view)
                if n == 0:
                    raise _Transient("connection closed before the end of the body")
                return n
            if self._left == 0:
                raise _Transient("read past the end of the body")
            n = self._response.fp.readinto1(view[:self._left])
        except (OSError, http.client.HTTPException) as error:
            raise _Transient(f"{type(error).__name__}: {error}") from error
        if n == 0:
            raise _Transient(f"connection closed with {self._left} bytes of the body missing")
        self._left -= n
        return n

    @property
    def finished(self) -> bool:
        return self._left == 0 or (self._left is None and self._response.isclosed())

    def read(self) -> bytes:
        try:
            if self._left is None:
                return self._response.read()
            data = self._response.fp.read(self._left)
            self._left -= len(data)
            return data
        except (OSError, http.client.HTTPException) as error:
            raise _Transient(f"{type(error).__name__}: {error}") from error

    def close(self) -> None:
        done = self.finished and not self._response.will_close
        self._response.close()
        if done:
            self._origins.give_back(*self._origin, self._conn)
        else:
            self._conn.close()


class _HttpxBody:
    """The same interface over an httpx streaming response (used when a proxy applies)."""

    def __init__(self, response):
        self._response = response
        self.status_code = response.status_code
        self.headers = response.headers
        self._chunks = response.iter_raw()
        self._spare = b""

    def readinto(self, view) -> int:
        import httpx

        if not self._spare:
            try:
                self._spare = next(self._chunks, b"")
            except httpx.TransportError as error:
                raise _Transient(f"{type(error).__name__}: {error}") from error
            if not self._spare:
                raise _Transient("connection closed before the end of the body")
        n = min(len(view), len(self._spare))
        view[:n] = self._spare[:n]
        self._spare = self._spare[n:]
        return n

    @property
    def finished(self) -> bool:
        """True when nothing is left of the body (reads ahead to find out)."""
        import httpx

        if not self._spare:
            try:
                self._spare = next(self._chunks, b"")
            except httpx.TransportError as error:
                raise _Transient(f"{type(error).__name__}: {error}") from error
        return not self._spare

    def read(self) -> bytes:
        import httpx

        try:
            return self._response.read()
        except httpx.TransportError as error:
            raise _Transient(f"{type(error).__name__}: {error}") from error

    def close(self) -> None:
        self._response.close()


def _get(job: "_Job", url: str, headers: dict):
    """One GET of a file URL, without following redirects: a _Body or an _HttpxBody."""
    if _proxied(url):
        import httpx

        try:
            request = job.client.build_request("GET", url, headers=headers)
            return _HttpxBody(job.client.send(request, stream=True))
        except httpx.TransportError as error:
            raise _Transient(f"{type(error).__name__}: {error}") from error
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise errors.HubError(f"the Hub sent a download URL that is neither http nor https: {url[:200]}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    origin = (parts.scheme, parts.netloc)
    for attempt in range(2):
        conn, reused = job.origins.take(*origin)
        try:
            if conn.sock is None:
                conn.connect()
                conn.sock.settimeout(READ_TIMEOUT_S)
            conn.request("GET", target, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as error:
            conn.close()
            if reused and attempt == 0:
                continue      # the server closed an idle keep-alive connection: once more on a new one
            raise _Transient(f"{type(error).__name__}: {error}") from error
        return _Body(job.origins, origin, conn, response)
    raise AssertionError("unreachable")


def _resolve_url(endpoint: str, repo_id: str, sha: str, path: str) -> str:
    return f"{endpoint}/{repo_id}/resolve/{sha}/{quote(path)}"


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


# --------------------------------------------------------------------------------------------------------------
# The Hub is untrusted input: every path, oid and size it sends is checked before anything is written


_NO_FILE = object()


def _invalid(repo_id: str, sha: str, path, problem: str) -> errors.InvalidHubReply:
    """`path`: the file the problem is about (any value the Hub sent), or _NO_FILE."""
    file = {} if path is _NO_FILE else {"file": path if isinstance(path, str) else repr(path)}
    where = f"file {path!r} " if file else ""
    return errors.InvalidHubReply(
        f"the Hub's answer for {repo_id}@{sha[:12]} is invalid: {where}{problem}. Nothing was written. The repo (or "
        "the server at HF_ENDPOINT) is broken or hostile: tell its owner; a pull from it cannot succeed.",
        repo=repo_id, revision=sha, **file, problem=problem)


def _fs_limits(repo: Path) -> tuple[int, int]:
    """(longest name, longest path) in bytes on the filesystem that will hold the snapshot."""
    where = _existing_parent(repo)
    limits = []
    for name, fallback in (("PC_NAME_MAX", NAME_MAX), ("PC_PATH_MAX", PATH_MAX)):
        try:
            limits.append(min(os.pathconf(where, name), fallback))
        except (OSError, ValueError):
            limits.append(fallback)
    return limits[0], limits[1]


def path_problem(path, *, name_max: int = NAME_MAX) -> str | None:
    """Why `path` cannot be a file of a snapshot (None when it can): the rules huggingface_hub also enforces, plus
    what the filesystem would refuse half-way through writing."""
    if not isinstance(path, str):
        return "its path is missing or not a string"
    if not path:
        return "its path is empty"
    try:
        encoded_parts = [part.encode("utf-8") for part in path.split("/")]
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        return "it contains a NUL or another control character"
    if "\\" in path:
        return "it contains a backslash"
    if path.startswith("/"):
        return "it is an absolute path"
    if any(part in (b"", b".", b"..") for part in encoded_parts):
        return "it has an empty, '.' or '..' part"
    longest = max(len(part) for part in encoded_parts)
    if longest > name_max:
        return f"a part of it is {longest} bytes long; the filesystem allows {name_max}"
    return None


def _oid_problem(file: RemoteFile) -> str | None:
    if not isinstance(file.blob_id, str) or not _SHA40.match(file.blob_id):
        return f"its oid {str(file.blob_id)[:80]!r} is not a 40-hex git blob id"
    if file.lfs_sha256 is not None and (not isinstance(file.lfs_sha256, str) or not _SHA64.match(file.lfs_sha256)):
        return f"its LFS oid {str(file.lfs_sha256)[:80]!r} is not a 64-hex sha256"
    if not isinstance(file.size, int) or isinstance(file.size, bool) or file.size < 0:
        return f"its size {str(file.size)[:40]!r} is not a non-negative integer"
    return None


def validate_files(repo_id: str, sha: str, files: list[RemoteFile], *, repo: Path) -> None:
    """Raise InvalidHubReply naming the first file of `files` that pull could not write safely inside `repo`.

    Each path must be relative, without '.', '..', empty parts, NUL/control characters or backslashes, with parts
    the filesystem accepts, and land inside the snapshot; no path may run through another listed file or be listed
    twice; oids are 40-hex (git) or 64-hex (sha256), sizes non-negative integers. So no name the Hub sends can make
    pull write, link or lock anything outside the repo's folder, or fail half-way on a name the disk refuses.
    """
    name_max, path_max = _fs_limits(repo)
    snapshot = os.fspath(_staging(Path(os.path.abspath(repo)), sha))   # deeper than snapshots/<sha>: the bound
    seen: set[str] = set()
    for file in files:
        problem = path_problem(file.path, name_max=name_max) or _oid_problem(file)
        if problem is None:
            target = os.path.normpath(os.path.join(snapshot, file.path))
            if not cache.is_inside(target, snapshot) or target == snapshot:
                problem = "it leads outside the snapshot"
            elif len(os.fsencode(target)) >= path_max:
                problem = f"the path in the cache would be longer than the {path_max} bytes the filesystem allows"
            elif file.path in seen:
                problem = "it is listed twice"
        if problem:
            raise _invalid(repo_id, sha, file.path, problem)
        seen.add(file.path)
    for file in files:
        parts = file.path.split("/")
        through = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in seen), None)
        if through is not None:
            raise _invalid(repo_id, sha, file.path, f"its path runs through the file {through!r}")


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
    connections: int = 1                # ranged connections per large file
    rate: "_RateLimit | None" = None    # the pull's bandwidth cap, shared by all its connections
    origins: _Origins = field(default_factory=_Origins)   # keep-alive connections for file bodies
    direct: dict = field(default_factory=dict)   # etag -> (URL, headers) the file's redirects ended at


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
    """Download `file` into blobs/<etag> (resuming blobs/<etag>.incomplete), verified, under the blob's lock.

    An OSError of the cache's disk (lock, partial, rename) is a CacheError naming the file, never a raw error."""
    try:
        _fetch_locked(job, file)
    except OSError as error:
        raise _write_error(job.repo_id, job.sha, file.path, error) from error


def _fetch_locked(job: _Job, file: RemoteFile) -> None:
    from filelock import FileLock  # lazy: keeps `mlxk pull` light

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
        have = _resume_parts(job, file, partial, verifier)
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


def _resume_parts(job: _Job, file: RemoteFile, partial: Path, verifier: _Verifier) -> int:
    """Bring `partial` to a contiguous, hashed prefix; large files go over several connections first.

    Returns the prefix length; one connection continues from there (nothing left when the parts finished)."""
    record = _parts_path(partial)
    parts = _read_parts(record, file.size) if partial.exists() else None
    if parts is None:
        record.unlink(missing_ok=True)   # absent, torn or stale: the partial counts as a plain prefix
    have = _size_or_none(partial) or 0
    if parts is None and have > file.size:
        partial.unlink()
        have = 0
    if parts is None and job.connections > 1 and file.size - have >= 2 * PART_SIZE:
        parts = _plan_parts(file.size, have, job.connections)
    if parts is None:
        if have:
            _hash_existing(partial, verifier, have)    # resume: the hash covers the bytes already on disk
        return have
    prefix, ranged = _fetch_parts(job, file, partial, verifier, parts)
    if not ranged:
        log.info("server ignores ranged requests for %s; one connection continues at byte %d", file.path, prefix)
        job.tracker.add(prefix - sum(p.done for p in parts), network=False)
        os.truncate(partial, prefix)
    record.unlink(missing_ok=True)
    return prefix


def _acquire(job: _Job, lock, file: RemoteFile) -> None:
    """Wait for the blob's lock (an `hf download` of the same blob may hold it), staying cancellable."""
    from filelock import Timeout  # lazy: keeps `mlxk pull` light

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
        _parts_path(partial).unlink(missing_ok=True)
        what = "sha256" if file.lfs_sha256 else "git blob sha1"
        got = f"{size} bytes" if size != file.size else f"{what} {verifier.hash.hexdigest()}"
        raise errors.IntegrityError(
            f"{file.path} of {job.repo_id}@{job.sha[:12]} arrived corrupted: expected {file.size} bytes with "
            f"{what} {verifier.expected()}, got {got}. The bad download was deleted; pull again.",
            repo=job.repo_id, file=file.path)
    os.replace(partial, blob)
    job.tracker.file_done(file.path)


def _open_stream(job: _Job, file: RemoteFile, have: int, end: int | None = None):
    """GET the file from `have` on (to `end`, exclusive, for one part): a _Body. Follows redirects by hand so the
    token never goes to another origin.

    The URL a file's redirects end at (the CDN's presigned URL) is remembered for the file's other parts, so
    each part costs one request instead of a round trip to the Hub first; when that URL is refused (expired:
    401/403/404/410), the part goes through the Hub again."""
    span = {}
    if end is not None:
        span["range"] = f"bytes={have}-{end - 1}"
    elif have:
        span["range"] = f"bytes={have}-"
    known = job.direct.get(file.etag)
    if known is not None:
        url, headers = known
        response = _get(job, url, {**headers, **span})
        if response.status_code not in (401, 403, 404, 410, *_REDIRECTS):
            return response
        _drain(response)
        job.direct.pop(file.etag, None)
    url = _resolve_url(job.endpoint, job.repo_id, job.sha, file.path)
    headers = dict(job.headers)
    for hop in range(5):
        response = _get(job, url, {**headers, **span})
        if response.status_code not in _REDIRECTS:
            if hop and response.status_code in (200, 206):
                job.direct[file.etag] = (url, headers)
            return response
        location = urljoin(url, response.headers.get("location", ""))
        _drain(response)
        if _origin(location) != _origin(url):
            # The CDN URL is presigned; the Hub token must not leak to it.
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        url = location
    raise errors.HubError(f"too many redirects while downloading {file.path} of {job.repo_id}.", repo=job.repo_id)


def _drain(response) -> None:
    """Read a redirect's or refusal's small body and close it, so its connection can be kept."""
    try:
        response.read()
    finally:
        response.close()


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
            try:
                buffer = sink.buffer()     # filled by the network, written and hashed in SINK_BUFFER blocks
                filled = 0
                last_flush = time.monotonic()
                while have + filled < file.size:
                    n = response.readinto(memoryview(buffer)[filled:min(len(buffer), file.size - have)])
                    if job.rate is not None:
                        job.rate.take(n)
                    filled += n
                    if filled == len(buffer) or time.monotonic() - last_flush >= PROGRESS_INTERVAL_S:
                        sink.put(buffer, filled)
                        have += filled
                        job.tracker.add(filled)
                        buffer, filled, last_flush = sink.buffer(), 0, time.monotonic()
                        if job.stopped():
                            raise errors.Cancelled(f"pull of {job.repo_id} cancelled; {file.path} is kept at "
                                                   f"{_fmt(have)} of {_fmt(file.size)} and a later pull resumes.")
            finally:
                try:
                    if filled:      # what did arrive before a drop is kept, as the bytes before it are
                        sink.put(buffer, filled)
                        have += filled
                        job.tracker.add(filled)
                finally:
                    sink.close()    # every byte counted in `have` is on disk and hashed before we go on
        if not response.finished:
            raise _Transient("server sent more bytes than the file has")
        return have
    finally:
        response.close()


class _Sink:
    """Writes and hashes in its own thread, so the next network read overlaps them (both release the GIL).

    BUFFERS buffers of SINK_BUFFER bytes go round: `buffer()` hands out a free one (waiting while all are
    queued), `put()` queues one with its filled length, and the thread hands it back once written and hashed."""

    BUFFERS = 8

    def __init__(self, out, verifier: _Verifier, job: _Job, partial: Path):
        self._queue: queue.Queue = queue.Queue()
        self._free: queue.Queue = queue.Queue()
        for _ in range(self.BUFFERS):
            self._free.put(bytearray(SINK_BUFFER))
        self._error: BaseException | None = None
        self._args = (out, verifier, job, partial)
        self._thread = threading.Thread(target=self._run, name="mlxk-pull-sink", daemon=True)
        self._thread.start()

    def buffer(self) -> bytearray:
        return self._free.get()

    def put(self, data: bytearray, n: int) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((data, n))

    def _run(self) -> None:
        out, verifier, job, partial = self._args
        while (item := self._queue.get()) is not None:
            data, n = item
            if self._error is None:
                try:
                    view = memoryview(data)[:n]
                    _write(out, view, job, partial)
                    verifier.update(view)
                except BaseException as error:   # handed to the download thread by put()/close()
                    self._error = error
            self._free.put(data)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _write(out, data: bytes, job: _Job, partial: Path) -> None:
    try:
        out.write(data)
    except OSError as error:
        raise _write_failure(error, job, partial) from error


def _write_failure(error: OSError, job: _Job, partial: Path) -> errors.MlxkError:
    """The typed error for a failed write into a partial download (a full disk, a read-only cache, ...)."""
    if error.errno == errno.ENOSPC:
        return errors.DiskFull(f"the disk holding {job.cache_dir} filled up while downloading {job.repo_id}; "
                               f"the partial download {partial.name} is kept. Free some space and pull again "
                               "to resume.", path=str(partial))
    return errors.CacheError(f"cannot write {partial} while downloading {job.repo_id}: "
                             f"{error.strerror or error}. Check the disk and the permissions of HF_HUB_CACHE, then "
                             "pull again to resume.", repo=job.repo_id, path=str(partial))


# --------------------------------------------------------------------------------------------------------------
# Fetching one large file over several ranged connections


# A CDN caps each connection, so a large file is split into parts of PART_SIZE, each one `Range: bytes=a-b` request,
# fetched over `connections` connections at once, lowest offsets first, and written in place (pwrite) into the same
# `<etag>.incomplete`. The progress of every part lives in `<etag>.incomplete.parts` (fixed binary records; one
# 8-byte pwrite per chunk, after the data's own write), so a killed process resumes each part exactly where its
# recorded bytes end. The hash cannot be fed out of order: a hasher thread follows the contiguous prefix that is on
# disk, reading it back from the page cache while the download goes on; since parts are taken in order, it trails
# the download by about `connections` parts, and no second pass over the whole file follows the last byte.
# Test-only pause point: `pull.part` (every connection has written its first chunk).

PARTS_SUFFIX = ".parts"
PART_SIZE = 16 * 1024 * 1024        # one ranged request; a file of less than two goes over one connection
TAIL_PART = 4 * 1024 * 1024        # the parts of a large file's last connections x PART_SIZE bytes
PART_FLUSH = 256 * 1024             # bytes a part holds before writing and recording them: what a kill re-fetches
_PARTS_MAGIC = b"MLXKPRT1"
_PARTS_HEAD = struct.Struct("<8sQI")
_PART = struct.Struct("<QQQ")       # start, end (exclusive), bytes done


class _RangesIgnored(Exception):
    """The server answered a ranged request with the whole file: fall back to one connection."""


class _RateLimit:
    """One bandwidth cap shared by every connection of a pull (`--max-rate`): virtual scheduling, ~0.25 s burst."""

    def __init__(self, bytes_per_s: float):
        self.rate = float(bytes_per_s)
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now - 0.25) + n / self.rate
            delay = self._next - now
        if delay > 0:
            time.sleep(delay)


@dataclass
class _Part:
    index: int
    start: int
    end: int
    done: int

    @property
    def pos(self) -> int:
        return self.start + self.done


def _parts_path(partial: Path) -> Path:
    return partial.with_name(partial.name + PARTS_SUFFIX)


def _plan_parts(size: int, have: int, connections: int = 1) -> list[_Part]:
    """[0, have) is one finished part; the rest is split into parts of PART_SIZE to 2 x PART_SIZE bytes, except
    the last `connections` x PART_SIZE bytes, which come in parts of TAIL_PART: parts are taken in order, so at
    the end every connection is busy with a small part instead of one connection finishing a big one alone while
    the others idle (through a CDN that caps each connection, that last part would run at one connection's rate)."""
    tail = 0
    if connections > 1 and PART_SIZE > TAIL_PART:
        tail = min(connections * PART_SIZE, (size - have) // 2)
        tail -= tail % TAIL_PART
    bounds = _split(have, size - tail, PART_SIZE) + (_split(size - tail, size, TAIL_PART)[1:] if tail else [])
    parts = [_Part(0, 0, have, have)] if have else []
    parts += [_Part(0, a, b, 0) for a, b in zip(bounds, bounds[1:])]
    for i, part in enumerate(parts):
        part.index = i
    return parts


def _split(start: int, end: int, size: int) -> list[int]:
    """Bounds that cut [start, end) into max(1, length // size) near-equal pieces."""
    count = max(1, (end - start) // size)
    return [start + (end - start) * i // count for i in range(count + 1)]


def _read_parts(path: Path, size: int | None) -> list[_Part] | None:
    """The parts recorded beside a partial; None when absent or not a consistent cover of [0, size) (of the
    recorded size when `size` is None)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        magic, recorded, count = _PARTS_HEAD.unpack_from(data)
        parts = [_Part(i, *_PART.unpack_from(data, _PARTS_HEAD.size + i * _PART.size)) for i in range(count)]
    except struct.error:
        return None
    size = recorded if size is None else size
    edges = [p.start for p in parts] + [size]
    if magic != _PARTS_MAGIC or recorded != size or not parts or edges[0] != 0 or \
            any(p.end != edges[i + 1] or not 0 <= p.done <= p.end - p.start for i, p in enumerate(parts)):
        return None
    return parts


def partial_bytes(partial: Path, size: int | None = None) -> int:
    """Bytes of `partial` that are really downloaded: the parts' sum when split, else its length."""
    have = _size_or_none(partial) or 0
    parts = _read_parts(_parts_path(partial), size) if _parts_path(partial).exists() else None
    return sum(p.done for p in parts) if parts else min(have, have if size is None else size)


class _PartsFile:
    """The `.parts` record, open for in-place updates of each part's `done` counter."""

    def __init__(self, path: Path, size: int, parts: list[_Part]):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        head = _PARTS_HEAD.pack(_PARTS_MAGIC, size, len(parts))
        os.pwrite(self.fd, head + b"".join(_PART.pack(p.start, p.end, p.done) for p in parts), 0)

    def record(self, part: _Part) -> None:
        os.pwrite(self.fd, struct.pack("<Q", part.done), _PARTS_HEAD.size + part.index * _PART.size + 16)

    def close(self) -> None:
        os.close(self.fd)


def _frontier(parts: list[_Part]) -> int:
    """End of the contiguous downloaded prefix."""
    for part in parts:
        if part.pos < part.end:
            return part.pos
    return parts[-1].end


class _FollowHasher:
    """Hashes the contiguous prefix as it grows, from the page cache, in its own thread."""

    def __init__(self, fd: int, verifier: _Verifier, parts: list[_Part]):
        self.fd, self.verifier, self.parts = fd, verifier, parts
        self.hashed = 0
        self._buffer = bytearray(SINK_BUFFER)   # read back and hashed while still in the CPU's cache
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="mlxk-pull-hash", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        with self._wake:
            self._wake.notify()

    def _catch_up(self) -> None:
        target = _frontier(self.parts)
        view = memoryview(self._buffer)
        while self.hashed < target:
            n = os.preadv(self.fd, [view[:min(len(view), target - self.hashed)]], self.hashed)
            if not n:
                break
            self.verifier.update(view[:n])
            self.hashed += n

    def _run(self) -> None:
        while True:
            self._catch_up()
            with self._wake:
                if self._closing:
                    break
                self._wake.wait(0.5)
        self._catch_up()

    def close(self) -> int:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        return self.hashed


def _fetch_parts(job: _Job, file: RemoteFile, partial: Path, verifier: _Verifier,
                 parts: list[_Part]) -> tuple[int, bool]:
    """Fetch every unfinished part, `job.connections` at a time, lowest offsets first (so the hashed prefix keeps
    up). Returns (the contiguous prefix downloaded and hashed, True), or (that prefix, False) when the server sends
    whole files for ranged requests and one connection must finish."""
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    record = _PartsFile(_parts_path(partial), file.size, parts)
    hasher = _FollowHasher(fd, verifier, parts)
    todo = queue.SimpleQueue()
    for part in parts:
        if part.pos < part.end:
            todo.put(part)
    lanes = max(1, min(job.connections, todo.qsize()))
    started = _Countdown(lanes)
    halt = threading.Event()
    problems: list[BaseException] = []
    try:
        with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="mlxk-pull-part") as pool:
            futures = [pool.submit(_lane, job, file, fd, record, hasher, todo, started, halt) for _ in range(lanes)]
            done, _pending = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in done):
                halt.set()    # the others stop at their next chunk; what they wrote is recorded
            wait(futures)
        problems = [f.exception() for f in futures if f.exception() is not None]
    finally:
        hashed = hasher.close()
        record.close()
        os.close(fd)
    if any(isinstance(e, _RangesIgnored) for e in problems):
        return hashed, False
    if problems:
        # A real failure explains more than the stops and cancels it caused in the other parts.
        problems.sort(key=lambda e: 2 if isinstance(e, _PartStopped) else isinstance(e, errors.Cancelled))
        raise problems[0]
    return hashed, True


class _PartStopped(Exception):
    """A sibling part failed; this part stopped with its progress recorded."""


class _Countdown:
    """`pull.part` pauses once, when every connection has written its first chunk (tests kill -9 there)."""

    def __init__(self, n: int):
        self._left, self._lock = n, threading.Lock()

    def one(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            checkpoint("pull.part")


def _lane(job: _Job, file: RemoteFile, fd: int, record: _PartsFile, hasher: _FollowHasher, todo: queue.SimpleQueue,
          started: _Countdown, halt: threading.Event) -> None:
    """One connection: takes the next unfinished part until none is left."""
    first: _Countdown | None = started
    while not halt.is_set():
        try:
            part = todo.get_nowait()
        except queue.Empty:
            break
        _fetch_part(job, file, fd, record, hasher, part, first, halt)
        first = None
    if first is not None:
        first.one()


def _fetch_part(job: _Job, file: RemoteFile, fd: int, record: _PartsFile, hasher: _FollowHasher, part: _Part,
                started: _Countdown | None, halt: threading.Event) -> None:
    for attempt in range(RETRIES + 1):
        if part.pos >= part.end:
            return
        try:
            _stream_part(job, file, fd, record, hasher, part, started, halt)
            return
        except _Transient as problem:
            started = None
            if attempt == RETRIES:
                raise errors.HubError(
                    f"downloading {file.path} of {job.repo_id} failed {RETRIES + 1} times ({problem}); the "
                    f"downloaded parts are kept and the next pull resumes each where it stopped.",
                    repo=job.repo_id, file=file.path) from None
            log.info("part %d of %s %s interrupted (%s); resuming at byte %d", part.index, job.repo_id, file.path,
                     problem, part.pos)
            _sleep_unless_stopped(job, RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])


def _stream_part(job: _Job, file: RemoteFile, fd: int, record: _PartsFile, hasher: _FollowHasher, part: _Part,
                 started: _Countdown | None, halt: threading.Event) -> None:
    response = _open_stream(job, file, part.pos, part.end)
    try:
        if response.status_code != 206:
            if response.status_code == 200:
                raise _RangesIgnored()
            if _retryable_status(response.status_code):
                raise _Transient(f"HTTP {response.status_code}")
            response.read()
            raise _error_for(response, job.repo_id, endpoint=job.endpoint, token=job.token, revision=job.sha,
                             what=file.path)
        match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("content-range", ""))
        if not match or int(match.group(1)) != part.pos or int(match.group(2)) != part.end - 1:
            raise _Transient(f"server answered Range bytes={part.pos}-{part.end - 1} with Content-Range "
                             f"{response.headers.get('content-range')!r}")
        buffer = bytearray(min(PART_FLUSH, part.end - part.pos))
        filled = 0

        def flush() -> None:
            nonlocal filled
            if filled:
                _pwrite_all(fd, memoryview(buffer)[:filled], part.pos, job, file)
                part.done += filled
                record.record(part)        # after the data: the record never claims bytes that are not on disk
                job.tracker.add(filled)
                hasher.poke()
                filled = 0

        try:
            last = time.monotonic()
            while part.pos + filled < part.end:
                n = response.readinto(memoryview(buffer)[filled:min(len(buffer), part.end - part.pos)])
                if job.rate is not None:
                    job.rate.take(n)
                filled += n
                if filled == len(buffer) or time.monotonic() - last >= PROGRESS_INTERVAL_S:
                    flush()
                    last = time.monotonic()
                    if started is not None:
                        started.one()
                        started = None
                    if job.stopped():
                        raise errors.Cancelled(f"pull of {job.repo_id} cancelled; the downloaded parts of "
                                               f"{file.path} are kept and a later pull resumes them.")
                    if halt.is_set():
                        raise _PartStopped()
        finally:
            flush()     # what did arrive before a drop or a stop is kept and recorded
        if started is not None:
            started.one()
        # A body longer than the range it answers (a broken server) is cut off at the part's end: the part has
        # exactly its bytes, and close() drops that connection instead of keeping it.
    finally:
        response.close()


def _pwrite_all(fd: int, data: bytearray, offset: int, job: _Job, file: RemoteFile) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as error:
        raise _write_failure(error, job, _partial(job.repo, file)) from error


# --------------------------------------------------------------------------------------------------------------
# Writing the snapshot


# A snapshot is never built in place: a reader (`mlxk list`, `hf`, mlx_lm) must see the old snapshot or the whole new
# one, even when the pull is killed or fails half-way. So pull builds `<repo>/.staging/<sha>.<pid>-<tid>` (same depth as
# `snapshots/<sha>`, so the relative links are the same), then publishes it with one rename (an atomic exchange when
# the snapshot already exists), then writes `refs/<ref>`. `.staging` sits beside `snapshots/`, not in it, because
# huggingface_hub's cache scan takes every folder in `snapshots/` for a revision.


def _staging(repo: Path, sha: str) -> Path:
    """This thread's staging folder: `<sha>.<pid>-<thread>` (the pid says whether its owner is still alive)."""
    return repo / cache.STAGING_DIR / f"{sha}.{os.getpid()}-{threading.get_ident()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_staging(repo: Path) -> None:
    """Remove snapshots a killed or failed pull left half-built: this thread's own earlier ones (it holds the
    model's lock) and those of processes that are gone. Another live process's or thread's is left alone."""
    try:
        entries = list(os.scandir(repo / cache.STAGING_DIR))
    except OSError:
        return
    own = _staging(repo, "x").name.partition(".")[2]
    for entry in entries:
        owner = entry.name.partition(".")[2]
        pid = owner.partition("-")[0]
        if owner in (own, own + "-old") or not pid.isdigit() or not _pid_alive(int(pid)):
            _discard(Path(entry.path))   # removes .staging too once it is empty


def _discard(path: Path) -> None:
    """Best-effort removal of a staging folder (links are never followed), and of `.staging` once it is empty; what
    stays is swept by the next pull."""
    try:
        cache.remove_path(path)
    except OSError as error:
        log.warning("could not remove %s: %s", path, error)
    try:
        path.parent.rmdir()
    except OSError:
        pass   # another pull is staging there, or it is already gone


def _write_error(repo_id: str, sha: str, path: str, error: OSError) -> errors.CacheError:
    return errors.CacheError(f"cannot write {path} of {repo_id}@{sha[:12]} into the cache: "
                             f"{error.strerror or error}. Nothing was published; check the disk and the permissions "
                             "of HF_HUB_CACHE, then pull again.", repo=repo_id, file=path)


def _scan_snapshot(root: Path, prefix: str = ""):
    """(path inside the snapshot, DirEntry) of every non-folder entry, without following links."""
    for entry in os.scandir(root):
        name = prefix + entry.name
        if entry.is_dir(follow_symlinks=False):
            yield from _scan_snapshot(Path(entry.path), name + "/")
        else:
            yield name, entry


def _carry_over(repo: Path, final: Path, staging: Path, wanted: list[RemoteFile]) -> None:
    """Copy what the published snapshot holds besides `wanted` (an earlier pull with other include patterns) into
    the staging folder, so publishing replaces the snapshot without dropping files; what `wanted` overlaps is left
    for it to write. A link out of the repo's blobs/ (made by hand, or by a pull before the Hub's answers were
    checked) is not carried over."""
    paths = {f.path for f in wanted}
    folders = {"/".join(f.path.split("/")[:i]) for f in wanted for i in range(1, f.path.count("/") + 1)}
    for name, entry in _scan_snapshot(final):
        parts = name.split("/")
        if name in paths or name in folders or any("/".join(parts[:i]) in paths for i in range(1, len(parts))):
            continue
        dest = staging / name
        if entry.is_symlink():
            target = os.readlink(entry.path)
            if not cache.is_inside(os.path.join(os.path.dirname(entry.path), target), repo / "blobs"):
                log.warning("dropping %s from %s: it links out of the repo's blobs (%s)", name, final, target)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, dest)   # relative links: same depth, same meaning
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(entry.path, dest)
            except OSError:
                import shutil

                shutil.copy2(entry.path, dest)


def _build_snapshot(repo_id: str, repo: Path, sha: str, wanted: list[RemoteFile], staging: Path) -> None:
    """Fill `staging` with the complete new snapshot (links into blobs/)."""
    sweep_staging(repo)
    final = repo / "snapshots" / sha
    try:
        staging.mkdir(parents=True)
        if final.is_dir():
            _carry_over(repo, final, staging, wanted)
    except OSError as error:
        raise _write_error(repo_id, sha, str(error.filename or staging), error) from error
    for i, file in enumerate(wanted):
        link = staging / file.path
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(_blob(repo, file), (final / file.path).parent), link)
        except OSError as error:
            raise _write_error(repo_id, sha, file.path, error) from error
        if i == 0:
            checkpoint("pull.linking")   # tests: some links made, not all


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step where the kernel can (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np
    RENAME_SWAP); False when it cannot here."""
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform == "darwin":
        call, args = getattr(libc, "renamex_np", None), (os.fsencode(a), os.fsencode(b), 2)
    else:
        at_fdcwd = -100
        call, args = getattr(libc, "renameat2", None), (at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), 2)
    if call is None:
        return False
    if call(*args) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _publish(repo_id: str, repo: Path, sha: str, staging: Path) -> None:
    """Make the staging folder `snapshots/<sha>` in one step; an existing snapshot is replaced, not merged into."""
    final = repo / "snapshots" / sha
    checkpoint("pull.publishing")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, final)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if not _exchange(staging, final):
                # No atomic exchange on this system: the snapshot is missing (never half-written) for a moment.
                old = staging.with_name(staging.name + "-old")
                os.rename(final, old)
                os.rename(staging, final)
                staging = old
            _discard(staging)   # now holds the previous snapshot
    except OSError as error:
        raise _write_error(repo_id, sha, f"snapshots/{sha}", error) from error
    _discard(staging)   # gone already after a plain rename: only `.staging` itself is removed


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_tree(repo_id: str, repo: Path, sha: str, files: list[RemoteFile]) -> None:
    """trees/<sha>.json in huggingface_hub's format, so `hf` (offline) and the health rules see the full listing."""
    entries = {}
    for f in files:
        entry = {"size": f.size, "blob_id": f.blob_id}
        if f.lfs_sha256:
            entry.update(lfs_sha256=f.lfs_sha256, lfs_size=f.size)
        entries[f.path] = entry
    try:
        _atomic_write(repo / "trees" / f"{sha}.json", json.dumps({"format_version": 1, "files": entries}, indent=2))
    except OSError as error:
        raise _write_error(repo_id, sha, f"trees/{sha}.json", error) from error


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
        return [RemoteFile(path, e["size"], e["blob_id"], e.get("lfs_sha256"))
                for path, e in data["files"].items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _preflight(client, repo_id: str, revision: str | None, *, repo: Path, include, exclude, endpoint: str,
               headers, token) -> _Remote:
    """Everything that can fail for a reason the user must fix, checked before a byte is written."""
    info = _revision_info(client, repo_id, revision or "main", endpoint=endpoint, headers=headers, token=token)
    sha = info["sha"]
    files = _cached_tree(repo, sha)
    if files is not None:
        try:
            validate_files(repo_id, sha, files, repo=repo)
        except errors.InvalidHubReply as error:   # written by another tool, or long ago: ask the Hub again
            log.warning("ignoring %s/trees/%s.json: %s", repo, sha, error.message)
            files = None
    if files is None:
        files = _tree(client, repo_id, sha, endpoint=endpoint, headers=headers, token=token)
        validate_files(repo_id, sha, files, repo=repo)
    wanted = select_files(files, include, exclude)
    if not wanted:
        raise errors.HubError(f"no file of {repo_id}@{revision or 'main'} matches include={include!r} "
                              f"exclude={exclude!r}.", repo=repo_id)
    if info.get("gated") or info.get("private"):
        _check_access(client, repo_id, sha, wanted[0], endpoint=endpoint, headers=headers, token=token)
    return _Remote(sha, files, wanted)


def _refuse_offline(repo_id: str, offline: bool | None = None) -> None:
    """HubError when offline (`offline`, else this process's HF_HUB_OFFLINE: a job passes its own, see
    workers.jobsettings)."""
    if settings().hub_offline if offline is None else offline:
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
         should_stop: StopFn | None = None, max_workers: int = 8, connections: int | None = None,
         max_rate: float | None = None, offline: bool | None = None) -> PullResult:
    """Download `repo_id@revision` (the files matching include/exclude) into the HF cache; resumes partials.

    `connections`: ranged connections per large file (default MLXK_PULL_CONNECTIONS); `max_rate`: a bandwidth cap
    in bytes per second for the whole pull (default MLXK_MAX_RATE; None or 0: no cap); `offline`: refuse at once
    (HubError) without asking the Hub (default HF_HUB_OFFLINE of this process)."""
    names.validate_repo_id(repo_id)
    _refuse_offline(repo_id, offline)
    cache_dir, endpoint, token = Path(cache_dir), endpoint.rstrip("/"), _token(token)
    headers = _headers(token)
    repo = cache.repo_dir(cache_dir, repo_id)
    if connections is None or max_rate is None:
        s = settings()
        connections = s.pull_connections if connections is None else connections
        max_rate = s.max_rate if max_rate is None else max_rate
    connections = max(1, int(connections))
    with _client(max_workers * connections + 8) as client:
        remote = _preflight(client, repo_id, revision, repo=repo, include=include, exclude=exclude, endpoint=endpoint,
                            headers=headers, token=token)
        sha, wanted = remote.sha, remote.wanted
        ref = _ref_for(revision, sha)
        snapshot = repo / "snapshots" / sha
        total = sum(f.size for f in wanted)
        if (ref is None or cache.read_ref(repo, ref) == sha) and _snapshot_complete(repo, sha, wanted):
            sweep_staging(repo)
            if progress:
                progress(Progress(total, total, len(wanted), len(wanted), "up to date"))
            return PullResult(repo_id, sha, ref or sha, len(wanted), 0, total, True, snapshot)

        missing = [f for f in _unique_blobs(wanted) if not _have_blob(repo, f)]
        on_disk = {f.etag: partial_bytes(_partial(repo, f), f.size) for f in missing}
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

        job = _Job(repo_id, repo, cache_dir, sha, endpoint, headers, token, client, tracker, stopped,
                   connections=connections, rate=_RateLimit(max_rate) if max_rate else None)
        try:
            (repo / "blobs").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _write_error(repo_id, sha, "blobs/", error) from error
        try:
            _download_all(job, missing, max_workers, stop)
        finally:
            job.origins.close()

    staging = _staging(repo, sha)
    try:
        _build_snapshot(repo_id, repo, sha, wanted, staging)
        if not _as_patterns(include) and not _as_patterns(exclude):
            _write_tree(repo_id, repo, sha, remote.files)   # before publishing: health checks the snapshot against it
        _publish(repo_id, repo, sha, staging)
    except BaseException:
        _discard(staging)
        raise
    if ref is not None:
        checkpoint("pull.ref")
        try:
            _atomic_write(repo / "refs" / ref, sha)   # last: the snapshot only counts once all its files are there
        except OSError as error:
            raise _write_error(repo_id, sha, f"refs/{ref}", error) from error
    try:
        sweep_partials(cache_dir, repo_id, keep=())
    except OSError as error:   # leftovers only: the pull itself is done
        log.warning("could not sweep the partial downloads of %s: %s", repo_id, error)
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
    from filelock import FileLock, Timeout  # lazy: keeps `mlxk pull` light

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
                _parts_path(path).unlink(missing_ok=True)
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
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError  # lazy: keeps `mlxk pull` light

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


def refuse_unfit(workspace: Path, *, force: bool = False) -> None:
    """A push never uploads what `push --check-only` rejects (a truncated safetensors file, a missing shard), unless
    forced: WorkspaceInvalid naming the first problem, every finding in `findings`."""
    if force:
        return
    findings = check_workspace(workspace)
    if findings:
        raise errors.WorkspaceInvalid(
            f"{workspace} is not ready to push: {findings[0].message} ({findings[0].rule}). Fix it (`mlxk push "
            "--check-only` lists every problem) or upload it anyway with --force.",
            findings=[{"rule": f.rule, "message": f.message} for f in findings])


def _check_visibility(remote: _RemoteRepo | None, repo_id: str, url: str, *, private: bool, public: bool) -> None:
    """Visibility is only ever what the user said: a new repo needs --private or --public, an existing public one
    --public, and a flag that contradicts an existing repo is refused, never silently ignored."""
    if remote is None:
        if not (private or public):
            raise errors.Conflict(f"{repo_id} does not exist yet: add --private to create it as a private repo "
                                  "(or --public to publish it).", repo=repo_id)
        return
    if remote.private and public:
        raise errors.Conflict(f"{repo_id} exists and is private; a push does not change that, so --public would be "
                              f"ignored. Push without --public to keep it private, or make it public first in its "
                              f"settings ({url}/settings) and push again.", repo=repo_id, url=url)
    if not remote.private and not public:
        hint = "--private does not hide it" if private else "mlxk will not upload into a public repo unless you say so"
        raise errors.Conflict(f"{repo_id} already exists and is PUBLIC; {hint}: add --public (or push to a new name "
                              "with --private).", repo=repo_id, url=url)


def push(workspace: Path, repo_id: str, *, private: bool = False, public: bool = False, dry_run: bool = False,
         force: bool = False, endpoint: str, token: str | None = None, message: str | None = None,
         progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> PushResult:
    """Upload a flat workspace to `repo_id` (only what changed); refuses to publish anything by accident.

    A new repo is created private with private=True, public with public=True, and not at all with neither. An
    existing public repo is only written to with public=True, an existing private one never with public=True
    (_check_visibility). A workspace `push --check-only` rejects is refused unless force. dry_run compares against
    the remote and writes nothing anywhere; it refuses what the push would refuse.
    """
    from huggingface_hub import HfApi, constants  # lazy: keeps `mlxk pull` light
    from huggingface_hub.errors import HfHubHTTPError  # lazy: keeps `mlxk pull` light

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

    refuse_unfit(workspace, force=force)
    remote = _remote_repo(api, repo_id, endpoint)
    _check_visibility(remote, repo_id, url, private=private, public=public)
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
    from huggingface_hub import CommitOperationAdd  # lazy: keeps `mlxk pull` light

    operations = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.disk)) for f in uploads]
    summary = message or f"Upload {len(uploads)} file{'s' if len(uploads) != 1 else ''} with mlxk"
    # parent_commit: a concurrent push to the same branch makes this one fail instead of silently interleaving.
    info = api.create_commit(repo_id, operations, commit_message=summary, parent_commit=parent)
    return info.oid


def check_workspace(workspace: Path) -> list:
    """Offline integrity findings of a folder about to be pushed ([] = healthy): `push --check-only`."""
    from mlxk import health  # lazy: keeps `mlxk pull` light (importlib.metadata)

    workspace = Path(workspace)
    return health.check_integrity(health.inspect_dir(workspace, workspace.name))
