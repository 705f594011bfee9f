"""The settings a job carries from the command that queued it: Hub endpoint, cache directory, token.

Why: a worker is a long-lived process started with some environment; the command that queues a job may run with
another (`HF_TOKEN=… mlxk push`, `HF_HOME=/other mlxk pull`). Whichever worker runs the job must use the queuing
command's settings, never its own. Endpoint and cache are not secret: they ride on the job row (`settings`, shown
by `jobs show`). The token is: it is written to `$MLXK_HOME/secrets/<job id>` (folder 0700, file 0600, created
with O_EXCL so nothing else's permissions apply), read by the task, and removed when the job ends
(`drop`, called wherever a job reaches succeeded, failed or cancelled). It never enters the row, the Huey task,
a log line or a process's arguments.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlxk.config import settings


@dataclass(frozen=True)
class JobSettings:
    endpoint: str
    cache: Path
    token: str | None

    def __repr__(self) -> str:   # never print the token
        return f"JobSettings(endpoint={self.endpoint!r}, cache={str(self.cache)!r}, token={'***' if self.token else None})"


def capture() -> tuple[dict, str | None]:
    """This process's settings as (the record stored on the row, the token)."""
    s = settings()
    return {"endpoint": s.hf_endpoint, "cache": str(s.hf_hub_cache)}, s.hf_token


def secret_path(job_id: str) -> Path:
    if not job_id.isalnum():   # a job id is hex; anything else must not become a path
        raise ValueError(f"bad job id {job_id!r}")
    return settings().home / "secrets" / job_id


def store_token(job_id: str, token: str | None) -> None:
    """Write the job's token, readable by the user alone; nothing when there is no token."""
    if not token:
        return
    path = secret_path(job_id)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token)


def drop(job_id: str) -> None:
    """Forget the job's token (the job ended)."""
    try:
        secret_path(job_id).unlink(missing_ok=True)
    except ValueError:
        pass


def load(job: dict) -> JobSettings:
    """The settings `job` runs with. A row without a record (queued by an older mlxk) uses this process's."""
    record = job.get("settings")
    if not record:
        s = settings()
        return JobSettings(s.hf_endpoint, s.hf_hub_cache, s.hf_token)
    try:
        token = secret_path(job["id"]).read_text().strip() or None
    except OSError:
        token = None
    return JobSettings(record["endpoint"], Path(record["cache"]), token)
