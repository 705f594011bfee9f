"""mlxk's own background processes: how they start (isolated from the user's directory), and how they are found,
shown and stopped (`mlxk processes`).

Why isolated: `python -c`/`-m` put the working directory first on sys.path, so a folder named `mlxk` (or any module
name we import) where the user happened to type `mlxk run` would be imported instead of ours, in a server that then
lives for 15 minutes. Every process mlxk starts therefore runs as `python -P` (3.11+; `-I` before: no user site,
no PYTHON* variables) in `/`, with the parent's path variables made absolute (config.child_env).

Why this module finds processes by looking at them: mlxk's processes are started by several parties (`mlxk run`, a
job command, the api for its inference worker, honcho under `make run`, a user in a terminal), and only some write
pid files. So the truth is the process table: a process is ours when its command line is one of mlxk's entry points
and its MLXK_HOME is this one; pid files (MLXK_HOME/run) and the `workers` table add the address and idle limits.
Nothing is signalled before psutil confirms both, and the create time a pid file recorded, so a reused pid is never
hit.
"""
from __future__ import annotations

import atexit
import os
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlxk.clock import parse_iso
from mlxk.config import default_home, settings
from mlxk.errors import MlxkError

SAFE_CWD = "/"   # always there, and holds no module a child could import by accident


def python_argv(*args: str) -> list[str]:
    """This interpreter with the flag that keeps the working directory off sys.path, then `args`."""
    return [sys.executable, "-P" if sys.version_info >= (3, 11) else "-I", *args]


def started_by_cli() -> str:
    """How a process started for a CLI command names its starter: `mlxk pull`, `mlxk list`..."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    return f"mlxk {command}" if command else "mlxk"


# ---------------------------------------------------------------------------------------------------------------
# Finding them

ROLES = ("api", "worker", "inference")   # the order they are listed and stopped in (the api stops its own child)
STOP_TIMEOUT_S = 15.0                    # SIGTERM, then this long before SIGKILL (a job worker re-queues its jobs)


@dataclass
class Process:
    pid: int
    role: str                    # api | worker | inference
    address: str | None          # api: its URL; inference: its socket; worker: its queue
    started_by: str              # MLXK_STARTED_BY of that process ("mlxk run", "make run", "mlxk pull"...), else "user"
    started_at: float            # unix seconds (psutil create_time: with the pid, what identifies the process)
    idle_exit_s: float | None    # exits by itself after this long idle; None: runs until stopped
    idle_left_s: float | None    # about how long until then; None when not known or not applicable
    background: bool             # started by mlxk itself (a job command, `mlxk run`, the api): `stop` needs no --all
    command: str
    host: str | None = None      # None: this machine; else a job worker elsewhere sharing the queue (listed, not stopped)

    def to_dict(self) -> dict:
        return asdict(self)


def command_args(cmdline: list[str]) -> list[str]:
    """A process's arguments as launched. A title rewritten by setproctitle (`mlxk serve --api-key KEY` masks its
    key that way) reads back as one space-joined string padded with empty ones: split it again."""
    args = [arg for arg in cmdline if arg]
    return args[0].split() if len(args) == 1 and " " in args[0] else args


def role_of(cmdline: list[str]) -> str | None:
    """Which of mlxk's processes a command line runs: `python [-flags] -m mlxk.workers[.inference]`, or the
    `mlxk` CLI (`mlxk` script, `python -c "from mlxk.cli import main; main()"`) running `serve` or `worker`."""
    args = command_args(cmdline)
    if "-m" in args[:-1]:
        module = args[args.index("-m") + 1]
        return {"mlxk.workers": "worker", "mlxk.workers.inference": "inference"}.get(module)
    if "-c" in args[:-1] and "mlxk.cli" in args[args.index("-c") + 1]:
        rest = args[args.index("-c") + 2:]
    elif any(Path(arg).name == "mlxk" for arg in args[:2]):
        rest = args[[Path(arg).name for arg in args[:2]].index("mlxk") + 1:]
    else:
        return None
    command = next((arg for arg in rest if not arg.startswith("-")), None)
    return {"serve": "api", "worker": "worker"}.get(command)


def _home_of(proc, default_home: str) -> str | None:
    """The MLXK_HOME a process runs with (absolute), or None when we may not look."""
    import psutil  # lazy: keeps `mlxk list` light

    try:
        value = proc.environ().get("MLXK_HOME")
        return os.path.abspath(os.path.join(proc.cwd(), os.path.expanduser(value))) if value else default_home
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _candidates(home: str, default_home: str):
    """(psutil.Process, role) for every live process of this user that runs mlxk with this MLXK_HOME."""
    import psutil  # lazy: keeps `mlxk list` light

    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline", "uids", "status"]):
        info = proc.info
        if info["pid"] == me or info["status"] == psutil.STATUS_ZOMBIE or not info["cmdline"]:
            continue
        if info["uids"] is None or info["uids"].real != os.getuid():
            continue
        role = role_of(info["cmdline"])
        if role and _home_of(proc, default_home) == home:
            yield proc, role


def find(config=None) -> list[Process]:
    """mlxk's processes for this MLXK_HOME, api first, then job workers, then inference workers (oldest first)."""
    config = config or settings()
    home = os.path.abspath(config.home)
    found = []
    server = _server_record(config)
    for proc, role in _candidates(home, os.path.abspath(default_home())):
        try:
            found.append(_describe(proc, role, config, server))
        except Exception as error:  # noqa: BLE001 — a process that vanished mid-look is simply not listed
            import psutil

            if not isinstance(error, psutil.Error):
                raise
    _inherit_background(found)
    found += _remote_workers()
    found.sort(key=lambda p: (ROLES.index(p.role), p.host or "", p.started_at))
    return found


def _remote_workers() -> list[Process]:
    """Job workers on other hosts sharing this queue (MLXK_QUEUE_URL=redis://...), from their heartbeats in the
    `workers` table: listed so the view is whole, never signalled (their pids are another machine's)."""
    from mlxk.db import jobs as jobs_db  # lazy: keeps `mlxk list` light
    from mlxk.jobs import STALE_S, connect, hostname  # lazy: keeps `mlxk list` light

    try:
        conn = connect()
    except MlxkError:
        return []
    with closing(conn):
        rows = jobs_db.workers(conn, kind="queue", fresh_after=time.time() - STALE_S)
    here = hostname()
    return [Process(pid=row["pid"], role="worker", address=f"{row['host']}:{row['pid']}", started_by="another host",
                    started_at=parse_iso(row["started_at"]) or 0.0, idle_exit_s=None, idle_left_s=None,
                    background=False, command="", host=row["host"])
            for row in rows if row["host"] != here]


def _inherit_background(found: list[Process]) -> None:
    """An api's own inference worker goes with its api: a person's foreground `mlxk serve` keeps its worker on a
    plain `stop` (which would only make the api start another on the next request)."""
    apis = {p.pid: p for p in found if p.role == "api"}
    for process in found:
        parent = _parent_api_pid(process.started_by)
        if process.role == "inference" and parent in apis:
            process.background = apis[parent].background


def _parent_api_pid(started_by: str) -> int | None:
    prefix, _, rest = started_by.partition("(pid ")
    return int(rest.rstrip(")")) if prefix == "api " and rest.rstrip(")").isdigit() else None


def _server_record(config) -> dict | None:
    return read_server_pid_file(config)


# ---------------------------------------------------------------------------------------------------------------
# The api server's pid file: the server writes it (mlxk/server/app.py), `mlxk run` and `processes` read it, so it
# lives here, off the api package and free of FastAPI.


def server_pid_file(settings) -> Path:
    return settings.run_dir / "server.pid"


def write_server_pid_file(settings, *, host: str, port: int, api_key: bool) -> None:
    import json
    import time

    path = server_pid_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    url = settings._replace(host=host, port=port).server_url  # where a client connects to this bind address
    record = {"pid": os.getpid(), "host": host, "port": port, "url": url,
              "api_key": api_key, "started_at": time.time()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def remove_server_pid_file(settings) -> None:
    """Remove the pid file if it is ours (a second server may have replaced it)."""
    record = read_server_pid_file(settings)
    if record and record.get("pid") == os.getpid():
        server_pid_file(settings).unlink(missing_ok=True)


def read_server_pid_file(settings) -> dict | None:
    """The running server's record, or None (no file, unreadable, or its process is gone)."""
    import json

    from mlxk.jobs import pid_alive

    try:
        record = json.loads(server_pid_file(settings).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int) or not pid_alive(record["pid"]):
        return None
    return record


def _describe(proc, role: str, config, server: dict | None) -> Process:
    env = proc.environ()
    cmdline = command_args(proc.cmdline())
    started_by = env.get("MLXK_STARTED_BY") or "user"
    process = Process(pid=proc.pid, role=role, address=None, started_by=started_by, started_at=proc.create_time(),
                      idle_exit_s=None, idle_left_s=None, background=started_by.startswith(("mlxk", "api")),
                      command=" ".join(_redacted(cmdline)))
    if role == "api":
        process.address = server["url"] if server and server.get("pid") == proc.pid else None
        process.idle_exit_s = _option(cmdline, "--idle-exit")
        if process.address and process.idle_exit_s:
            idle = _server_idle_s(process.address)
            process.idle_left_s = None if idle is None else max(0.0, process.idle_exit_s - idle)
    elif role == "inference":
        socket = _option(cmdline, "--socket", str)
        process.address = socket
    else:
        process.address = _redacted_queue(env.get("MLXK_QUEUE_URL") or str(config.queue_db))
        if "--background" in cmdline:
            process.idle_exit_s = _number(env.get("MLXK_WORKER_IDLE"), 300.0)
            process.idle_left_s = _worker_idle_left(proc, process.idle_exit_s, time.time())
    return process


def _redacted(cmdline: list[str]) -> list[str]:
    """The command line with an --api-key value hidden: secrets never reach a process view."""
    shown = []
    for i, arg in enumerate(cmdline):
        if i and cmdline[i - 1] == "--api-key":
            arg = "***"
        elif arg.startswith("--api-key="):
            arg = "--api-key=***"
        shown.append(arg)
    return shown


def _option(cmdline: list[str], name: str, kind=float):
    for i, arg in enumerate(cmdline[:-1]):
        if arg == name:
            try:
                return kind(cmdline[i + 1])
            except ValueError:
                return None
    return None


def _number(text: str | None, default: float) -> float:
    try:
        return float(text) if text else default
    except ValueError:
        return default


def _redacted_queue(url: str) -> str:
    from mlxk.workers.queue import redacted_url  # lazy: keeps `mlxk list` light

    return redacted_url(url)


def _server_idle_s(url: str) -> float | None:
    """Seconds since the server's last request (its /health says), or None when it does not answer."""
    import httpx  # lazy: keeps `mlxk list` light

    try:
        return float(httpx.get(f"{url}/health", timeout=1.0).json()["idle_s"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def _worker_idle_left(proc, idle_exit_s: float, now: float) -> float | None:
    """About how long a background job worker has left: its idle limit minus the time since its last job ended
    (or since it started), None while it runs a job."""
    from mlxk.jobs import connect, hostname  # lazy: keeps `mlxk list` light

    worker_id = f"{hostname()}:{proc.pid}:{int(proc.create_time())}"
    try:
        conn = connect()
    except MlxkError:   # state.db unusable (a read-only home): the process is still worth listing
        return None
    with closing(conn):
        if conn.execute("SELECT 1 FROM jobs WHERE worker = ? AND state = 'running' LIMIT 1", (worker_id,)).fetchone():
            return None
        last = conn.execute("SELECT max(finished_at) FROM jobs WHERE worker = ?", (worker_id,)).fetchone()[0]
    idle_since = max(proc.create_time(), parse_iso(last) or 0.0)
    return max(0.0, idle_exit_s - (now - idle_since))


# ---------------------------------------------------------------------------------------------------------------
# Stopping them


@dataclass
class Stopped:
    stopped: list[Process] = field(default_factory=list)   # gone after SIGTERM
    killed: list[Process] = field(default_factory=list)    # needed SIGKILL after STOP_TIMEOUT_S
    skipped: list[Process] = field(default_factory=list)   # not started by mlxk itself: needs --all (or its pid)


def stop(*, pids=(), everything: bool = False, timeout_s: float = STOP_TIMEOUT_S, config=None) -> Stopped:
    """SIGTERM mlxk's processes for this MLXK_HOME (those mlxk started itself; `everything`: all of them; `pids`:
    just those), wait for them, SIGKILL what is left after `timeout_s`.

    Each pid is checked again just before the signal: still one of ours (role and MLXK_HOME), same create time.
    Raises MlxkError for a pid in `pids` that is not one of mlxk's processes here.
    """
    import psutil  # lazy: keeps `mlxk list` light

    found = [p for p in find(config) if p.host is None]   # another machine's pids are not ours to signal
    by_pid = {p.pid: p for p in found}
    unknown = [pid for pid in pids if pid not in by_pid]
    if unknown:
        raise MlxkError(f"no mlxk process with pid {', '.join(map(str, unknown))} runs for this MLXK_HOME; "
                        "see `mlxk processes`.", pids=unknown)
    result = Stopped()
    targets = []
    for process in found:
        if pids and process.pid not in pids:
            continue
        if not (pids or everything or process.background):
            result.skipped.append(process)
            continue
        targets.append(process)
    handles = []
    for process in targets:   # api first: it stops its own inference worker
        handle = _verified(process)
        if handle is not None:
            try:
                handle.terminate()
                handles.append((process, handle))
            except psutil.NoSuchProcess:
                result.stopped.append(process)
    alive = _wait_gone([h for _, h in handles], timeout_s)
    for process, handle in handles:
        if handle in alive:
            try:
                handle.kill()
            except psutil.NoSuchProcess:
                pass
            result.killed.append(process)
        else:
            result.stopped.append(process)
    return result


def _wait_gone(handles: list, timeout_s: float) -> list:
    """The handles still running after `timeout_s`. Exited counts as gone even while the process is a zombie its
    parent has not reaped yet (psutil.wait_procs would wait for the reaping, which is not ours to do)."""
    import psutil  # lazy: keeps `mlxk list` light

    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for handle in handles:
            try:
                if handle.status() != psutil.STATUS_ZOMBIE:
                    alive.append(handle)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _verified(process: Process):
    """The psutil handle of `process` if it is still that process (same pid and create time, same role)."""
    import psutil  # lazy: keeps `mlxk list` light

    try:
        handle = psutil.Process(process.pid)
        if abs(handle.create_time() - process.started_at) > 0.01 or role_of(handle.cmdline()) != process.role:
            return None
        return handle
    except psutil.Error:
        return None


def exit_now(code) -> None:
    """Leave as Python's own exit would, minus the module teardown: flush stdio, run atexit handlers (temp dirs,
    logging), then os._exit (see mlxk.cli.EXIT_AFTER_CLEANUP for why). A stdout that cannot be flushed (a closed pipe) takes the normal way out instead."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        return
    atexit._run_exitfuncs()
    os._exit(code)
