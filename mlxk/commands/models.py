"""`mlxk list`, `show` and `health`: parse → call mlxk.index → render.

This module sits on the `mlxk list` path, so it imports only click, the standard library and mlxk's light modules;
mlx, mlx-lm, huggingface_hub and sqlite-utils stay out (see bench/list).
"""
from __future__ import annotations

import json
import os
from contextlib import closing

import click

from mlxk import index
from mlxk.config import settings
from mlxk.errors import MlxkError, ModelNotFound
from mlxk.output import (Output, RawJSON, human_size, json_command, json_mode, relative_time, say, system_object,
                         table)



def _request_scan(repo_ids) -> None:
    """Hand repos whose runtime verdict is pending to the job worker instead of waiting for mlx-lm here.

    Imported on demand: only a `list` that found pending repos pays for the job queue's imports.
    """
    from mlxk.jobs import request_scan  # lazy: keeps `mlxk list` light

    try:
        request_scan(repo_ids)
    except MlxkError as error:  # the listing is still right; only the background check could not be queued
        say(f"Warning: could not queue a runtime check ({error.message}); `mlxk health` checks now.")

SORTS = {
    "name": (lambda row: row["repo_id"].lower(), False),
    "size": (lambda row: row["size_bytes"] or 0, True),            # biggest first
    "modified": (lambda row: row["last_modified"] or "", True),    # newest first
}
# what the `list` table reads of each row
LIST_COLUMNS = ("repo_id", "revision", "size_bytes", "disk_bytes", "last_modified", "framework", "model_type",
                "health", "runtime_compatible", "reason")
REASON_WIDTH = 60
DEFAULT_MODEL_HINT = "mlx-community/Qwen3-4B-4bit"


# ---------------------------------------------------------------------------------------------------------------
# list


@click.command("list")
@click.argument("pattern", required=False)
@click.option("--all", "show_all", is_flag=True, help="Every cached repo: GGUF, PyTorch, base, broken.")
@click.option("--health", "show_health", is_flag=True, help="Add integrity, runtime and reason columns.")
@click.option("--sort", "sort", type=click.Choice(list(SORTS)), default="name", show_default=True,
              help="name (A-Z), size (biggest first) or modified (newest first).")
@click.option("--reverse", is_flag=True, help="Reverse the sort order.")
@click.option("--no-scan", is_flag=True, hidden=True,
              help="Do not queue runtime checks (nor start a job worker): `make run` indexes before its own worker.")
@json_command
def list_command(pattern, show_all, show_health, sort, reverse, no_scan):
    """List cached models (runnable MLX chat models unless --all); PATTERN may be a workspace path (`./dir`)."""
    if pattern is not None:
        index.check_pattern(pattern)
        from mlxk import names  # lazy: keeps `mlxk list` light

        # mlx-knife lists a model folder itself (`cached: false`); any other pattern, `../x` included, only filters
        if names.is_workspace_path(pattern) and os.path.isfile(os.path.join(os.path.expanduser(pattern),
                                                                          "config.json")):
            return _list_workspace(pattern, show_all, show_health)
    config = settings()
    with closing(index.load(config.state_db, config.hf_hub_cache)) as loaded:
        if loaded.warning:
            say(f"Warning: {loaded.warning}")
        if loaded.refresh.pending and not loaded.warning and not no_scan:  # a locked state.db: list only
            _request_scan(loaded.refresh.pending)
        # --json embeds model objects SQLite rendered; the table reads only the columns it shows
        as_json = json_mode()
        found = index.listing(loaded.conn) if as_json else index.rows(loaded.conn, columns=LIST_COLUMNS)
    found = [row for row in found if index.matches(row, pattern)]
    key, descending = SORTS[sort]
    found.sort(key=key, reverse=descending != reverse)
    if as_json:
        return Output({"models": RawJSON("[", ",".join([row["object"] for row in found]), "]"),
                       "count": len(found), "system": system_object(),
                       "pending": sum(row["pending"] for row in found)})
    shown = found if show_all else [row for row in found if index.is_runnable_chat(row)]
    return Output(None, lambda: _render_list(shown, len(found), show_health, config.hf_hub_cache, pattern))


def _list_workspace(path: str, show_all: bool, show_health: bool) -> Output:
    """`list ./dir`: the one workspace, read now (as `show`/`health` read it; never indexed)."""
    row = index.workspace(path)
    if json_mode():
        return Output({"models": [index.workspace_object(row)], "count": 1, "system": system_object(), "pending": 0})
    shown = [row] if show_all or index.is_runnable_chat(row) else []
    return Output(None, lambda: _render_list(shown, 1, show_health, None, path))


def _render_list(shown: list[dict], total: int, show_health: bool, cache_dir, pattern) -> str:
    if not total:
        where = f"matching {pattern!r} " if pattern else ""
        return (f"No models {where}in {cache_dir}.\n"
                f"Download one with: mlxk pull {DEFAULT_MODEL_HINT}")
    headers = ["NAME", "ID", "SIZE", "MODIFIED", "TYPE"] + (["HEALTH", "RUNTIME", "REASON"] if show_health else [])
    body = [_list_row(row, show_health) for row in shown]
    lines = [table(body, headers, right={2})] if shown else []
    lines.append(_footer(shown, total))
    return "\n".join(lines)


def _list_row(row: dict, show_health: bool) -> list:
    kind = row["model_type"] or "-"
    if row["framework"] != "mlx":
        kind = f"{kind}, {index.FRAMEWORK_LABELS.get(row['framework'], row['framework'])}"
    if index.is_pending(row) and not show_health:
        kind += " (pending)"
    name = row["repo_id"] + (f" (alias: {', '.join(row['aliases'])})" if row.get("aliases") else "")
    cells = [name, (row["revision"] or "-")[: index.HASH_DISPLAY], human_size(row["size_bytes"]),
             relative_time(row["last_modified"]), kind]
    if show_health:
        cells += [row["health"], _runtime_word(row), _short(row["reason"])]
    return cells


def _runtime_word(row: dict) -> str:
    if row["health"] != "healthy":
        return "-"
    return {None: "pending", True: "yes", False: "no"}[row["runtime_compatible"]]


def _short(text: str | None) -> str:
    if not text:
        return "-"
    return text if len(text) <= REASON_WIDTH else text[: REASON_WIDTH - 1] + "…"


def _footer(shown: list[dict], total: int) -> str:
    size = index.disk_total(shown)
    parts = [f"{len(shown)} model{'s' if len(shown) != 1 else ''}, {human_size(size)} on disk."]
    if total > len(shown):
        parts.append(f"{total - len(shown)} more not shown (--all lists every repo).")
    pending = sum(index.is_pending(row) for row in shown)
    if pending:
        parts.append(f"{pending} pending a runtime check (mlxk health checks now).")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# show


@click.command("show")
@click.argument("name")
@click.option("--files", "show_files", is_flag=True, help="List the snapshot's files.")
@click.option("--config", "show_config", is_flag=True, help="Print config.json.")
@json_command
def show_command(name, show_files, show_config):
    """Show one cached model: what it is, its health, its files or config."""
    from mlxk import names  # not at the top: `list` does not need it

    if names.is_workspace_path(name):   # mlx-knife's workspace paths: a model folder outside the cache
        detail = index.describe_workspace(index.workspace(name), files=show_files, config=show_config)
        return Output(detail, lambda: _render_show(detail, False))
    ref = names.parse(name)
    config = settings()
    with closing(index.load(config.state_db, config.hf_hub_cache)) as loaded:
        if loaded.warning:
            say(f"Warning: {loaded.warning}")
        resolved = index.resolve(loaded.conn, ref)
        if index.changed_in_place(resolved.row):   # an in-place edit no fingerprint sees: inspect this repo again
            index.refresh(loaded.conn, config.hf_hub_cache, repos={resolved.row["repo_id"]}, force=True)
            resolved = index.resolve(loaded.conn, ref)
        detail = index.describe(resolved, files=show_files, config=show_config)
        pending = detail["model"]["runtime_pending"]
        index.with_provisional_verdict(loaded.conn, detail["model"])
    return Output(detail, lambda: _render_show(detail, pending))


def _render_show(detail: dict, pending: bool) -> str:
    model = detail["model"]
    runtime = {None: "pending (mlxk health checks now)", True: "compatible", False: "not compatible"}
    facts = [
        ("Name", model["name"]),
        ("Revision", detail["revision"] + ("" if detail["revision"] == model["hash"] else " (not the current one)")
         if detail["revision"] else "-"),
        ("Revisions", f"{len(model['revisions'])} cached" if model["cached"] else "a workspace, not in the cache"),
        ("Size", human_size(model["size_bytes"])),
        ("Modified", f"{relative_time(model['last_modified'])} ({model['last_modified']})"),
        ("Framework", model["framework"]),
        ("Type", model["model_type"]),
        ("Capabilities", ", ".join(model["capabilities"]) or "-"),
        ("Architecture", model["architecture"] or "-"),
        ("Context", model["context_length"] or "-"),
        ("Quantization", model["quantization_label"] or "-"),
        ("Health", model["health"]),
        ("Runtime", "-" if model["health"] != "healthy" else runtime[None if pending else model["runtime_compatible"]]),
        ("Reason", model["reason"] or "-"),
    ]
    if model["reclaimable_bytes"]:
        facts.append(("Reclaimable", f"{human_size(model['reclaimable_bytes'])} of unfinished downloads"))
    lines = [f"{label + ':':<14}{value}" for label, value in facts]
    if "files" in detail:
        rows = [[f["name"], human_size(f["size_bytes"]), "LFS" if f["lfs"] else "regular",
                 "ok" if f["link_ok"] else "BROKEN"] for f in detail["files"]]
        lines += ["", table(rows, ["FILE", "SIZE", "STORAGE", "LINK"], right={1})]
    if "config" in detail:
        lines += ["", json.dumps(detail["config"], indent=2, ensure_ascii=False)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# health


@click.command("health")
@click.argument("name", required=False)
@click.option("--scan", is_flag=True, help="Queue a full health scan as a job instead of checking here.")
@click.option("--wait", is_flag=True, help="With --scan: follow the job and exit with its outcome.")
@json_command
def health_command(name, scan, wait):
    """Check models now (files, then mlx-lm runtime) and record the verdicts."""
    from mlxk import names  # lazy: keeps `mlxk list` light

    if scan:
        from mlxk import jobs
        from mlxk.commands.jobs import _queued

        repos = None
        if name is not None:
            config = settings()
            with closing(index.load(config.state_db, config.hf_hub_cache)) as loaded:
                repos = [index.resolve(loaded.conn, names.parse(name)).row["repo_id"]]
        return _queued(jobs.enqueue_scan(repos, force=True), wait)
    if wait:
        raise click.UsageError("--wait goes with --scan.")
    if name is not None and names.is_workspace_path(name):   # a workspace folder: checked now, not indexed
        checked = [index.workspace(name)]
        summary = index.summarize(checked)
        return Output(index.health_report(checked, summary), lambda: _render_health(checked, summary))

    ref = names.parse(name) if name is not None else None
    config = settings()
    try:
        loaded, checked = index.check_health(config.state_db, config.hf_hub_cache, ref)
    except ModelNotFound as error:
        if "suggestions" not in error.details:   # not names.not_found (a revision that is not cached)
            raise
        # mlx-knife 2.0.8: a pattern that matches no cached model is an empty report, success and exit 0 (a
        # pattern, as for `list`); mlxk adds what was not found and the close names, so a typo still reads as one
        summary = index.summarize([])
        data = {**index.health_report([], summary), "message": error.message,
                "suggestions": error.details["suggestions"]}
        return Output(data, error.message[:1].upper() + error.message[1:])
    loaded.close()
    if loaded.warning:
        say(f"Warning: {loaded.warning}")
    summary = index.summarize(checked)
    data = index.health_report(checked, summary)
    return Output(data, lambda: _render_health(checked, summary))


def _render_health(checked: list[dict], summary: dict) -> str:
    if not checked:
        return "No models in the cache."
    rows = [[row["repo_id"], row["health"], _runtime_word(row), row["reason"] or "-"] for row in checked]
    counts = f"{summary['healthy']} healthy, {summary['unhealthy']} unhealthy, {summary['not_runnable']} not runnable"
    if summary["pending"]:
        counts += f", {summary['pending']} pending"
    return table(rows, ["NAME", "HEALTH", "RUNTIME", "REASON"]) + f"\n{counts}."
