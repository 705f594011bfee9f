"""Jobs as the CLI (and the api) see them: enqueue, find, follow, cancel, retry.

Why this layer: a job command must return in a few hundred milliseconds, so nothing here imports
huggingface_hub or mlx; it asks workers.queue to record and queue the job (with this command's settings, see
workers.jobsettings) and workers.process to make sure some consumer is alive to run it. What a kind means
(priority, dedupe, lock, inline) is declared once, in workers.tasks.KINDS. Imports go one way: this module uses
workers/, never the reverse. Every read notices jobs whose worker died (workers.process.notice_dead), so no view
shows a dead job as running.
"""
from __future__ import annotations

import logging
import shlex
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from mlxk import cache
from mlxk.clock import parse_iso
from mlxk.config import settings
from mlxk.db import jobs as jobs_db
from mlxk.errors import (AmbiguousMatch, Cancelled, Conflict, JobCancelled, JobFailed, JobNotFound,
                         HubError, MlxkError, ModelNotFound, WorkspacePath)
from mlxk.workers import process
# Re-exported for callers that ask the jobs layer about processes (the server's runtime, tests).
from mlxk.workers import queue
from mlxk.workers.process import (STALE_S, connect, ensure_worker, holder_alive, hostname,  # noqa: F401
                                  live_workers, pid_alive)

log = logging.getLogger("mlxk.jobs")

RESCAN_AFTER_S = 30.0    # request_scan does not repeat a scan of the same repos that ended this recently
RECENT_FINISHED = 10     # `mlxk jobs` shows every active job and this many finished ones


@dataclass
class Enqueued:
    job: dict
    created: bool                  # False: an active job for the same thing already existed; this is that job
    worker_started: int | None = None   # pid of a worker started in the background for it
    retry_of: str | None = None


# ---------------------------------------------------------------- enqueue

def _enqueue(kind: str, target: str, args: dict, *, message: str | None = None, start_worker: bool = True,
             dedupe: bool | None = None) -> Enqueued:
    from mlxk.workers.tasks import KINDS  # lazy: keeps `mlxk list` light

    dedupe = KINDS[kind].dedupe if dedupe is None else dedupe
    job, created = queue.submit(kind, target, args, message=message, dedupe=dedupe)
    with closing(connect()) as conn:
        started = ensure_worker(conn) if start_worker else None
    return Enqueued(job=job_object(job), created=created, worker_started=started)


def enqueue_pull(name: str, *, include=(), exclude=(), max_rate: float | None = None) -> Enqueued:
    """Queue a pull. Its limits ride on the job (`jobs show` lists them under args): `max_rate` in bytes/s
    (default MLXK_MAX_RATE; 0 = none), `max_pulls` (MLXK_MAX_PULLS) and `connections` (MLXK_PULL_CONNECTIONS)."""
    from mlxk import names  # lazy: keeps `mlxk list` light

    expanded, _ = pull_name(name)   # mlx-knife's rules, for the CLI and the api alike
    ref = names.parse(expanded, allow_bare=False)
    s = settings()
    rate = s.max_rate if max_rate is None else max_rate
    args = {"revision": ref.revision, "include": list(include) or None, "exclude": list(exclude) or None,
            "max_rate": rate or None, "max_pulls": s.max_pulls or None, "connections": s.pull_connections}
    return _enqueue("pull", ref.repo, args)


def pull_name(name: str) -> tuple[str, str | None]:
    """What a pull of `name` fetches, as mlx-knife 2.0.8 resolves it: (the name to pull, the repo id a short name
    became, or None). `org/name[@REV]` is itself. A bare `NAME[@REV]` that means one cached model (names.resolve:
    exact, then the one model of that name, then the one substring match) is that model, so `pull Phi-3-mini`
    updates the cached mlx-community/Phi-3-mini-4k-instruct-4bit; one that matches several cached models is an
    ambiguous_match; one that matches none is mlx-community/NAME (names.expand_for_pull)."""
    from mlxk import names

    ref = names.parse(name, allow_bare=True)
    if "/" not in ref.repo or ref.repo.lower() in aliases():   # an alias may hold a '/' too
        try:
            repo, _fuzzy = resolve_cached(ref.repo)
        except ModelNotFound:
            pass
        else:
            return str(names.ModelRef(repo, ref.revision)), repo
    return names.expand_for_pull(name)


def cached_for_offline_pull(name: str) -> tuple[str, str]:
    """HF_HUB_OFFLINE=1 (huggingface_hub's own switch): a pull cannot ask the Hub, so it answers from the cache at
    once, as mlx-knife does: (repo id, cached commit) when `name` (bare = mlx-community/NAME, `@REV` a cached
    revision) is cached; else HubError saying why nothing can be downloaded. No job is queued either way. (An
    unreachable Hub without that switch is an error: the pull could not check for a newer revision.)"""
    from mlxk import names  # lazy: keeps `mlxk list` light

    found = cached_copy(name)
    if found is None:
        ref = names.parse(pull_name(name)[0], allow_bare=False)
        raise HubError(f"HF_HUB_OFFLINE is set and {ref} is not cached, so it cannot be downloaded; unset "
                       "HF_HUB_OFFLINE to pull it.", repo=ref.repo)
    return found


def cached_copy(name: str) -> tuple[str, str] | None:
    """(repo id, commit) of the cached snapshot a pull of `name` would fetch (pull_name(); `@REV` a cached
    revision, else the current one), or None when it is not cached."""
    from mlxk import names  # lazy: keeps `mlxk list` light

    expanded, _ = pull_name(name)
    ref = names.parse(expanded, allow_bare=False)
    path = cache.repo_dir(settings().hf_hub_cache, ref.repo)
    revisions = cache.list_revisions(path)
    try:
        sha = (pick_cached_revision(ref.repo, ref.revision) if ref.revision
               else cache.current_revision(path, revisions) if revisions else None)
    except ModelNotFound:
        sha = None
    return None if sha is None else (ref.repo, sha)


def enqueue_clone(name: str, dest: Path) -> Enqueued:
    from mlxk import names  # lazy: keeps `mlxk list` light

    ref = names.parse(name, allow_bare=True)
    repo = ref.repo if "/" in ref.repo and ref.repo.lower() not in aliases() else resolve_cached(ref.repo)[0]
    revision = ref.revision
    if revision:
        try:  # the cache's rules first (show's, rm's): an ambiguous hash prefix lists its matches, offline
            revision = pick_cached_revision(repo, revision)
        except ModelNotFound:
            pass   # not a cached revision: the clone's pull asks the Hub for it
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and any(dest.iterdir()):
        raise Conflict(f"{dest} exists and is not empty; clone into a new or empty directory.", path=str(dest))
    return _enqueue("clone", repo, {"revision": revision, "dest": str(dest)})


def enqueue_push(workspace: Path, repo_id: str, *, private: bool = False, public: bool = False,
                 dry_run: bool = False, force: bool = False, message: str | None = None) -> Enqueued:
    from mlxk import hub, names  # lazy: keeps `mlxk list` light

    names.validate_repo_id(repo_id)
    workspace = Path(workspace).expanduser().resolve()
    if not workspace.is_dir():
        raise MlxkError(f"{workspace} is not a directory; push needs a workspace made by `mlxk clone`.")
    if private and public:
        raise MlxkError("--private and --public contradict each other; give one.")
    hub.refuse_unfit(workspace, force=force)   # at once, offline; the job checks again before uploading
    args = {"workspace": str(workspace), "private": private, "public": public, "dry_run": dry_run,
            "force": force, "message": message}
    return _enqueue("push", repo_id, args)


def runs_inline(kind: str) -> bool:
    """Does a job of `kind` run inside the command that asks for it (workers.tasks.KINDS)?"""
    from mlxk.workers.tasks import KINDS  # lazy: keeps `mlxk list` light

    return KINDS[kind].inline


def check_workspace(directory: Path) -> list[dict]:
    """The findings (JSON-ready dicts) that would block pushing `directory`; offline, no job."""
    from mlxk import hub  # lazy: keeps `mlxk list` light
    from mlxk.workers.tasks import plain  # lazy: keeps `mlxk list` light

    return plain(hub.check_workspace(directory))


def enqueue_scan(repos=None, *, force: bool = False, start_worker: bool = True) -> Enqueued:
    """A health scan (all repos, or `repos`); joins a scan that is still queued rather than adding another.

    `repos` come from users (the CLI, `POST /api/jobs/scan`): each must be a valid repo id (mlxk.names), else
    InvalidName before anything is queued."""
    from mlxk import names  # lazy: keeps `mlxk list` light

    for repo in repos or ():
        names.validate_repo_id(repo, allow_bare=True)
    return _enqueue_scan(repos, force=force, start_worker=start_worker)


def _enqueue_scan(repos, *, force: bool, start_worker: bool) -> Enqueued:
    job, created = queue.submit_scan(repos, force=force)
    with closing(connect()) as conn:
        started = ensure_worker(conn) if start_worker else None
    return Enqueued(job=job_object(job), created=created, worker_started=started)


def request_scan(repo_ids) -> str | None:
    """Cheap hook for `mlxk list`: make sure a scan of `repo_ids` is pending and a worker will run it."""
    repo_ids = sorted(set(repo_ids or ()))
    if not repo_ids:
        return None
    with closing(connect()) as conn:
        covering = _covering_scan(conn, repo_ids)
    if covering is not None:
        return covering
    # Ids read from the cache's own folder names, not typed by anyone: a folder whose name is no valid repo id
    # (made by hand) is still scanned where it is, never refused.
    return _enqueue_scan(repo_ids, force=False, start_worker=True).job["id"]


def _covering_scan(conn, repo_ids: list[str]) -> str | None:
    """A running scan of these repos, or one that finished moments ago: asking again would only loop.

    `list` asks whenever a repo's runtime verdict is pending; if a scan could not settle it, a new job on every
    `list` would fill the history without changing anything.
    """
    recent = time.time() - RESCAN_AFTER_S
    for job in jobs_db.list_jobs(conn, kind="scan", limit=5):
        if job["state"] == "queued":
            continue
        if job["state"] != "running" and (parse_iso(job["finished_at"]) or 0) < recent:
            continue
        scope = (job["args"] or {}).get("repos")
        if scope is None or set(repo_ids) <= set(scope):
            return job["id"]
    return None


# ---------------------------------------------------------------- read

def job_object(row: dict) -> dict:
    """The public shape of a job (CLI --json, jobs API)."""
    total, done = row.get("bytes_total"), row.get("bytes_done") or 0
    percent = round(100.0 * done / total, 1) if total else (100.0 if row["state"] == "succeeded" else None)
    return {
        "id": row["id"],
        "kind": row["kind"],
        "target": row["target"],
        "args": row["args"] or {},
        "state": row["state"],
        "progress": {
            "bytes_done": done, "bytes_total": total,
            "files_done": row.get("files_done") or 0, "files_total": row.get("files_total"),
            "percent": percent, "rate": row.get("rate"), "eta": row.get("eta"),
        },
        "message": row.get("message"),
        "error": row.get("error"),
        "result": row.get("result"),
        "attempts": row.get("attempts") or 0,
        "cancel_requested": bool(row.get("cancel_requested")),
        "worker": row.get("worker"),
        "task_id": row.get("task_id"),
        "settings": row.get("settings"),
        "created_at": row.get("created_at"),
        "started_at": row.get("started_at"),
        "finished_at": row.get("finished_at"),
        "updated_at": row.get("updated_at"),
    }


def find_job(conn, prefix: str) -> dict:
    """The row of the job `prefix` names (a full id or a unique prefix)."""
    prefix = (prefix or "").strip().lower()
    if not prefix:
        raise JobNotFound("give a job id (see `mlxk jobs`).")
    row = jobs_db.get_job(conn, prefix)
    if row:
        return row
    hits = jobs_db.jobs_with_prefix(conn, prefix)
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise AmbiguousMatch(f"job id {prefix!r} matches {len(hits)} jobs: {', '.join(h['id'] for h in hits)}. "
                             "Give more characters.", matches=[h["id"] for h in hits])
    raise JobNotFound(f"no job matches {prefix!r}. List jobs with `mlxk jobs --all`.", id=prefix)


def _read(conn, fetch):
    """Rows from `fetch(conn)`, after any whose worker died was re-queued (read again when one was)."""
    rows = fetch(conn)
    if process.notice_dead(conn, rows):
        rows = fetch(conn)
    return rows


def get(prefix: str) -> dict:
    with closing(connect()) as conn:
        return job_object(_read(conn, lambda c: [find_job(c, prefix)])[0])


def list_jobs(*, all_jobs: bool = False, states=None, kind: str | None = None) -> list[dict]:
    def fetch(conn):
        if all_jobs or states:
            return jobs_db.list_jobs(conn, states=states, kind=kind)
        return (jobs_db.list_jobs(conn, states=jobs_db.ACTIVE, kind=kind)
                + jobs_db.list_jobs(conn, states=jobs_db.FINISHED, kind=kind, limit=RECENT_FINISHED))

    with closing(connect()) as conn:
        return [job_object(r) for r in _read(conn, fetch)]


def active(*, kind: str | None = None, target: str | None = None) -> list[dict]:
    with closing(connect()) as conn:
        return [job_object(r) for r in _read(conn, lambda c: jobs_db.active_jobs(c, kind=kind, target=target))]


def keep_worker() -> int | None:
    """For a long-lived reader (`mlxk serve`, every few seconds): while jobs are queued or running, re-queue those
    whose worker died and keep a worker alive; the pid of a worker started, else None."""
    with closing(connect()) as conn:
        if not _read(conn, lambda c: jobs_db.active_jobs(c)):
            return None
        return ensure_worker(conn)


def follow(job_id: str, on_update=None, *, poll_s: float = 0.25, timeout_s: float | None = None) -> dict:
    """Poll a job until it ends; `on_update(job)` sees every poll. Restarts a worker if the last one died."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    next_check = time.monotonic() + STALE_S / 2
    with closing(connect()) as conn:
        while True:
            rows = _read(conn, lambda c: [row for row in [jobs_db.get_job(c, job_id)] if row])
            if not rows:
                raise JobNotFound(f"job {job_id} disappeared from {settings().state_db}.", id=job_id)
            job = job_object(rows[0])
            if on_update:
                on_update(job)
            if job["state"] in jobs_db.FINISHED:
                return job
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + STALE_S / 2
                ensure_worker(conn)
            if deadline is not None and time.monotonic() >= deadline:
                return job
            time.sleep(poll_s)


def outcome_error(job: dict) -> MlxkError | None:
    """The error a finished, unsuccessful job ends a command with: the job's own error rebuilt as its class
    (MlxkError.from_dict: hub_error, disk_full…, so scripts can match), its message prefixed with the job."""
    if job["state"] == "succeeded":
        return None
    error = dict(job.get("error") or {})
    what = f"job {job['id']} ({job['kind']} {job['target']})"
    if job["state"] == "cancelled":
        text = error.get("message") or "cancelled"
        return JobCancelled(f"{what} was cancelled: {text}", job_id=job["id"], state="cancelled")
    if not error.get("type"):
        return JobFailed(f"{what} failed: {error.get('message') or 'unknown error'}", job_id=job["id"],
                         state=job["state"])
    failure = MlxkError.from_dict(error, message=f"{what} failed: {error.get('message') or 'unknown error'}")
    failure.details.update(job_id=job["id"], state=job["state"])
    return failure


# ---------------------------------------------------------------- cancel / retry

def cancel(prefix: str, *, purge: bool = False, wait_s: float = 3.0) -> dict:
    """Queued → cancelled now (its Huey task revoked); running → the task stops cooperatively within ~2 s."""
    from mlxk.workers import signals  # lazy: keeps `mlxk list` light

    level = 2 if purge else 1
    with closing(connect()) as conn:
        row = find_job(conn, prefix)
        if row["state"] in jobs_db.FINISHED:
            raise Conflict(f"job {row['id']} already {row['state']}; there is nothing to cancel.", id=row["id"])
        if row["state"] == "queued":
            done = signals.finish(conn, row["id"], state="cancelled", from_states=("queued",),
                                  message="cancelled before it started",
                                  error=Cancelled("cancelled before it started").to_dict())
            jobs_db.update_job(conn, row["id"], cancel_requested=level)
            if done:
                _revoke(row["task_id"])
                return job_object(jobs_db.get_job(conn, row["id"]))
        jobs_db.update_job(conn, row["id"], where_state="running", cancel_requested=level)
        row = jobs_db.get_job(conn, row["id"])
        if row["state"] == "running" and not holder_alive(conn, row["worker"]):
            signals.finish(conn, row["id"], state="cancelled", message="cancelled (its worker was gone)",
                           error=Cancelled("cancelled while its worker was gone").to_dict())
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            row = jobs_db.get_job(conn, row["id"])
            if row["state"] != "running":
                break
            time.sleep(0.1)
        return job_object(jobs_db.get_job(conn, row["id"]))


def _revoke(task_id: str | None) -> None:
    if not task_id:
        return

    queue.revoke(queue.get_huey(), task_id)


def retry(prefix: str) -> Enqueued:
    """A failed or cancelled job → a NEW job with the same arguments (the old row stays as history)."""
    with closing(connect()) as conn:
        row = find_job(conn, prefix)
    if row["state"] not in ("failed", "cancelled"):
        raise Conflict(f"job {row['id']} is {row['state']}; only failed or cancelled jobs can be retried.",
                       id=row["id"])
    from mlxk.workers.tasks import KINDS  # lazy: keeps `mlxk list` light

    # A new job, queued by this command: it runs with this command's settings, not the old job's.
    message = f"retry of {row['id']}"
    if KINDS[row["kind"]].inline:
        outcome = run_inline_job(row["kind"], row["target"], row["args"] or {}, message=message)
    else:
        outcome = _enqueue(row["kind"], row["target"], row["args"] or {}, message=message)
    outcome.retry_of = row["id"]
    return outcome


# ---------------------------------------------------------------- rm

@dataclass
class RemovalTarget:
    repo_id: str
    revision: str | None       # full hash, or None for the whole repo
    fuzzy: bool
    alias: str | None = None   # set: the name is an alias (/api/copy) of repo_id, and rm removes that alias only


def cached_repo_ids() -> list[str]:
    return [repo_id for repo_id, _entry in cache.iter_repo_dirs(settings().hf_hub_cache)]


def aliases() -> dict[str, str]:
    """Every alias (Ollama's /api/copy, kept in state.db): its key (names.alias_key) → the repo id it names. The
    same table index.resolve reads, so a name means the same model to rm, pull and clone as to show and run."""
    from mlxk.db import models as models_db  # lazy: keeps `mlxk list` light

    with closing(connect()) as conn:
        return models_db.aliases(conn)


def resolve_cached(name: str) -> tuple[str, bool]:
    """(repo id, fuzzy?) of the cached repo `name` means, by names.resolve's rules with the aliases (an alias is
    an exact name of its model, so not fuzzy)."""
    from mlxk import names  # lazy: keeps `mlxk list` light

    known = aliases()
    repo = names.resolve(name, cached_repo_ids(), known)
    return repo, repo.lower() != name.lower() and known.get(name.lower()) != repo


def resolve_removal(name: str) -> RemovalTarget:
    """What `rm NAME[@REV]` means: the same names, aliases, branches, tags and hash prefixes as `show` and `run`.

    An alias (exactly, case-insensitive, without '@REV') is a target of its own: rm forgets the alias and keeps the
    model, as Ollama's `rm` of a copy leaves its source (an alias whose model is gone is removed the same way).
    `ALIAS@REV` names a revision of the aliased model but counts as fuzzy: deleting files through an alias needs
    --force (or the model's own name)."""
    from mlxk import names  # lazy: keeps `mlxk list` light

    if names.is_workspace_path(name):   # mlx-knife's `workspace_model` refusal: rm never deletes outside the cache
        path = Path(name).expanduser().resolve()
        raise WorkspacePath(
            f"Cannot delete workspace model {name!r}: mlxk rm removes models from the HF cache only, never a folder "
            f"outside it. If you mean to delete the folder, do it yourself: rm -rf {shlex.quote(str(path))}",
            name=name, path=str(path))
    ref = names.parse(name, allow_bare=True)
    known = aliases()
    if ref.repo.lower() in known:
        if not ref.revision:
            return RemovalTarget(known[ref.repo.lower()], None, False, alias=ref.repo.lower())
        repo = names.resolve(ref.repo, cached_repo_ids(), known)
        return RemovalTarget(repo, pick_cached_revision(repo, ref.revision), True)
    repo, fuzzy = resolve_cached(ref.repo)
    revision = pick_cached_revision(repo, ref.revision) if ref.revision else None
    return RemovalTarget(repo, revision, fuzzy)


def remove_alias(target: RemovalTarget) -> dict:
    """rm of an alias: forget it (the model stays); instant, no job. What `rm --json`, /api/jobs/rm and
    /api/delete answer: {"alias", "repo_id", "action": "alias_removed", "message"}."""
    from mlxk import index  # lazy: keeps `mlxk list` light

    with closing(connect()) as conn:
        index.remove_alias(conn, target.alias)
    return {"alias": target.alias, "repo_id": target.repo_id, "action": "alias_removed",
            "message": alias_removal_message(target)}


def alias_removal_message(target: RemovalTarget, *, dry_run: bool = False) -> str:
    verb = "Would remove" if dry_run else "Removed"
    return (f"{verb} the alias {target.alias!r} only; {target.repo_id} stays cached (an alias is another name "
            f"for a model, as an Ollama copy). To delete the model itself: mlxk rm {target.repo_id}")


def pick_cached_revision(repo: str, revision: str) -> str:
    """The full hash of the cached snapshot `repo@revision` names (names.pick_revision over the cache's refs)."""
    from mlxk import cache, names  # lazy: keeps `mlxk list` light

    path = cache.repo_dir(settings().hf_hub_cache, repo)
    return names.pick_revision(repo, revision, cache.list_revisions(path), cache.refs(path))


def removal_refusal(target: RemovalTarget) -> Conflict | None:
    """Why rm would refuse `target` now (a job holds the model), or None: what `rm --dry-run` reports."""
    with closing(connect()) as conn:
        try:
            _refuse_if_busy(conn, target.repo_id)
        except Conflict as error:
            return error
    return None


def plan_removal(target: RemovalTarget):
    return cache.plan_remove(settings().hf_hub_cache, target.repo_id, target.revision)


def _refuse_if_busy(conn, repo_id: str) -> None:
    """A job that holds (or waits for) the model refuses rm, except: scans (they only read), other rm jobs (rm twice
    is rm once; the lock orders them), and jobs whose process died (they never hold anything)."""
    from mlxk.workers.tasks import KINDS  # lazy: keeps `mlxk list` light

    # A plain read, not _read: re-queueing a dead rm here would hand it to a worker that then holds the model.
    busy = [j for j in jobs_db.active_jobs(conn, target=repo_id)
            if KINDS[j["kind"]].locks_model and j["kind"] != "rm"
            and not (j["state"] == "running" and not holder_alive(conn, j["worker"]))]
    if busy:
        job = busy[0]
        raise Conflict(f"{repo_id} is in use by job {job['id']} ({job['kind']}, {job['state']}). Wait for it "
                       f"(`mlxk jobs watch {job['id']}`) or cancel it (`mlxk jobs cancel {job['id']}`), then retry.",
                       job_id=job["id"])


def run_inline_job(kind: str, target: str, args: dict, *, message: str | None = None) -> Enqueued:
    """An inline kind (rm: it is quick) runs in the calling process, recorded, locked and finished like any job.
    Only its row is written (no Huey task): a CLI killed mid-way leaves a `running` row whose holder is dead, which
    the next reader or worker re-queues (workers.process), and run_rm decides whether it may go on."""
    from mlxk.workers import queue, tasks  # lazy: keeps `mlxk list` light

    with closing(connect()) as conn:
        _refuse_if_busy(conn, target)
    job, _created = queue.submit(kind, target, args, message=message)
    tasks.run_inline(job["id"])
    with closing(connect()) as conn:
        return Enqueued(job=job_object(jobs_db.get_job(conn, job["id"])), created=True)


def remove(target: RemovalTarget) -> Enqueued:
    if target.repo_id not in cached_repo_ids():
        raise ModelNotFound(f"{target.repo_id} is not cached.", name=target.repo_id)
    return run_inline_job("rm", target.repo_id, {"revision": target.revision})
