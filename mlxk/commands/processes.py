"""`mlxk processes` and `mlxk processes stop`: mlxk's own background processes (api server, job workers,
inference workers) for this MLXK_HOME. `mlxk ps` stays what it is in ollama: the models loaded in the server."""
from __future__ import annotations

import time

import click

from mlxk import processes
from mlxk.commands import SuggestingGroup
from mlxk.output import Output, human_duration, json_command, relative_time, table


def _row(process) -> list:
    left = "-" if process.idle_exit_s is None else (
        "busy" if process.idle_left_s is None else human_duration(process.idle_left_s))
    started_by = process.started_by if process.host is None else f"{process.host} (not stopped from here)"
    return [process.pid, process.role, process.address or "-", started_by, relative_time(process.started_at), left]


def _render(found: list) -> str:
    if not found:
        return "No mlxk processes are running for this MLXK_HOME."
    headers = ["PID", "ROLE", "ADDRESS", "STARTED BY", "STARTED", "IDLE EXIT IN"]
    return table([_row(p) for p in found], headers, right={0})


@click.group("processes", cls=SuggestingGroup, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.pass_context
def processes_group(ctx, as_json):
    """List mlxk's own processes (api server, job workers, inference workers)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(processes_list_command, as_json=as_json)


@processes_group.command("list")
@json_command
def processes_list_command():
    """List mlxk's own processes: pid, address, who started them, idle time left."""
    found = processes.find()
    return Output({"processes": [p.to_dict() for p in found], "checked_at": time.time()}, lambda: _render(found))


@processes_group.command("stop")
@click.argument("pids", nargs=-1, type=int)
@click.option("--all", "everything", is_flag=True,
              help="Also those a person or `make run` started, not only those mlxk started in the background.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=15.0, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@json_command
def processes_stop_command(pids, everything, timeout_s):
    """Stop mlxk's background processes (PIDS: just those; --all: every mlxk process of this MLXK_HOME)."""
    done = processes.stop(pids=pids, everything=everything, timeout_s=timeout_s)
    data = {key: [p.to_dict() for p in getattr(done, key)] for key in ("stopped", "killed", "skipped")}
    return Output(data, lambda: _stop_text(done))


def _stop_text(done) -> str:
    lines = [f"stopped {p.role} (pid {p.pid}, started by {p.started_by})" for p in done.stopped]
    lines += [f"killed {p.role} (pid {p.pid}): it did not stop within the timeout" for p in done.killed]
    if done.skipped:
        lines.append(f"left {len(done.skipped)} started by a person or `make run` running "
                     f"(pids {', '.join(str(p.pid) for p in done.skipped)}); `--all` stops them too.")
    return "\n".join(lines) or "No mlxk background processes were running."
