"""A Hugging Face Hub look-alike on 127.0.0.1, for tests and benchmarks.

Why it exists: `mlxk pull/push/clone` must be tested against the real `huggingface_hub` client (and mlxk's
own resumable downloader) without the internet. The endpoint contract and the client's pitfalls are in
/work/shared/reference/hub-api.md; this module implements that contract, with the real Hub's error
semantics, plus fault injection (dropped connections, corrupt bytes, throttling, injected statuses) and a
request log so tests can assert what the client actually sent.

Design:
- One raw ASGI app, routed on `scope["raw_path"]`: revisions and tree paths arrive `%2F`-encoded and
  starlette's decoded path would split them (pitfall 5).
- One uvicorn server in a background thread listening on two sockets: the Hub port and a "CDN" port. LFS
  files are answered with a 302 to the CDN port, a different origin, so the client drops `Authorization`
  and follows the presigned, self-authorising URL, as it does with the real Hub (pitfall 4).
- File bodies stream from disk with `os.pread` in a small thread pool, 1 MiB at a time: no whole-file
  reads, no per-small-chunk Python overhead, so loopback throughput is not capped by the server.
- State (repos, commits, tokens) lives in memory behind one lock; file contents live on disk under
  `root/objects/<sha256>` (uploaded LFS objects included).

Importable without pytest; `python -m tests.hubserver --port N --root DIR` runs it in the foreground.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fnmatch
import hashlib
import hmac
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import parse_qs, quote, unquote, urlencode

log = logging.getLogger("mlxk.hubserver")

# Where a file has no .gitattributes pattern to go by, these names and sizes make it an LFS file (tests/factory.py
# names the blobs of the cache layouts it writes by this same rule).
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores anything this big in LFS regardless of name
CHUNK = 1024 * 1024
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
BAD_TOKEN = "Invalid credentials in Authorization header"
_FLIP = bytes(b ^ 0xFF for b in range(256))  # translate table: every byte changes, length does not
_DROP_LOG = "ASGI callable returned without completing response."

# What the real Hub writes into a new repo's .gitattributes (abridged), so pushes see the same LFS rules.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet",
        "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*",
        "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)


# ---------------------------------------------------------------- data ---------------------------------


@dataclass(frozen=True)
class Blob:
    """One file version as stored: content on disk by sha256, plus how git/LFS would name it."""

    sha256: str
    size: int
    disk_path: Path
    lfs: bool
    oid: str  # git blob id: of the content (regular) or of the LFS pointer (LFS)
    pointer_size: int = 0

    def read(self) -> bytes:
        return self.disk_path.read_bytes()

    @property
    def etag(self) -> str:
        """What the client names the cache blob after: sha256 for LFS (X-Linked-Etag), else the git oid."""
        return self.sha256 if self.lfs else self.oid


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class Repo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    gated: Any = False  # False | "auto" | "manual", as the Hub reports it
    tags_meta: list[str] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def resolve(self, rev: str) -> Commit | None:
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if rev.startswith(prefix) and rev[len(prefix):] in refs:
                return self.commits[refs[rev[len(prefix):]]]
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if rev in self.tags:
            return self.commits[self.tags[rev]]
        if SHA1_RE.match(rev) and rev in self.commits:
            return self.commits[rev]
        return None

    def files(self, rev: str = "main") -> dict[str, Blob]:
        commit = self.resolve(rev)
        if commit is None:
            raise KeyError(f"{self.repo_id}: no revision {rev!r}")
        return dict(commit.files)

    def read(self, path: str, rev: str = "main") -> bytes:
        return self.files(rev)[path].read()

    def history(self, rev: str = "main") -> list[Commit]:
        """Commits reachable from `rev`, newest first."""
        commit, out = self.resolve(rev), []
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out


@dataclass(frozen=True)
class Identity:
    token: str
    user: str
    orgs: tuple[str, ...] = ()
    gated_access: frozenset[str] = frozenset()
    can_write: bool = True

    @property
    def namespaces(self) -> set[str]:
        return {self.user, *self.orgs}


@dataclass
class Faults:
    """Fault injection, read live by the server on every request; tests may change it at any time."""

    drop_after_bytes: int | None = None  # close the connection after N body bytes of the next matching GET
    drop_always: bool = False  # False: only the next matching GET, then drop_after_bytes is cleared
    drop_match: str = ""  # raw-path substring a file GET must contain to be dropped ("" = any)
    corrupt: bool = False  # serve wrong bytes of the right length for LFS files
    rate_limit_bps: int | None = None  # throttle each file body (each connection) to this many bytes per second
    ignore_range: bool = False  # answer ranged file GETs with the whole file (200), as some servers do
    fail_status: dict[str, int] = field(default_factory=dict)  # raw-path substring -> status to answer
    delay_s: dict[str, float] = field(default_factory=dict)  # raw-path substring -> seconds before answering

    def reset(self) -> None:
        self.drop_after_bytes, self.drop_always, self.drop_match = None, False, ""
        self.corrupt, self.rate_limit_bps, self.ignore_range = False, None, False
        self.fail_status, self.delay_s = {}, {}


@dataclass
class RequestRecord:
    method: str
    path: str  # raw (still percent-encoded) path, without the query
    query: str
    range: str | None
    origin: str  # "hub" or "cdn"
    token: str | None
    status: int = 0
    bytes_sent: int = 0  # body bytes actually sent
    dropped: bool = False  # the server cut the connection on purpose (drop_after_bytes)
    aborted: bool = False  # the client went away before the body was complete


class HubError(Exception):
    """An error reply in the Hub's shape: X-Error-Code / X-Error-Message headers and {"error": ...}."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


# ---------------------------------------------------------------- helpers ------------------------------


def git_blob_sha1(data: bytes) -> str:
    """Git's blob id: sha1 over `blob <len>\\0<data>` (the Hub's etag for non-LFS files)."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer text that stands for a file in git."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def gitattributes_lfs_patterns(text: str) -> list[str]:
    patterns = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def is_lfs(path: str, size: int, patterns: Iterable[str] = (), sample: bytes = b"") -> bool:
    """The Hub's rule as used here: LFS suffix, >= 10 MiB, a .gitattributes lfs pattern, or binary sample."""
    if path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample:
        return True
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in p else name, p) for p in patterns)


def validate_repo_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid path in repo: {path!r}")
    return path


def files_from_dir(directory: Path) -> dict[str, Path]:
    """Every file under `directory` (symlinks followed), keyed by its POSIX path relative to it."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): p
        for p in sorted(directory.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(directory).parts
    }


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end_exclusive), None for no/ignored Range, or "unsatisfiable"."""
    if not header or not header.startswith("bytes="):
        return None
    spec = header[6:].split(",")[0].strip()
    first, dash, last = spec.partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            return (max(size - n, 0), size) if n > 0 and size > 0 else "unsatisfiable"
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    except ValueError:
        return None
    if start >= size or end <= start:
        return "unsatisfiable"
    return start, end


# ---------------------------------------------------------------- state --------------------------------


class HubState:
    """Repos, tokens and content storage. Thread-safe: tests mutate it while the server thread reads it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: dict[str, Identity] = {}
        self._seq = itertools.count()

    # -- content --------------------------------------------------------------------------------------

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256

    def has_object(self, sha256: str, size: int | None = None) -> bool:
        p = self.object_path(sha256)
        return p.is_file() and (size is None or p.stat().st_size == size)

    def tmp_file(self, stem: str) -> Path:
        return self.tmp / f"{stem}.{os.getpid()}.{next(self._seq)}"

    def store_bytes(self, data: bytes) -> tuple[str, Path]:
        sha = hashlib.sha256(data).hexdigest()
        dest = self.object_path(sha)
        if not dest.exists():
            tmp = self.tmp_file(sha)
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        return sha, dest

    def store_path(self, src: Path) -> tuple[str, Path]:
        """Hash `src` in chunks; hard-link it into the store (copy across filesystems). Never read whole."""
        h = hashlib.sha256()
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK * 8):
                h.update(chunk)
        sha = h.hexdigest()
        dest = self.object_path(sha)
        if not dest.exists():
            tmp = self.tmp_file(sha)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        return sha, dest

    def adopt_object(self, tmp: Path, sha256: str) -> Path:
        dest = self.object_path(sha256)
        os.replace(tmp, dest)
        return dest

    def make_blob(self, content: bytes | str | Path, *, lfs: bool | None = None, path: str = "",
                  patterns: Iterable[str] = ()) -> Blob:
        if isinstance(content, str):
            content = content.encode()
        if isinstance(content, (bytes, bytearray)):
            sha, disk = self.store_bytes(bytes(content))
            size = len(content)
        else:
            sha, disk = self.store_path(Path(content))
            size = disk.stat().st_size
        return self.blob_for_object(sha, size, disk, lfs=is_lfs(path, size, patterns) if lfs is None else lfs)

    def blob_for_object(self, sha: str, size: int, disk: Path, *, lfs: bool) -> Blob:
        if lfs:
            pointer = lfs_pointer(sha, size)
            return Blob(sha, size, disk, True, git_blob_sha1(pointer), len(pointer))
        h = hashlib.sha1(b"blob %d\0" % size)
        with open(disk, "rb") as f:
            while chunk := f.read(CHUNK * 8):
                h.update(chunk)
        return Blob(sha, size, disk, False, h.hexdigest())

    # -- repos and commits ----------------------------------------------------------------------------

    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def create_repo(self, repo_type: str, repo_id: str, *, private: bool, author: str,
                    initial_files: dict[str, Blob] | None = None) -> Repo:
        with self.lock:
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
            self.repos[(repo_type, repo_id)] = repo
            if initial_files is not None:
                self.commit(repo, "main", initial_files, title="initial commit", message="", author=author)
            return repo

    def commit(self, repo: Repo, branch: str, files: dict[str, Blob], *, title: str, message: str,
               author: str, parent: str | None = None) -> Commit:
        with self.lock:
            if parent is None:
                parent = repo.branches.get(branch) or repo.branches.get("main")
            seed = f"{repo.repo_id}\0{parent}\0{title}\0{time.time_ns()}\0{next(self._seq)}\0"
            seed += "".join(f"{p}\0{b.oid}\0" for p, b in sorted(files.items()))
            sha = hashlib.sha1(seed.encode()).hexdigest()
            commit = Commit(sha, parent, dict(files), title, message, author, datetime.now(timezone.utc))
            repo.commits[sha] = commit
            repo.branches[branch] = sha
            return commit

    def identity(self, token: str | None) -> Identity | None:
        return self.tokens.get(token) if token else None


# ---------------------------------------------------------------- HTTP layer -----------------------------


@dataclass
class Request:
    method: str
    raw_path: str
    segments: list[str]  # raw path split on "/", each segment percent-decoded
    query: dict[str, list[str]]
    headers: dict[str, str]
    origin: str
    token: str | None
    ident: Identity | None
    receive: Callable[[], Awaitable[dict]]

    def q(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    async def body(self) -> bytes:
        chunks, more = [], True
        while more:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                raise ConnectionAbortedError("client went away")
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        return b"".join(chunks)

    async def json(self) -> Any:
        raw = await self.body()
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise HubError(400, "Invalid JSON body") from None


@dataclass
class FileBody:
    disk_path: Path
    start: int
    end: int  # exclusive
    corrupt: bool


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: FileBody | None = None


def json_reply(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode())


def error_reply(err: HubError) -> Reply:
    headers = {"X-Error-Message": err.message, **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return json_reply({"error": err.message}, err.status, headers)


class _DropFilter(logging.Filter):
    """uvicorn logs an error when we cut a response short on purpose; that is the fault, not a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _DROP_LOG


_DROP_FILTER = _DropFilter()


class HubServer:
    """A Hub-compatible server for the real huggingface_hub client. See the module docstring.

    Public knobs (plain attributes, read live): `faults`, `lfs_mode` ("cdn": 302 to the CDN port, the real
    Hub's behaviour; "direct": serve LFS bytes at /resolve), `tree_page_size`, `commits_page_size`,
    `multipart_threshold` / `multipart_chunk_size` (LFS uploads at least that big get the multipart transfer
    when the client offers it; None turns multipart off).
    """

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0, cdn_port: int = 0):
        self.root = Path(root)
        self.host = host
        self.state = HubState(self.root)
        self.faults = Faults()
        self._default_knobs()
        self._requests: list[RequestRecord] = []
        self._in_flight = 0
        self._secret = os.urandom(16)
        self._names = itertools.count(1)
        self._sockets = [self._bind(host, port), self._bind(host, cdn_port)]
        self.port = self._sockets[0].getsockname()[1]
        self.cdn_port = self._sockets[1].getsockname()[1]
        public_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.endpoint = f"http://{public_host}:{self.port}"
        self.cdn_endpoint = f"http://{public_host}:{self.cdn_port}"
        self._uvicorn = None
        self._thread: threading.Thread | None = None
        self._io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="hubserver-io")

    # -- lifecycle ------------------------------------------------------------------------------------

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def start(self) -> "HubServer":
        import uvicorn  # heavy-ish; only needed once the server runs

        logging.getLogger("uvicorn.error").addFilter(_DROP_FILTER)  # same object: added once
        config = uvicorn.Config(self._asgi, interface="asgi3", http="h11", loop="asyncio", lifespan="off",
                                proxy_headers=False, log_config=None,
                                access_log=False, timeout_graceful_shutdown=1, timeout_keep_alive=30)
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": self._sockets},
                                        name="hubserver", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("hub server failed to start")
            time.sleep(0.002)
        log.debug("hub server on %s (cdn %s), root %s", self.endpoint, self.cdn_endpoint, self.root)
        return self

    def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        for sock in self._sockets:
            sock.close()
        self._io.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- test-facing API ------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Finished requests in completion order (a copy).

        A client can read the last byte of a reply before the server has logged it, so this waits (briefly) for
        requests still in flight; a request deliberately kept open (a throttled download) is not waited for long.
        """
        deadline = time.monotonic() + 0.5
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.005)
        return list(self._requests)

    def clear_requests(self) -> None:
        self._requests.clear()

    def reset(self) -> None:
        """Faults, request log and knobs back to their defaults; repos and tokens stay."""
        self.faults.reset()
        self.clear_requests()
        self._default_knobs()

    def _default_knobs(self) -> None:
        self.lfs_mode = "cdn"
        self.tree_page_size = 1000
        self.commits_page_size = 50
        self.multipart_threshold: int | None = 64 * 1024 * 1024
        self.multipart_chunk_size = 16 * 1024 * 1024
        self.hostile_trees: dict[str, tuple[list[Any], bool]] = {}  # repo id -> (raw entries, replace)
        self.tree_next_endpoint: str | None = None  # hostile: the tree's next-page links point at this server

    def unique_repo(self, base: str = "org/model") -> str:
        """A repo id no other test of this server has used: `base` plus a counter."""
        ns, _, name = base.partition("/")
        if not name:
            ns, name = "org", ns
        return f"{ns}/{name}-{next(self._names)}"

    def add_token(self, token: str, user: str = "alice", orgs: Iterable[str] = (),
                  gated_access: Iterable[str] = (), *, can_write: bool = True) -> None:
        with self.state.lock:
            self.state.tokens[token] = Identity(token, user, tuple(orgs), frozenset(gated_access), can_write)

    def add_repo(self, repo_id: str, files: dict[str, bytes | str | Path], *, private: bool | None = None,
                 gated: bool | str | None = None, branch: str = "main", message: str = "Upload files",
                 repo_type: str = "model", keep_existing: bool = False, tags: Iterable[str] | None = None) -> str:
        """Create the repo if needed and commit `files` to `branch`; return the new 40-hex commit sha.

        The commit's tree is exactly `files` (pass keep_existing=True to lay them over the branch's
        current tree). Earlier commits stay reachable by sha. LFS: *.safetensors/*.gguf/*.bin or >= 10 MiB.
        A Path is hard-linked (else copied) into the store, never read whole. `private`/`gated` default to
        False for a new repo and leave an existing repo unchanged when not given.
        """
        _check_repo_id(repo_id)
        with self.state.lock:
            repo = self.state.get(repo_type, repo_id)
            if repo is None:
                repo = self.state.create_repo(repo_type, repo_id, private=bool(private), author="hubserver")
            if private is not None:
                repo.private = private
            if gated is not None:
                repo.gated = ("auto" if gated is True else gated) or False
            if tags is not None:
                repo.tags_meta = list(tags)
            base = repo.resolve(branch) if keep_existing else None
            tree = dict(base.files) if base else {}
        patterns = gitattributes_lfs_patterns(_text(files.get(".gitattributes", b"")))
        for path, content in files.items():
            tree[validate_repo_path(path)] = self.state.make_blob(content, path=path, patterns=patterns)
        commit = self.state.commit(repo, branch, tree, title=message, message="", author="hubserver")
        return commit.sha

    def serve_hostile(self, repo_id: str, entries: Iterable[Any], *, replace: bool = False) -> None:
        """Make the tree API of `repo_id` (every revision, recursive listing of the root) also list `entries`, raw.

        A hostile or broken Hub, for the client's trust-boundary tests: entries are sent exactly as given (paths
        such as `../../victim.txt`, bad oids, negative sizes, non-objects), bypassing `validate_repo_path`.
        `replace=True` lists only them. Cleared by `reset()`. Build entries with `hostile_entry`.
        """
        self.hostile_trees[repo_id] = (list(entries), replace)

    def hostile_entry(self, repo_id: str, path: Any, *, like: str | None = None, **fields: Any) -> dict:
        """A raw tree entry for `path`: the oid, size and lfs of the repo's file `like` (a blob the client may
        already hold), overridden by `fields` (`oid=`, `size=`, `lfs=`)."""
        entry: dict[str, Any] = {"type": "file", "path": path}
        if like is not None:
            blob = self.repo(repo_id).files()[like]
            entry.update(oid=blob.oid, size=blob.size)
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
        entry.update(fields)
        return entry

    def delete_repo(self, repo_id: str, repo_type: str = "model") -> None:
        with self.state.lock:
            self.state.repos.pop((repo_type, repo_id), None)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The live repo (files(), read(), history(), private, gated, branches, tags); KeyError if missing."""
        repo = self.state.get(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r}")
        return repo

    def repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # -- presigned URLs (the CDN and LFS upload hrefs carry no auth) ----------------------------------

    def _sign(self, *parts: str) -> str:
        return hmac.new(self._secret, "\0".join(parts).encode(), hashlib.sha256).hexdigest()[:32]

    def _presign(self, kind: str, oid: str, extra: str = "", **params: str) -> str:
        exp = str(int(time.time()) + 3600)
        sig = self._sign(kind, oid, extra, exp)
        query = urlencode({**params, "exp": exp, "sig": sig})
        suffix = f"/{extra}" if extra else ""
        return f"{self.cdn_endpoint}/_{kind}/{oid}{suffix}?{query}"

    def _check_sig(self, req: Request, kind: str, oid: str, extra: str = "") -> None:
        exp, sig = req.q("exp", ""), req.q("sig", "")
        good = hmac.compare_digest(sig, self._sign(kind, oid, extra, exp))
        if not good or not exp.isdigit() or int(exp) < time.time():
            raise HubError(403, "Request has expired or the signature does not match")

    # -- ASGI entry ------------------------------------------------------------------------------------

    async def _asgi(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        raw_path = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        origin = "cdn" if scope["server"] and scope["server"][1] == self.cdn_port else "hub"
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        record = RequestRecord(scope["method"], raw_path, scope.get("query_string", b"").decode("latin-1"),
                               headers.get("range"), origin, token)
        req = Request(scope["method"], raw_path, [unquote(s) for s in raw_path.split("/")[1:]],
                      parse_qs(record.query, keep_blank_values=True), headers, origin, token,
                      self.state.identity(token), receive)
        self._in_flight += 1
        try:
            reply = await self._answer(req)
            await self._send(req, reply, send, record)
        except ConnectionAbortedError:
            record.aborted = True
            log.debug("client went away during %s %s", req.method, raw_path)
        finally:
            self._requests.append(record)
            self._in_flight -= 1

    async def _answer(self, req: Request) -> Reply:
        for needle, seconds in list(self.faults.delay_s.items()):
            if needle in req.raw_path:
                await asyncio.sleep(seconds)
        for needle, status in list(self.faults.fail_status.items()):
            if needle in req.raw_path:
                return json_reply({"error": f"Injected fault: HTTP {status}"}, status)
        try:
            if req.origin == "cdn":
                return await self._route_cdn(req)
            if req.token is not None and req.ident is None:
                raise HubError(401, BAD_TOKEN)
            return await self._route_hub(req)
        except HubError as err:
            return error_reply(err)

    # -- sending --------------------------------------------------------------------------------------

    async def _send(self, req: Request, reply: Reply, send: Callable, record: RequestRecord) -> None:
        headers = dict(reply.headers)
        if reply.file is None:
            headers["Content-Length"] = str(len(reply.body))
        else:
            headers["Content-Length"] = str(reply.file.end - reply.file.start)
        record.status = reply.status
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]})
        if reply.file is None or req.method == "HEAD":
            await send({"type": "http.response.body", "body": reply.body, "more_body": False})
            record.bytes_sent = 0 if req.method == "HEAD" else len(reply.body)
            return
        await self._stream_file(req, reply.file, send, record)

    def _take_drop(self, req: Request) -> int | None:
        f = self.faults
        if f.drop_after_bytes is None or f.drop_match not in req.raw_path:
            return None
        limit = f.drop_after_bytes
        if not f.drop_always:
            f.drop_after_bytes = None  # one shot; the event loop is single-threaded, so no race
        return limit

    async def _stream_file(self, req: Request, body: FileBody, send: Callable, record: RequestRecord) -> None:
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(req.receive, gone))
        drop_at = self._take_drop(req)
        fd = os.open(body.disk_path, os.O_RDONLY)
        started, pos, sent = time.monotonic(), body.start, 0
        try:
            while pos < body.end:
                n = min(CHUNK, body.end - pos)
                bps = self.faults.rate_limit_bps
                if bps:
                    n = min(n, max(bps // 20, 1))  # ~20 sends a second keeps the throttle smooth
                if drop_at is not None:
                    n = min(n, drop_at - sent)
                    if n <= 0:
                        record.dropped = True
                        return  # without completing the response: uvicorn closes the connection
                if gone.is_set():
                    raise ConnectionAbortedError("client went away")
                data = await loop.run_in_executor(self._io, os.pread, fd, n, pos)
                if not data:
                    raise RuntimeError(f"{body.disk_path} shrank while serving it")
                if body.corrupt:
                    data = data.translate(_FLIP)
                await send({"type": "http.response.body", "body": data, "more_body": True})
                pos += len(data)
                sent += len(data)
                record.bytes_sent = sent
                if bps:
                    ahead = sent / bps - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            os.close(fd)
            watcher.cancel()

    def _file_reply(self, req: Request, blob: Blob, headers: dict[str, str], *, corrupt: bool) -> Reply:
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **headers}
        rng = None if self.faults.ignore_range else parse_range(req.headers.get("range"), blob.size)
        if rng == "unsatisfiable":
            return Reply(416, {**headers, "Content-Range": f"bytes */{blob.size}"})
        if rng is None:
            return Reply(200, headers, file=FileBody(blob.disk_path, 0, blob.size, corrupt))
        start, end = rng
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        return Reply(206, headers, file=FileBody(blob.disk_path, start, end, corrupt))

    # -- CDN origin -----------------------------------------------------------------------------------

    async def _route_cdn(self, req: Request) -> Reply:
        seg = req.segments
        if len(seg) == 2 and seg[0] == "_cdn" and req.method in ("GET", "HEAD"):
            return self._cdn_get(req, seg[1])
        if len(seg) == 2 and seg[0] == "_upload" and req.method == "PUT":
            return await self._upload_basic(req, seg[1])
        if len(seg) == 3 and seg[0] == "_upload" and seg[2] == "complete" and req.method == "POST":
            return await self._upload_complete(req, seg[1])
        if len(seg) == 3 and seg[0] == "_upload" and seg[2].isdigit() and req.method == "PUT":
            return await self._upload_part(req, seg[1], int(seg[2]))
        raise HubError(404, "Not found")

    def _cdn_get(self, req: Request, sha256: str) -> Reply:
        self._check_sig(req, "cdn", sha256)
        if not self.state.has_object(sha256):
            raise HubError(404, "Not found")
        disk = self.state.object_path(sha256)
        blob = Blob(sha256, disk.stat().st_size, disk, True, "")
        name = req.q("name", sha256)
        ascii_name = name.encode("ascii", "replace").decode().replace('"', "_")
        headers = {"ETag": f'"{sha256}"',
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\";"}
        return self._file_reply(req, blob, headers, corrupt=self.faults.corrupt)

    async def _receive_to_file(self, req: Request, dest: Path) -> tuple[str, int]:
        h, size = hashlib.sha256(), 0
        with open(dest, "wb") as f:
            more = True
            while more:
                msg = await req.receive()
                if msg["type"] == "http.disconnect":
                    raise ConnectionAbortedError("client went away mid-upload")
                chunk = msg.get("body", b"")
                h.update(chunk)
                f.write(chunk)
                size += len(chunk)
                more = msg.get("more_body", False)
        return h.hexdigest(), size

    async def _upload_basic(self, req: Request, oid: str) -> Reply:
        self._check_sig(req, "upload", oid)
        tmp = self.state.tmp_file(oid)
        try:
            sha, size = await self._receive_to_file(req, tmp)
            if sha != oid or str(size) != req.q("size", str(size)):
                raise HubError(400, f"Uploaded content does not match oid {oid} (got sha256 {sha}, {size} bytes)")
            self.state.adopt_object(tmp, oid)
        finally:
            tmp.unlink(missing_ok=True)
        return Reply(200, {"ETag": f'"{oid}"'})

    async def _upload_part(self, req: Request, oid: str, part: int) -> Reply:
        self._check_sig(req, "upload", oid, str(part))
        part_dir = self.state.tmp / f"multipart-{oid}"
        part_dir.mkdir(exist_ok=True)
        sha, _ = await self._receive_to_file(req, part_dir / f"{part:05d}")
        return Reply(200, {"ETag": f'"{sha[:32]}"'})

    async def _upload_complete(self, req: Request, oid: str) -> Reply:
        self._check_sig(req, "upload", oid, "complete")
        payload = await req.json()
        part_dir = self.state.tmp / f"multipart-{oid}"
        numbers = [int(p["partNumber"]) for p in payload.get("parts", [])]
        if payload.get("oid") != oid or numbers != list(range(1, len(numbers) + 1)) or not numbers:
            raise HubError(400, "Malformed multipart completion payload")
        tmp, h = self.state.tmp_file(oid), hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for n in numbers:
                    part_path = part_dir / f"{n:05d}"
                    if not part_path.is_file():
                        raise HubError(400, f"Part {n} was never uploaded")
                    with open(part_path, "rb") as f:
                        while chunk := f.read(CHUNK * 8):
                            h.update(chunk)
                            out.write(chunk)
            if h.hexdigest() != oid or str(tmp.stat().st_size) != req.q("size", str(tmp.stat().st_size)):
                raise HubError(400, f"Assembled content does not match oid {oid}")
            self.state.adopt_object(tmp, oid)
        finally:
            tmp.unlink(missing_ok=True)
            shutil.rmtree(part_dir, ignore_errors=True)
        return json_reply({})

    # -- Hub origin: routing ----------------------------------------------------------------------------

    async def _route_hub(self, req: Request) -> Reply:
        seg, m = req.segments, req.method
        if seg[:1] == ["api"]:
            return await self._route_api(req, seg[1:])
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces") and len(seg) > 2:
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if len(seg) >= 5 and seg[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve(req, repo_type, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:5] == ["info", "lfs", "objects"] and m == "POST":
            repo_id = f"{seg[0]}/{seg[1][:-4]}"
            if seg[5] == "batch":
                return await self._lfs_batch(req, repo_type, repo_id)
            if seg[5] == "verify":
                return await self._lfs_verify(req, repo_type, repo_id)
        raise HubError(404, "Not found")

    async def _route_api(self, req: Request, seg: list[str]) -> Reply:
        m = req.method
        if seg == ["agent-harnesses"] and m == "GET":
            return json_reply({"standardEnvVars": [], "harnesses": {}})
        if seg == ["whoami-v2"] and m == "GET":
            return self._whoami(req)
        if seg == ["validate-yaml"] and m == "POST":
            await req.body()
            return json_reply({"errors": [], "warnings": []})
        if seg == ["repos", "create"] and m == "POST":
            return await self._create_repo(req)
        if seg == ["repos", "delete"] and m == "DELETE":
            return await self._delete_repo(req)
        if len(seg) < 3 or seg[0] not in REPO_TYPES:
            raise HubError(404, "Not found")
        repo_type, repo_id, rest = REPO_TYPES[seg[0]], f"{seg[1]}/{seg[2]}", seg[3:]
        action = rest[0] if rest else ""
        handlers: dict[tuple[str, str], Callable[[], Awaitable[Reply] | Reply]] = {
            ("GET", ""): lambda: self._info(req, repo_type, repo_id, None),
            ("GET", "revision"): lambda: self._info(req, repo_type, repo_id, "/".join(rest[1:])),
            ("GET", "tree"): lambda: self._tree(req, repo_type, repo_id, rest[1] if len(rest) > 1 else "main",
                                                "/".join(rest[2:])),
            ("POST", "paths-info"): lambda: self._paths_info(req, repo_type, repo_id, "/".join(rest[1:])),
            ("GET", "refs"): lambda: self._refs(req, repo_type, repo_id),
            ("GET", "commits"): lambda: self._commits(req, repo_type, repo_id, "/".join(rest[1:]) or "main"),
            ("POST", "preupload"): lambda: self._preupload(req, repo_type, repo_id, "/".join(rest[1:])),
            ("POST", "commit"): lambda: self._commit(req, repo_type, repo_id, "/".join(rest[1:])),
            ("POST", "branch"): lambda: self._create_branch(req, repo_type, repo_id, "/".join(rest[1:])),
            ("DELETE", "branch"): lambda: self._delete_branch(req, repo_type, repo_id, "/".join(rest[1:])),
            ("POST", "tag"): lambda: self._create_tag(req, repo_type, repo_id, "/".join(rest[1:])),
            ("DELETE", "tag"): lambda: self._delete_tag(req, repo_type, repo_id, "/".join(rest[1:])),
            ("PUT", "settings"): lambda: self._settings(req, repo_type, repo_id),
        }
        if action in ("xet-write-token", "xet-read-token"):
            raise HubError(501, "Xet is not supported by this test server: set HF_HUB_DISABLE_XET=1")
        handler = handlers.get((m, action))
        if handler is None or (action == "" and rest):
            raise HubError(404, "Not found")
        result = handler()
        return await result if asyncio.iscoroutine(result) else result

    # -- access rules (the real Hub's semantics, see the reference's error table) -------------------------

    def _visible(self, req: Request, repo_type: str, repo_id: str) -> Repo:
        repo = self.state.get(repo_type, repo_id)
        readable = repo is not None and (not repo.private or (req.ident and repo.namespace in req.ident.namespaces))
        if not readable:
            # Missing and private-without-access look the same, as on the Hub.
            raise HubError(401 if req.ident is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _check_gate(self, req: Request, repo: Repo) -> None:
        if not repo.gated:
            return
        ident = req.ident
        if ident is not None and (repo.namespace in ident.namespaces or repo.repo_id in ident.gated_access):
            return
        kind = repo.repo_type
        if ident is None:
            raise HubError(401, f"Access to {kind} {repo.repo_id} is restricted. You must have access to it and "
                                f"be authenticated to access it. Please log in.", "GatedRepo")
        raise HubError(403, f"Access to {kind} {repo.repo_id} is restricted and you are not in the authorized "
                            f"list. Visit {self.repo_url(repo)} to ask for access.", "GatedRepo")

    def _check_write(self, req: Request, repo: Repo | None, namespace: str) -> Identity:
        ident = req.ident
        if ident is None:
            raise HubError(401, "You must be authenticated to write to this repo")
        if not ident.can_write or namespace not in ident.namespaces:
            what = repo.repo_id if repo else namespace
            raise HubError(403, f"You don't have the rights to write to {what}")
        return ident

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # -- read endpoints ---------------------------------------------------------------------------------

    def _whoami(self, req: Request) -> Reply:
        if req.ident is None:
            raise HubError(401, BAD_TOKEN)
        ident = req.ident
        role = "write" if ident.can_write else "read"
        return json_reply({"type": "user", "name": ident.user, "fullname": ident.user,
                           "orgs": [{"name": o, "type": "org"} for o in ident.orgs],
                           "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}})

    def _info(self, req: Request, repo_type: str, repo_id: str, rev: str | None) -> Reply:
        repo = self._visible(req, repo_type, repo_id)
        commit = self._commit_at(repo, rev or "main")
        with_blobs = (req.q("blobs") or "").lower() == "true"
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sib: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sib.update(size=blob.size, blobId=blob.oid)
                if blob.lfs:
                    sib["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
            siblings.append(sib)
        card = _card_data(commit)
        tags = sorted(set(repo.tags_meta) | set(_as_list(card.get("tags"))))
        info = {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "author": repo.namespace, "sha": commit.sha, "lastModified": iso(commit.date),
                "createdAt": iso(repo.created_at), "private": repo.private, "gated": repo.gated,
                "disabled": False, "downloads": 0, "likes": 0, "tags": tags, "siblings": siblings,
                "usedStorage": sum(b.size for b in commit.files.values())}
        if card:
            info["cardData"] = card
            if card.get("library_name"):
                info["library_name"] = card["library_name"]
        return json_reply(info)

    def _tree(self, req: Request, repo_type: str, repo_id: str, rev: str, path: str) -> Reply:
        repo = self._visible(req, repo_type, repo_id)
        commit = self._commit_at(repo, rev)
        path = path.strip("/")
        recursive = (req.q("recursive") or "").lower() == "true"
        expand = (req.q("expand") or "").lower() == "true"
        entries = _tree_entries(commit, path, recursive)
        if entries is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        page = min(self.tree_page_size, 50) if expand else self.tree_page_size
        cursor = int(req.q("cursor", "0") or 0)
        chunk = entries[cursor:cursor + page]
        body = [self._entry_json(repo, commit, p, b, expand) for p, b in chunk]
        hostile, replace = self.hostile_trees.get(repo_id, (None, False))
        if hostile is not None and not path and recursive and cursor + page >= len(entries):
            body = ([] if replace else body) + hostile
        headers = {}
        if cursor + page < len(entries):
            params = {k: v[0] for k, v in req.query.items() if k != "cursor"}
            params["cursor"] = str(cursor + page)
            base = self.tree_next_endpoint or self.endpoint
            headers["Link"] = f'<{base}{req.raw_path}?{urlencode(params)}>; rel="next"'
        return json_reply(body, headers=headers)

    async def _paths_info(self, req: Request, repo_type: str, repo_id: str, rev: str) -> Reply:
        form = parse_qs((await req.body()).decode(), keep_blank_values=True)  # form-encoded, parsed by hand
        repo = self._visible(req, repo_type, repo_id)
        commit = self._commit_at(repo, rev)
        expand = (form.get("expand", ["false"])[0]).lower() == "true"
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                out.append(self._entry_json(repo, commit, path, commit.files[path], expand))
            elif path and any(p.startswith(path + "/") for p in commit.files):
                out.append(self._entry_json(repo, commit, path, None, expand))
        return json_reply(out)

    def _entry_json(self, repo: Repo, commit: Commit, path: str, blob: Blob | None, expand: bool) -> dict:
        if blob is None:
            children = sorted((p, b.oid) for p, b in commit.files.items() if p.startswith(path + "/"))
            entry: dict[str, Any] = {"type": "directory", "oid": hashlib.sha1(repr(children).encode()).hexdigest(),
                                     "size": 0, "path": path}
        else:
            entry = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
        if expand:
            last = _last_commit_touching(repo, commit, path)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": iso(last.date)}
        return entry

    def _refs(self, req: Request, repo_type: str, repo_id: str) -> Reply:
        repo = self._visible(req, repo_type, repo_id)
        body = {"branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                             for n, s in sorted(repo.branches.items())],
                "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(repo.tags.items())],
                "converts": []}
        if req.q("include_prs"):
            body["pullRequests"] = []
        return json_reply(body)

    def _commits(self, req: Request, repo_type: str, repo_id: str, rev: str) -> Reply:
        repo = self._visible(req, repo_type, repo_id)
        self._commit_at(repo, rev)
        history = repo.history(rev)
        page = self.commits_page_size
        cursor = int(req.q("p", "0") or 0)
        body = [{"id": c.sha, "title": c.title, "message": c.message, "date": iso(c.date),
                 "authors": [{"user": c.author}]} for c in history[cursor * page:(cursor + 1) * page]]
        headers = {}
        if (cursor + 1) * page < len(history):
            params = {k: v[0] for k, v in req.query.items() if k != "p"}
            params["p"] = str(cursor + 1)
            headers["Link"] = f'<{self.endpoint}{req.raw_path}?{urlencode(params)}>; rel="next"'
        return json_reply(body, headers=headers)

    def _resolve(self, req: Request, repo_type: str, repo_id: str, rev: str, path: str) -> Reply:
        repo = self._visible(req, repo_type, repo_id)
        self._check_gate(req, repo)
        commit = self._commit_at(repo, rev)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.oid}"'}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
            if self.lfs_mode == "cdn":
                location = self._presign("cdn", blob.sha256, name=path.rsplit("/", 1)[-1])
                return Reply(302, {**headers, "Location": location})
            headers["ETag"] = f'"{blob.sha256}"'
        return self._file_reply(req, blob, headers, corrupt=blob.lfs and self.faults.corrupt)

    # -- write endpoints --------------------------------------------------------------------------------

    async def _create_repo(self, req: Request) -> Reply:
        payload = await req.json()
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if req.ident is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or req.ident.user
        name = payload.get("name") or ""
        repo_id = f"{namespace}/{name}"
        try:
            _check_repo_id(repo_id)
        except ValueError as exc:
            raise HubError(400, str(exc)) from None
        existing = self.state.get(repo_type, repo_id)
        url = f"{self.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        if existing is not None:
            return json_reply({"error": "You already created this model repo", "url": url}, 409,
                              {"X-Error-Message": "You already created this model repo"})
        self._check_write(req, None, namespace)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        gitattributes = self.state.make_blob(DEFAULT_GITATTRIBUTES.encode(), lfs=False)
        self.state.create_repo(repo_type, repo_id, private=private, author=req.ident.user,
                               initial_files={".gitattributes": gitattributes})
        log.debug("created %s %s (private=%s)", repo_type, repo_id, private)
        return json_reply({"url": url, "name": repo_id})

    async def _delete_repo(self, req: Request) -> Reply:
        payload = await req.json()
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or (req.ident.user if req.ident else "")
        repo_id = f"{namespace}/{payload.get('name', '')}"
        repo = self._visible(req, repo_type, repo_id)
        self._check_write(req, repo, repo.namespace)
        self.delete_repo(repo_id, repo_type)
        return json_reply({})

    async def _settings(self, req: Request, repo_type: str, repo_id: str) -> Reply:
        payload = await req.json()
        repo = self._visible(req, repo_type, repo_id)
        self._check_write(req, repo, repo.namespace)
        if "private" in payload:
            repo.private = bool(payload["private"])
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        if "gated" in payload:
            repo.gated = payload["gated"] or False
        return json_reply({})

    def _writable(self, req: Request, repo_type: str, repo_id: str) -> Repo:
        repo = self._visible(req, repo_type, repo_id)
        self._check_write(req, repo, repo.namespace)
        return repo

    async def _preupload(self, req: Request, repo_type: str, repo_id: str, rev: str) -> Reply:
        payload = await req.json()
        repo = self._writable(req, repo_type, repo_id)
        commit = self._commit_at(repo, rev)
        attrs = commit.files.get(".gitattributes")
        patterns = gitattributes_lfs_patterns(_text(attrs.read())) if attrs else []
        out = []
        for f in payload.get("files", []):
            path, size = f["path"], int(f.get("size", 0))
            sample = base64.b64decode(f.get("sample", "") or "")
            mode = "lfs" if is_lfs(path, size, patterns, sample) else "regular"
            entry: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            remote = commit.files.get(path)
            if remote is not None:
                entry["oid"] = remote.sha256 if remote.lfs else remote.oid
            out.append(entry)
        return json_reply({"files": out, "commitOid": commit.sha})

    async def _lfs_batch(self, req: Request, repo_type: str, repo_id: str) -> Reply:
        payload = await req.json()
        self._writable(req, repo_type, repo_id)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported by this test server")
        offered = payload.get("transfers") or ["basic"]
        multipart = "multipart" in offered and self.multipart_threshold is not None
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": int(size or 0),
                                "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.state.has_object(oid, size):
                entry["actions"] = {"upload": self._upload_action(oid, size, multipart),
                                    "verify": {"href": f"{self.endpoint}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs"
                                                       f"/objects/verify", "header": {}}}
            objects.append(entry)
        return json_reply({"transfer": "multipart" if multipart else "basic", "objects": objects,
                           "hash_algo": "sha256"}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _upload_action(self, oid: str, size: int, multipart: bool) -> dict:
        if not multipart or size < (self.multipart_threshold or 0):
            return {"href": self._presign("upload", oid, size=str(size))}
        chunk = self.multipart_chunk_size
        header = {"chunk_size": str(chunk)}
        for n in range(1, -(-size // chunk) + 1):
            header[f"{n:05d}"] = self._presign("upload", oid, str(n))
        return {"href": self._presign("upload", oid, "complete", size=str(size)), "header": header}

    async def _lfs_verify(self, req: Request, repo_type: str, repo_id: str) -> Reply:
        payload = await req.json()
        self._writable(req, repo_type, repo_id)
        oid, size = str(payload.get("oid", "")), payload.get("size")
        if not SHA256_RE.match(oid) or not self.state.has_object(oid, size):
            raise HubError(404, f"LFS object {oid} not found")
        return json_reply({})

    async def _commit(self, req: Request, repo_type: str, repo_id: str, rev: str) -> Reply:
        raw = await req.body()
        repo = self._writable(req, repo_type, repo_id)
        if req.q("create_pr"):
            raise HubError(501, "create_pr is not supported by this test server")
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        try:
            lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Invalid NDJSON commit payload") from None
        header = next((ln["value"] for ln in lines if ln.get("key") == "header"), {})
        with self.state.lock:
            head = repo.branches[rev]
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[head].files)
            for line in lines:
                self._apply_op(tree, line.get("key"), line.get("value") or {})
            commit = self.state.commit(repo, rev, tree, title=header.get("summary") or "Commit",
                                       message=header.get("description") or "", author=req.ident.user, parent=head)
        url = f"{self.repo_url(repo)}/commit/{commit.sha}"
        return json_reply({"commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None, "success": True})

    def _apply_op(self, tree: dict[str, Blob], key: str | None, value: dict) -> None:
        if key == "header":
            return
        path = value.get("path", "")
        try:
            validate_repo_path(path.rstrip("/") if key == "deletedFolder" else path)
        except ValueError as exc:
            raise HubError(400, str(exc)) from None
        if key == "file":
            content = base64.b64decode(value.get("content", ""))
            tree[path] = self.state.make_blob(content, lfs=False)
        elif key == "lfsFile":
            oid, size = value.get("oid", ""), value.get("size")
            if not SHA256_RE.match(oid) or not self.state.has_object(oid, size):
                raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that does not "
                                    f"exist ({path}: {oid})")
            disk = self.state.object_path(oid)
            tree[path] = self.state.blob_for_object(oid, disk.stat().st_size, disk, lfs=True)
        elif key == "deletedFile":
            if tree.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            doomed = [p for p in tree if p.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del tree[p]
        else:
            raise HubError(400, f"Unknown commit operation: {key}")

    async def _create_branch(self, req: Request, repo_type: str, repo_id: str, branch: str) -> Reply:
        payload = await req.json()
        repo = self._writable(req, repo_type, repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit_at(repo, payload.get("startingPoint") or "main")
        with self.state.lock:
            repo.branches[branch] = start.sha
        return json_reply({})

    async def _delete_branch(self, req: Request, repo_type: str, repo_id: str, branch: str) -> Reply:
        repo = self._writable(req, repo_type, repo_id)
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        with self.state.lock:
            del repo.branches[branch]
        return json_reply({})

    async def _create_tag(self, req: Request, repo_type: str, repo_id: str, rev: str) -> Reply:
        payload = await req.json()
        repo = self._writable(req, repo_type, repo_id)
        tag = payload.get("tag") or ""
        if tag in repo.tags:
            raise HubError(409, f"Tag already exists: {tag}")
        commit = self._commit_at(repo, rev or "main")
        with self.state.lock:
            repo.tags[tag] = commit.sha
        return json_reply({})

    async def _delete_tag(self, req: Request, repo_type: str, repo_id: str, tag: str) -> Reply:
        repo = self._writable(req, repo_type, repo_id)
        if repo.tags.pop(tag, None) is None:
            raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        return json_reply({})


# ---------------------------------------------------------------- small pure helpers -----------------------


async def _watch_disconnect(receive: Callable, gone: asyncio.Event) -> None:
    """Set `gone` when the client hangs up, so a killed downloader does not keep us reading a 1 GiB file."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            gone.set()
            return


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or len(repo_id) > 96 or not all(NAME_RE.match(p) for p in parts) or ".." in repo_id:
        raise ValueError(f"invalid repo id {repo_id!r}: this server wants 'namespace/name'")


def _text(data: bytes | str | Path) -> str:
    if isinstance(data, Path):
        data = data.read_bytes()
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, list) else []


def _card_data(commit: Commit) -> dict:
    """README front matter, which the Hub exposes as cardData (library_name, tags, ...)."""
    readme = commit.files.get("README.md")
    if readme is None or readme.size > 1024 * 1024:
        return {}
    text = _text(readme.read())
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    import yaml  # a dependency of huggingface_hub

    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _tree_entries(commit: Commit, path: str, recursive: bool) -> list[tuple[str, Blob | None]] | None:
    """(path, blob or None for a directory) under `path`, sorted; None when `path` is not a directory."""
    prefix = f"{path}/" if path else ""
    under = {p: b for p, b in commit.files.items() if p.startswith(prefix)}
    if path and not under:
        return None
    entries: dict[str, Blob | None] = {}
    for p, b in under.items():
        rel = p[len(prefix):].split("/")
        for depth in range(1, len(rel)):
            if recursive or depth == 1:
                entries.setdefault(prefix + "/".join(rel[:depth]), None)
        if recursive or len(rel) == 1:
            entries[p] = b
    return sorted(entries.items())


def _last_commit_touching(repo: Repo, commit: Commit, path: str) -> Commit:
    def snapshot(c: Commit) -> Any:
        if path in c.files:
            return c.files[path].oid
        return sorted((p, b.oid) for p, b in c.files.items() if p.startswith(path + "/"))

    current, mine = commit, snapshot(commit)
    while current.parent and current.parent in repo.commits:
        parent = repo.commits[current.parent]
        if snapshot(parent) != mine:
            break
        current = parent
    return current


# ---------------------------------------------------------------- CLI ---------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.hubserver", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="storage directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cdn-port", type=int, default=0)
    parser.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR",
                        help="serve the files of DIR as a repo (repeatable)")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN=USER[:ORG,ORG]",
                        help="accept a token (repeatable)")
    parser.add_argument("--lfs-mode", choices=("cdn", "direct"), default="cdn")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = HubServer(args.root, host=args.host, port=args.port, cdn_port=args.cdn_port)
    server.lfs_mode = args.lfs_mode
    for spec in args.token:
        token, _, who = spec.partition("=")
        user, _, orgs = (who or "alice").partition(":")
        server.add_token(token, user, [o for o in orgs.split(",") if o])
    for spec in args.repo:
        repo_id, _, directory = spec.partition("=")
        sha = server.add_repo(repo_id, files_from_dir(Path(directory)))
        log.info("repo %s at %s from %s", repo_id, sha, directory)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        print(json.dumps({"endpoint": server.endpoint, "cdn": server.cdn_endpoint}), flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
