"""The settings a job carries from the command that queued it: Hub endpoint, cache directory, token, offline switch.

Why: a worker is a long-lived process started with some environment; the command that queues a job may run with
another (`HF_TOKEN=… mlxk push`, `HF_HOME=/other mlxk pull`). Whichever worker runs the job must use the queuing
command's settings, never its own. Endpoint and cache are not secret: they ride on the job row (`settings`, shown
by `jobs show`). The token is: it is written to `$MLXK_HOME/secrets/<job id>` (folder 0700, file 0600, created
with O_EXCL so nothing else's permissions apply), read by the task, and removed when the job ends
(`drop`, called wherever a job reaches succeeded, failed or cancelled). It never enters the row, the Huey task,
a log line or a process's arguments.

What else belongs to the job (a worker must not read it from its own environment, which is whatever the process
that happened to start it had, e.g. `HF_HUB_OFFLINE=1 mlxk list`):
- HF_HUB_OFFLINE: `offline` on the row; a pull job of an offline command is refused, one of an online command runs
  even in a worker started offline (rows from before this field use the worker's own switch).
- MLXK_MAX_RATE, MLXK_PULL_CONNECTIONS, MLXK_MAX_PULLS: already the pull job's args (mlxk.jobs.enqueue_pull).
Left to the worker's environment: proxies (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY; they may hold credentials, and
httpx applies them per process, not per job) and huggingface_hub's own HF_HUB_* switches read by `push` (HfApi reads
them at import; mlxk's pull reads none of them). Start the worker (`mlxk worker`) with those you need.
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
    offline: bool = False      # HF_HUB_OFFLINE of the queuing command: a pull may not ask the Hub

    def __repr__(self) -> str:   # never print the token
        return (f"JobSettings(endpoint={self.endpoint!r}, cache={str(self.cache)!r}, "
                f"token={'***' if self.token else None}, offline={self.offline!r})")


def capture() -> tuple[dict, str | None]:
    """This process's settings as (the record stored on the row, the token)."""
    s = settings()
    return {"endpoint": s.hf_endpoint, "cache": str(s.hf_hub_cache), "offline": s.hub_offline}, s.hf_token


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
        return JobSettings(s.hf_endpoint, s.hf_hub_cache, s.hf_token, s.hub_offline)
    try:
        token = secret_path(job["id"]).read_text().strip() or None
    except OSError:
        token = None
    offline = record["offline"] if "offline" in record else settings().hub_offline
    return JobSettings(record["endpoint"], Path(record["cache"]), token, bool(offline))
