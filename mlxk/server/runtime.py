"""The server as a process: its pid file (how `mlxk run` finds it) and its idle exit.

No FastAPI here, so the CLI can read the pid file without importing it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

from mlxk.config import Settings
from mlxk.jobs import pid_alive

log = logging.getLogger("mlxk.server.runtime")

IDLE_CHECK_S = 1.0


def pid_file(settings: Settings) -> Path:
    return settings.run_dir / "server.pid"


def write_pid_file(settings: Settings, *, host: str, port: int, api_key: bool) -> None:
    path = pid_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    url = settings._replace(host=host, port=port).server_url  # where a client connects to this bind address
    record = {"pid": os.getpid(), "host": host, "port": port, "url": url,
              "api_key": api_key, "started_at": time.time()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def remove_pid_file(settings: Settings) -> None:
    """Remove the pid file if it is ours (a second server may have replaced it)."""
    record = read_pid_file(settings)
    if record and record.get("pid") == os.getpid():
        pid_file(settings).unlink(missing_ok=True)


def read_pid_file(settings: Settings) -> dict | None:
    """The running server's record, or None (no file, unreadable, or its process is gone)."""
    try:
        record = json.loads(pid_file(settings).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int) or not pid_alive(record["pid"]):
        return None
    return record


async def exit_when_idle(state, idle_s: float) -> None:
    """SIGTERM ourselves (uvicorn's graceful shutdown) after idle_s with no request in flight."""
    while True:
        await asyncio.sleep(min(IDLE_CHECK_S, idle_s))
        if state.active_requests == 0 and time.monotonic() - state.last_activity >= idle_s:
            log.info("no request for %.0fs: exiting", idle_s)
            os.kill(os.getpid(), signal.SIGTERM)
            return
