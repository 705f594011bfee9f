"""Pull and push against the Hugging Face Hub, as plain domain functions the job queue calls.

Why our own fetcher: huggingface_hub 2.4 restarts every download from zero in a new process and orphans its
`<etag>.<8hex>.incomplete` files; it checks plain-HTTP downloads by size only. A job queue that gets killed and
retried needs downloads that resume across processes and bytes that are verified, so `pull` lists the files
itself and writes the standard cache layout (blobs/snapshots/refs) the way huggingface_hub does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("mlxk.hub")


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


def pull(repo_id: str, *, revision: str | None = None, include=None, exclude=None, cache_dir: Path,
         endpoint: str, token: str | None = None, progress: ProgressFn | None = None,
         should_stop: StopFn | None = None, max_workers: int = 8) -> PullResult:
    raise NotImplementedError


def remote_revision(repo_id: str, *, revision: str | None = None, endpoint: str, token: str | None = None) -> str:
    raise NotImplementedError


def sweep_partials(cache_dir: Path, repo_id: str, *, keep=()) -> int:
    raise NotImplementedError


def push(workspace: Path, repo_id: str, *, private: bool = False, public: bool = False, dry_run: bool = False,
         endpoint: str, token: str | None = None, message: str | None = None, progress: ProgressFn | None = None,
         should_stop: StopFn | None = None) -> PushResult:
    raise NotImplementedError


def check_workspace(workspace: Path) -> list:
    raise NotImplementedError
