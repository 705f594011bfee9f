"""Job commands: pull, rm, clone, push, jobs (list, show, watch, cancel, retry) and the hidden `worker`.

Each command parses, calls mlxk.jobs, and renders. A job command prints the job id on stdout and returns at
once; `--wait` follows the job with a progress line on stderr and exits with the job's outcome.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from mlxk import cache, jobs
from mlxk.commands import SuggestingGroup, log_options
from mlxk.config import parse_rate, settings
from mlxk.errors import AmbiguousMatch, MlxkError, WorkspaceInvalid, WorkspacePath, knife_type
from mlxk.output import (Output, human_duration, human_size, is_tty, json_command, json_mode, relative_time, say,
                         table)


# ---------------------------------------------------------------- progress on stderr

def progress_text(job: dict) -> str:
    """`45.2%  12.3 MB/27.0 MB  3.1 MB/s  ETA 5s` — or what the job is doing when it has no byte counts."""
    p = job["progress"]
    if job["state"] == "queued":
        return job.get("message") or "queued"
    parts = []
    if p["bytes_total"]:
        parts.append(f"{p['percent'] or 0:5.1f}%  {human_size(p['bytes_done'])}/{human_size(p['bytes_total'])}")
    if p["files_total"]:
        parts.append(f"{p['files_done']}/{p['files_total']} files")
    if p["rate"]:
        parts.append(f"{human_size(p['rate'])}/s")
    if p["eta"] is not None and job["state"] == "running" and p["rate"]:
        parts.append(f"ETA {human_duration(p['eta'])}")
    if job.get("message") and not parts:
        parts.append(job["message"])
    return "  ".join(parts) or job["state"]


def progress_cell(job: dict) -> str:
    p = job["progress"]
    if job["state"] == "succeeded":
        return "done"
    if p["bytes_total"]:
        return f"{p['percent'] or 0:.0f}% of {human_size(p['bytes_total'])}"
    if p["files_total"]:
        return f"{p['files_done']}/{p['files_total']} files"
    return "-"


class ProgressLine:
    """One live line on a terminal; on a pipe, a line per change at most every few seconds."""

    def __init__(self, stream=None, *, quiet_interval_s: float = 5.0):
        self.stream = stream or sys.stderr
        self.tty = is_tty(self.stream)
        self.quiet_interval_s = quiet_interval_s
        self._last_text = None
        self._last_print = 0.0
        self._width = 0

    def update(self, job: dict) -> None:
        text = f"{job['kind']} {job['target']} [{job['state']}] {progress_text(job)}"
        now = time.monotonic()
        if self.tty:
            pad = max(self._width - len(text), 0)
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._width = len(text)
        elif text != self._last_text and (now - self._last_print >= self.quiet_interval_s
                                          or job["state"] != "running"):
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_print = now
        self._last_text = text

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def follow_job(job_id: str) -> Output:
    """Follow a job to its end with a progress line; the Output carries its outcome."""
    line = ProgressLine()
    try:
        final = jobs.follow(job_id, line.update)
    except KeyboardInterrupt:
        line.close()
        say(f"Stopped waiting; job {job_id} keeps running. Follow it with `mlxk jobs watch {job_id}`, "
            f"stop it with `mlxk jobs cancel {job_id}`.")
        return Output(data=jobs.get(job_id), text=job_id, exit_code=130)
    line.close()
    error = jobs.outcome_error(final)
    if error is None:
        say(_summary(final))
    return Output(data=final, text=job_id, error=error)


def _summary(job: dict) -> str:
    result = job.get("result") or {}
    took = ""
    if job.get("started_at") and job.get("finished_at"):
        from mlxk.clock import parse_iso

        took = f" in {human_duration(parse_iso(job['finished_at']) - parse_iso(job['started_at']))}"
    if job["kind"] == "pull":
        state = "already up to date" if result.get("up_to_date") else \
            f"{human_size(result.get('bytes_downloaded'))} downloaded"
        return f"Pulled {job['target']}@{(result.get('revision') or '')[:12]} ({state}){took}."
    if job["kind"] == "rm":
        revision = (job.get("args") or {}).get("revision")
        what = f"{job['target']}@{revision[:12]}" if revision else job["target"]
        return f"Removed {what} ({human_size(result.get('bytes_freed'))} freed){took}."
    if job["kind"] == "clone":
        return f"Cloned {job['target']} into {job['args'].get('dest')}{took}."
    if job["kind"] == "push":
        if result.get("dry_run"):
            uploads = [step for step in result.get("plan") or [] if step["action"] == "upload"]
            where = "a new " + ("private" if result.get("private") else "public") + " repo " \
                if result.get("revision") is None else ""
            return (f"Dry run: would push {len(uploads)} file(s) ({human_size(sum(s['size'] for s in uploads))}) "
                    f"from {job['args'].get('workspace')} to {where}{job['target']}; nothing was uploaded.")
        return f"Pushed {job['args'].get('workspace')} to {job['target']}{took}."
    return f"Job {job['id']} ({job['kind']}) succeeded{took}."


def _queued(outcome: jobs.Enqueued, wait: bool) -> Output:
    job = outcome.job
    if outcome.retry_of:
        say(f"Retry of job {outcome.retry_of} queued as a new job {job['id']}.")
    elif not outcome.created:
        say(f"A {job['kind']} of {job['target']} is already {job['state']}: job {job['id']}.")
    else:
        say(f"Queued {job['kind']} of {job['target']} as job {job['id']}.")
    if wait:
        return follow_job(job["id"])
    if not jobs.runs_inline(job["kind"]):
        say(f"Follow it with `mlxk jobs watch {job['id']}`.")
    data = dict(job, existing=not outcome.created)
    if outcome.retry_of:
        data["retry_of"] = outcome.retry_of
    return Output(data=data, text=job["id"])


wait_option = click.option("--wait", is_flag=True, help="Follow the job and exit with its outcome.")


# ---------------------------------------------------------------- pull / rm / clone / push

@click.command("pull")
@click.argument("name")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching GLOB (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files matching GLOB (repeatable).")
@click.option("--max-rate", metavar="RATE", callback=lambda _ctx, _param, value: _rate(value),
              help="Cap this pull's bandwidth: bytes/s like 20M, 500k, 8MiB (default MLXK_MAX_RATE; 0: none).")
@wait_option
@json_command
def pull_command(name, include, exclude, max_rate, wait):
    """Download a model from the Hub into the HF cache (a background job)."""
    try:
        _, expanded = jobs.pull_name(name)
        if settings().hub_offline:
            repo, sha = jobs.cached_for_offline_pull(name)
            return Output(data={"model": repo, "download_status": "already_exists", "hash": sha,
                                "message": f"Model {repo} already exists in cache (HF_HUB_OFFLINE is set: not checked "
                                           "against the Hub for a newer revision)", "expanded_name": expanded},
                          text=f"{repo}@{sha[:12]} is cached; HF_HUB_OFFLINE is set, so it was not checked for a "
                               "newer revision.")
        result = _queued(jobs.enqueue_pull(name, include=include, exclude=exclude, max_rate=max_rate), wait)
    except MlxkError as error:   # mlx-knife's API: a refused pull still says its download_status
        status = "unknown" if isinstance(error, AmbiguousMatch) else "error"   # as its spec's examples say
        return Output(data={"model": None, "download_status": status, "message": error.message,
                            "expanded_name": None}, error=error)
    if isinstance(result.data, dict):
        result.data = _pull_data(result.data, expanded)
        if result.error is not None:
            if knife_type(result.error.type, "pull") == "access_denied":   # mlx-knife 2.0.8's status for it
                result.data["download_status"] = "access_denied"
            _say_still_cached(name, result)
    return result


def _say_still_cached(name: str, result: Output) -> None:
    """A pull that failed (an unreachable Hub, say) of a model that is cached: the cached copy is untouched and
    usable, and a script must be able to tell (mlx-knife answers `already_exists` without asking the Hub). The
    document says so (`data.cached`, `data.hash`, `error.cached`, `error.hint`); the failure stays a failure
    (issue 8: an unchecked model is never "up to date")."""
    found = jobs.cached_copy(name)
    if found is None:
        return
    repo, sha = found
    hint = (f"{repo} is cached (revision {sha[:12]}) and unchanged; only the check for a newer revision failed. "
            "To use the cached copy without asking the Hub, set HF_HUB_OFFLINE=1.")
    result.data.update(cached=True, hash=sha)
    result.error.details.update(cached=True, hash=sha, hint=hint)
    say(hint)


PULL_STATUS = {"succeeded": "success", "failed": "failed", "cancelled": "cancelled"}


def _pull_data(job: dict, expanded: str | None) -> dict:
    """The pull job as mlx-knife's API reads it: `model`, `download_status` (success | already_exists | failed |
    cancelled, or queued | running while the job has not ended), `message`, `expanded_name`."""
    result = job.get("result") or {}
    status = PULL_STATUS.get(job["state"], job["state"])
    if status == "success" and result.get("up_to_date"):
        status = "already_exists"
    message = {"success": f"Successfully downloaded model {job['target']}",
               "already_exists": f"Model {job['target']} already exists in cache"}.get(status) or job.get("message") \
        or f"pull of {job['target']} is {job['state']} (job {job['id']})"
    return {**_public(job), "model": job["target"], "download_status": status, "message": message,
            "expanded_name": expanded}


def _rate(value):
    if value is None:
        return None
    try:
        return parse_rate(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@click.command("rm")
@click.argument("name")
@click.option("--force", "-f", is_flag=True, help="Remove a fuzzy (non-exact) match.")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted, or why rm would refuse; touch nothing.")
@wait_option
@json_command
def rm_command(name, force, dry_run, wait):
    """Remove a cached model (or one revision of it: NAME@HASH, NAME@BRANCH)."""
    try:
        target = jobs.resolve_removal(name)
    except AmbiguousMatch as error:   # mlx-knife's API puts the matches in data, so a script can pick one
        return Output(data={"model": None, "action": "ambiguous", "requires_confirmation": False,
                            "matches": error.details.get("matches", [])}, error=error)
    except WorkspacePath as error:   # mlx-knife 2.0.8 puts the folder it resolved (absolute) in data.model
        return Output(data={"model": error.details.get("path"), "action": "unknown", "requires_confirmation": False,
                            "matches": []}, error=error)
    if target.alias is not None:   # rm of an alias (/api/copy) forgets the alias only, at once, no job
        return _rm_alias(target, dry_run=dry_run)
    model = f"{target.repo_id}@{target.revision}" if target.revision else target.repo_id
    if dry_run:
        return _rm_plan(target, model, confirm=target.fuzzy and not force)
    if target.fuzzy and not force:
        message = (f"{name!r} is not an exact name; it matches {model}. Nothing was removed: "
                   f"run `mlxk rm {model}` or add --force to remove it.")
        return Output(data={"model": model, "action": "requires_confirmation", "message": message,
                            "requires_confirmation": True, "matches": []}, text=message)
    if target.fuzzy:
        say(f"{name!r} matches {target.repo_id}.")
    job = jobs.remove(target).job
    error = jobs.outcome_error(job)
    if error is None:
        say(_summary(job))
    action = "deleted" if job["state"] == "succeeded" else "failed"
    message = f"Successfully deleted {model}" if action == "deleted" else (job.get("message") or f"rm of {model} failed")
    return Output(data={**_public(job), "model": model, "action": action, "message": message,
                        "requires_confirmation": False},
                  text=job["id"], error=error)


def _rm_alias(target, *, dry_run: bool) -> Output:
    """`rm ALIAS`: the alias goes, its model stays (Ollama's rm of a copy). `model` is the alias, `repo_id` the
    model it named; action alias_removed (would_remove_alias with --dry-run, which touches nothing)."""
    if dry_run:
        message = jobs.alias_removal_message(target, dry_run=True)
        data = {"model": target.alias, "alias": target.alias, "repo_id": target.repo_id,
                "action": "would_remove_alias", "message": message, "dry_run": True, "revisions": [],
                "whole_repo": False, "bytes_freed": 0, "paths": []}
        return Output(data=data, text=message)
    removed = jobs.remove_alias(target)
    return Output(data={"model": target.alias, **removed, "requires_confirmation": False}, text=removed["message"])


def _rm_plan(target, model: str, *, confirm: bool) -> Output:
    """`rm --dry-run`: exactly what rm would do now: remove these paths, refuse (a job holds the model), or ask for
    --force (a fuzzy name). Paths are relative to the HF cache: mlx-knife's API shows no absolute paths."""
    plan = jobs.plan_removal(target)
    refusal = jobs.removal_refusal(target)
    cache_dir = settings().hf_hub_cache
    action = "would_refuse" if refusal else "requires_confirmation" if confirm else "would_delete"
    message = {"would_refuse": refusal.message if refusal else "",
               "requires_confirmation": f"Would ask for --force: the name is not exact; it matches {model}.",
               "would_delete": f"Would remove {model}, freeing {human_size(plan.bytes_freed)}."}[action]
    data = {"model": model, "action": action, "message": message, "dry_run": True, "repo_id": plan.repo_id,
            "revisions": plan.revisions, "whole_repo": plan.whole_repo, "bytes_freed": plan.bytes_freed,
            "paths": [_cache_relative(p, cache_dir) for p in plan.paths]}
    lines = [message] + ([f"  {p}" for p in plan.paths] if action != "would_refuse" else [])
    return Output(data=data, text="\n".join(lines))


_cache_relative = cache.cache_relative


def _public(job: dict) -> dict:
    """A job as pull/rm print it: without its settings (the cache path; mlx-knife's API shows no paths)."""
    return {key: value for key, value in job.items() if key != "settings"}


@click.command("clone")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@wait_option
@json_command
def clone_command(name, directory, wait):
    """Copy a cached model into an editable workspace DIRECTORY (pulls it first if needed)."""
    return _queued(jobs.enqueue_clone(name, directory), wait)


@click.command("push")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--public", is_flag=True, help="Create the repo public.")
@click.option("--dry-run", is_flag=True, help="Show what would be uploaded (waits for the plan); change nothing.")
@click.option("--check-only", is_flag=True, help="Only check the workspace (offline, no job).")
@click.option("--force", is_flag=True, help="Upload even what --check-only rejects.")
@click.option("--message", "-m", help="Commit message.")
@wait_option
@json_command
def push_command(directory, repo, private, public, dry_run, check_only, force, message, wait):
    """Upload a workspace DIRECTORY to the Hub as REPO (a background job)."""
    if private and public:
        raise click.UsageError("--private and --public contradict each other; give one.")
    if check_only:
        return _check_only(directory)
    outcome = _queued(jobs.enqueue_push(directory, repo, private=private, public=public, dry_run=dry_run,
                                        force=force, message=message), wait or dry_run)
    if dry_run and outcome.error is None and isinstance(outcome.data, dict):
        outcome.text = _plan_text(outcome.data)
    return outcome


def _plan_text(job: dict) -> str:
    """A dry run's plan: each file and what the push would do with it."""
    result = job.get("result") or {}
    plan = result.get("plan") or []
    rows = [["would upload" if step["action"] == "upload" else "unchanged", step["path"], human_size(step["size"])]
            for step in plan]
    return table(rows, ["ACTION", "PATH", "SIZE"], right={2}) if rows else "Nothing to push."


def _check_only(directory: Path) -> Output:
    """Offline integrity check of a workspace; every finding blocks a push."""
    findings = jobs.check_workspace(directory)
    if not findings:
        return Output(data={"workspace": str(directory), "findings": [], "ok": True},
                      text=f"{directory} is ready to push.")
    error = WorkspaceInvalid(f"{directory} is not ready to push: {_finding_text(findings[0])}", findings=findings)
    text = "\n".join([f"{directory}: {len(findings)} problem(s)", *(f"  {_finding_text(f)}" for f in findings)])
    return Output(data={"workspace": str(directory), "findings": findings, "ok": False}, text=text, error=error)


def _finding_text(finding) -> str:
    if isinstance(finding, dict):
        rule, text = finding.get("rule"), finding.get("message") or str(finding)
        return f"{text} ({rule})" if rule else text
    return str(finding)


# ---------------------------------------------------------------- jobs

def _jobs_table(rows: list[dict]) -> str:
    if not rows:
        return "No jobs."
    body = [[j["id"], j["kind"], j["target"], j["state"], progress_cell(j), relative_time(j["created_at"])]
            for j in rows]
    return table(body, ["ID", "KIND", "TARGET", "STATE", "PROGRESS", "AGE"])


@click.command("list")
@click.option("--all", "all_jobs", is_flag=True, help="The full history, not only active and recent jobs.")
@json_command
def jobs_list_command(all_jobs):
    """List active and recent jobs."""
    rows = jobs.list_jobs(all_jobs=all_jobs)
    return Output(data=rows, text=lambda: _jobs_table(rows))


@click.group("jobs", cls=SuggestingGroup, invoke_without_command=True)
@click.option("--all", "all_jobs", is_flag=True, help="The full history, not only active and recent jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.pass_context
def jobs_group(ctx, all_jobs, as_json):
    """List, follow, cancel and retry background jobs."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(jobs_list_command, all_jobs=all_jobs, as_json=as_json)


jobs_group.add_command(jobs_list_command)


@jobs_group.command("show")
@click.argument("job_id")
@json_command
def jobs_show_command(job_id):
    """Show every field of a job."""
    job = jobs.get(job_id)
    return Output(data=job, text=lambda: _show_text(job))


def _show_text(job: dict) -> str:
    lines = []
    for key, value in job.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False, default=str)
        lines.append(f"{key + ':':<18}{'-' if value is None else value}")
    return "\n".join(lines)


@jobs_group.command("watch")
@click.argument("job_id", required=False)
@click.option("--interval", type=float, default=0.5, show_default=True, help="Seconds between refreshes.")
@json_command
def jobs_watch_command(job_id, interval):
    """Follow one job (or every active job) live."""
    if job_id:
        return follow_job(jobs.get(job_id)["id"])
    return _watch_all(interval)


def _watch_all(interval: float) -> Output:
    seen: dict[str, dict] = {}
    tty = is_tty(sys.stderr)
    last = None
    try:
        while True:
            active = jobs.list_jobs(states=("queued", "running"))
            for job in active:
                seen[job["id"]] = job
            for job_id in [i for i in seen if i not in {j["id"] for j in active}]:
                seen[job_id] = jobs.get(job_id)
            text = _jobs_table(active) if active else "No active jobs."
            if text != last:
                if tty:
                    sys.stderr.write("\x1b[2J\x1b[H")
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
                last = text
            if not active:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        say("Stopped watching; the jobs keep running.")
    rows = list(seen.values())
    return Output(data=rows, text=None)


@jobs_group.command("cancel")
@click.argument("job_id")
@click.option("--purge", is_flag=True, help="Also delete the partial download (otherwise kept for a resume).")
@json_command
def jobs_cancel_command(job_id, purge):
    """Cancel a queued or running job (a running one stops within ~2 s)."""
    job = jobs.cancel(job_id, purge=purge)
    if job["state"] == "cancelled":
        # The job's own message (what `jobs show`, `jobs` and the web page show): one account of the partial data.
        say(f"Cancelled job {job['id']} ({job['kind']} {job['target']}): {job.get('message') or 'cancelled'}.")
    else:
        say(f"Cancel requested; job {job['id']} is {job['state']} and stopping.")
    return Output(data=job, text=job["id"])


@jobs_group.command("retry")
@click.argument("job_id")
@wait_option
@json_command
def jobs_retry_command(job_id, wait):
    """Run a failed or cancelled job again, as a new job with the same arguments."""
    return _queued(jobs.retry(job_id), wait)


# ---------------------------------------------------------------- worker

@click.command("worker")
@click.option("--threads", type=click.IntRange(min=1), default=3, show_default=True, help="Tasks run at once.")
@click.option("--background", is_flag=True, help="Exit after MLXK_WORKER_IDLE seconds with nothing to do.")
@click.option("--no-scan", is_flag=True, help="Skip the health scan at start.")
@log_options
@json_command
def worker_command(threads, background, no_scan, log_level, log_json):
    """Run the job worker (a Huey consumer) in the foreground."""
    from mlxk.workers import consumer  # lazy: keeps `mlxk --help` light

    code = consumer.main([f"--threads={threads}", *(["--background"] if background else []),
                          *(["--no-scan"] if no_scan else []), *([f"--log-level={log_level}"] if log_level else []),
                          *(["--log-json"] if log_json else [])])
    # consumer.main has printed its own one-line error; --json also carries one in the envelope.
    error = MlxkError(f"the job worker stopped with exit code {code}; see the messages above.") \
        if code and json_mode() else None
    return Output(data={"stopped": True, "exit_code": code}, exit_code=code, error=error)
