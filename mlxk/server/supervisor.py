"""The api process's side of the inference worker: find it, start it, restart it, talk to it.

Why a supervisor: the worker owns all MLX memory and can die (out of memory, a crash in a kernel, a kill). The
api must then fail the requests that were in flight with a retryable 503 instead of hanging, and the next request
must find a working worker again. A worker already listening on the socket (the `inference` line of the
Procfile under honcho) is used as is; otherwise the api starts one as its child, on the first request that needs
it, and restarts it when it exits. The api never imports mlx: the worker is a separate `python -m
workers.inference` process and this module speaks only the JSON-lines protocol of workers/inference/protocol.py.

Two workers for one socket (honcho starts the api and the `inference` worker together, so the first request can
reach the api before that worker has created its socket) are settled by the worker's lock file, `<socket>.lock`,
which a worker holds from before it binds until it exits (workers/inference/server.py):
- before starting a child, the api looks for an external worker: one that answers a ping is used; a held lock
  with no answer yet is a worker still starting, and the api waits for it (up to START_TIMEOUT_S) instead of
  starting a rival; a socket file nobody answers on gets EXTERNAL_GRACE_S, then the api starts its own;
- if the api's child still loses the race (it exits at once: "already serving"), the api adopts the winner
  instead of failing the request, and stops managing a child, so nothing restarts the loser in a loop;
- when its child dies, the api first checks whether another worker took the socket over, and uses it if so.
An external worker is never stopped by the api; when it dies, the next request finds nothing, and the api starts
its own.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from mlxk import processes
from mlxk.config import child_env
from mlxk.workers.inference import protocol

from mlxk.server.errors import WorkerError, WorkerRestarting

log = logging.getLogger("mlxk.server.supervisor")

START_TIMEOUT_S = 120.0     # importing mlx on a cold, busy machine can take a while
EXTERNAL_GRACE_S = 3.0      # a socket file with no answer may be a worker still starting (honcho starts both)
EXTERNAL_WAIT_S = 30.0      # with MLXK_INFERENCE_EXTERNAL: how long a request waits for the worker to come up
PING_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 10.0
MONITOR_INTERVAL_S = 0.5
FAST_FAILURE_S = 10.0       # a worker that dies this soon after starting is restarted with a growing delay


@dataclass(frozen=True)
class WorkerOptions:
    socket: Path
    max_loaded: int
    keep_alive_s: float
    max_waiting: int
    max_prompt_tokens: int
    external: bool = False   # MLXK_INFERENCE_EXTERNAL: someone else (honcho's `inference` line) runs the worker

    def argv(self) -> list[str]:
        return processes.python_argv("-m", "mlxk.workers.inference", "--socket", str(self.socket),
                "--max-loaded", str(self.max_loaded), "--keep-alive", str(self.keep_alive_s),
                "--max-waiting", str(self.max_waiting), "--max-prompt-tokens", str(self.max_prompt_tokens))


def _lock_held(path: str) -> bool:
    """True while a live worker (starting or serving) holds the socket's lock file.

    Probing takes the lock for an instant; a worker starting in that instant retries (server.LOCK_RETRY_S).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the lock if we got it
    return False


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM if the api dies without cleaning up (SIGKILL), so no orphan keeps the socket."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Supervisor:
    def __init__(self, options: WorkerOptions):
        self.options = options
        self.socket = str(options.socket)
        self.lock_path = str(protocol.socket_lock_path(self.socket))
        self._proc: subprocess.Popen | None = None
        self._started_at = 0.0
        self._ready = False
        self._external = False
        self._stopping = False
        self._lock = asyncio.Lock()
        self._monitor: asyncio.Task | None = None
        self.restarts = 0
        self._fast_failures = 0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Begin watching; the worker itself starts on first use."""
        self._monitor = asyncio.create_task(self._watch(), name="mlxk-worker-monitor")

    async def stop(self) -> None:
        self._stopping = True
        if self._monitor:
            self._monitor.cancel()
        proc, self._proc = self._proc, None
        self._ready = False
        if proc is None or proc.poll() is not None:
            return
        log.info("stopping inference worker (pid %s)", proc.pid)
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("inference worker %s ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            await asyncio.to_thread(proc.wait)

    def state(self) -> dict:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            state = "ready" if self._ready else "starting"
            pid = proc.pid
        elif self._external and self._ready:
            state, pid = "ready", None
        else:
            state, pid = "stopped", None
        # in external mode (honcho) the worker is someone else's from the start, not only once we first reached it
        managed = not (self._external or self.options.external)
        return {"state": state, "pid": pid, "managed": managed, "restarts": self.restarts}

    @property
    def child_pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    async def ensure(self) -> None:
        """Make sure a worker answers on the socket, starting one if needed."""
        if self._ready and (self._external or self.child_pid):
            return
        async with self._lock:
            if self._ready and (self._external or self.child_pid):
                return
            if self._stopping:
                raise WorkerRestarting("the server is shutting down; retry against a running server")
            await self._connect_or_spawn()

    async def _connect_or_spawn(self) -> None:
        if self.options.external:
            if await self._find_external(EXTERNAL_WAIT_S):
                return
            raise WorkerRestarting(f"no inference worker answers on {self.socket} (MLXK_INFERENCE_EXTERNAL is set, so "
                                   "the api does not start one): start `python -m mlxk.workers.inference`")
        if self.child_pid is None:
            grace = EXTERNAL_GRACE_S if os.path.exists(self.socket) else 0.0
            if await self._find_external(grace):
                return
            self._spawn()
        await self._wait_ready()

    async def _find_external(self, grace: float) -> bool:
        """Use a worker someone else runs; wait for one that holds the lock but is still starting."""
        started = time.monotonic()
        while True:
            if await self._ping():
                self._adopt_external()
                return True
            waited = time.monotonic() - started
            if waited >= START_TIMEOUT_S or (waited >= grace and not _lock_held(self.lock_path)):
                return False
            await asyncio.sleep(0.05)

    def _adopt_external(self) -> None:
        if not (self._external and self._ready):
            log.info("using the inference worker already listening on %s", self.socket)
        self._proc = None  # a child of ours that gave way has exited: nothing to manage or restart
        self._external, self._ready = True, True

    def _spawn(self) -> None:
        self._external = False
        argv = self.options.argv()
        log.info("starting inference worker: %s", " ".join(argv))
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=preexec, cwd=processes.SAFE_CWD,
                                      env=child_env(f"api (pid {os.getpid()})"))
        self._started_at = time.monotonic()
        self._ready = False

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        proc = self._proc
        while time.monotonic() < deadline:
            if proc is None or proc.poll() is not None:
                if await self._find_external(0.0):  # it lost the socket to a worker started beside it (honcho's)
                    return
                code = None if proc is None else proc.returncode
                raise WorkerRestarting(f"the inference worker exited while starting (exit code {code}); "
                                       "see the server log")
            if await self._ping() == proc.pid:  # not another worker that answers while ours still starts
                self._ready = True
                log.info("inference worker ready (pid %s) after %.1fs", proc.pid, time.monotonic() - self._started_at)
                return
            await asyncio.sleep(0.05)
        raise WorkerRestarting(f"the inference worker did not answer on {self.socket} within {START_TIMEOUT_S:.0f}s")

    async def _ping(self) -> int | None:
        """The pid of the worker answering on the socket, or None."""
        try:
            reply = await asyncio.wait_for(self._single({"op": protocol.OP_PING}), PING_TIMEOUT_S)
        except (OSError, ConnectionError, asyncio.TimeoutError, ValueError):
            return None
        return reply.get("pid") if reply.get("event") == protocol.EV_PONG else None

    async def _watch(self) -> None:
        """Restart a managed worker that exits; the requests it was serving already got their 503."""
        while not self._stopping:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            proc = self._proc
            if proc is None or proc.poll() is None or self._stopping:
                continue
            lived = time.monotonic() - self._started_at
            log.warning("inference worker (pid %s) exited with code %s after %.1fs; restarting it",
                        proc.pid, proc.returncode, lived)
            self.restarts += 1
            self._fast_failures = self._fast_failures + 1 if lived < FAST_FAILURE_S else 0
            if self._fast_failures > 1:
                await asyncio.sleep(min(30.0, 2.0 ** self._fast_failures))
            async with self._lock:
                if self._proc is proc and not self._stopping:
                    self._ready = False
                    if await self._find_external(0.0):  # another worker took the socket over: use it
                        continue
                    self._spawn()
                    try:
                        await self._wait_ready()
                    except WorkerRestarting as error:
                        log.error("%s", error)

    def _lost(self) -> None:
        """A connection broke: make the next request check (and, for an external worker, maybe replace) it."""
        self._ready = False

    # ------------------------------------------------------------ talking to it

    async def _single(self, payload: dict) -> dict:
        async for event in protocol.request(self.socket, payload):
            if event.get("event") in protocol.TERMINAL_EVENTS:
                return event
        raise ConnectionError("no reply")

    async def call(self, payload: dict, *, start: bool = True) -> dict | None:
        """One single-reply op (status, unload, load). With start=False a worker that is not up gives None."""
        if not start and not self._ready:
            # An external worker (honcho's `inference` line) may be up before this api has used it.
            if self.child_pid is not None or not await self._ping():
                return None
            self._adopt_external()
        await self.ensure()
        try:
            reply = await self._single(payload)
        except (OSError, ConnectionError, json.JSONDecodeError) as error:
            self._lost()
            if not start:
                return None
            raise WorkerRestarting(f"the inference worker stopped answering ({error}); retry the request") from None
        if reply.get("event") == protocol.EV_ERROR:
            raise WorkerError(reply)
        return reply

    async def generate(self, payload: dict) -> AsyncIterator[dict]:
        """Every event of one generate request; a dead worker becomes WorkerRestarting (503, retryable).

        Closing this iterator early closes the connection, which cancels the request in the worker.
        """
        await self.ensure()
        events = protocol.request(self.socket, payload)
        try:
            while True:
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    return
                except (OSError, ConnectionError, json.JSONDecodeError) as error:
                    self._lost()
                    log.warning("inference worker connection lost during request %s: %s", payload.get("id"), error)
                    raise WorkerRestarting("the inference worker stopped while generating (it is being "
                                           "restarted); retry the request") from None
                yield event
        finally:
            await events.aclose()
