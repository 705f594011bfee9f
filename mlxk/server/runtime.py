"""The server as a process: its idle exit. (Its pid file, which the CLI reads too, is in mlxk/processes.py.)"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

log = logging.getLogger("mlxk.server.runtime")

IDLE_CHECK_S = 1.0


async def exit_when_idle(state, idle_s: float) -> None:
    """SIGTERM ourselves (uvicorn's graceful shutdown) after idle_s with no request in flight."""
    while True:
        await asyncio.sleep(min(IDLE_CHECK_S, idle_s))
        if state.active_requests == 0 and time.monotonic() - state.last_activity >= idle_s:
            log.info("no request for %.0fs: exiting", idle_s)
            os.kill(os.getpid(), signal.SIGTERM)
            return
