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

A worker that is alive but frozen (SIGSTOP, a hung kernel, swapping to death) never closes its connections, so
requests would wait on it forever. The monitor therefore pings a ready worker every LIVENESS_INTERVAL_S; the ping
is answered by the worker's socket thread, not the MLX thread, so a long prefill or generation does not delay it.
A worker that has not answered for `timeout_s` (MLXK_WORKER_TIMEOUT) is `unresponsive`: /health says so, the
requests waiting on it get a retryable 503 `worker_unresponsive` (their connections are aborted), and new ones get
the same at once. The timeout bounds the worker's silence, never a request's total time. A worker of the api's own
that stays unresponsive for `replace_after_s` (MLXK_WORKER_REPLACE_AFTER) is killed, and restarted like one that
died; one that answers again before that is simply ready again.

A model that fails in the worker (an error event of type model_failed) is reported through `on_model_failed`,
which the server uses to mark the model not runnable in the index.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from mlxk import processes
from mlxk.config import child_env
from mlxk.workers.inference import protocol

from mlxk.server.errors import WorkerError, WorkerRestarting, WorkerUnresponsive

log = logging.getLogger("mlxk.server.supervisor")

START_TIMEOUT_S = 120.0     # importing mlx on a cold, busy machine can take a while
EXTERNAL_GRACE_S = 3.0      # a socket file with no answer may be a worker still starting (honcho starts both)
EXTERNAL_WAIT_S = 30.0      # with MLXK_INFERENCE_EXTERNAL: how long a request waits for the worker to come up
PING_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 10.0
MONITOR_INTERVAL_S = 0.5
FAST_FAILURE_S = 10.0       # a worker that dies this soon after starting is restarted with a growing delay
LIVENESS_INTERVAL_S = 1.0   # how often the monitor pings a ready worker


@dataclass(frozen=True)
class WorkerOptions:
    socket: Path
    max_loaded: int
    keep_alive_s: float
    max_waiting: int
    max_prompt_tokens: int
    external: bool = False   # MLXK_INFERENCE_EXTERNAL: someone else (honcho's `inference` line) runs the worker
    timeout_s: float = 5.0          # MLXK_WORKER_TIMEOUT: silent to pings this long = unresponsive
    replace_after_s: float = 30.0   # MLXK_WORKER_REPLACE_AFTER: an unresponsive child is killed after this long

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
        self._last_pong = 0.0                       # monotonic time of the last answered ping
        self._last_liveness = 0.0                   # when the monitor last pinged
        self._unresponsive_since: float | None = None
        self._connections: weakref.WeakSet = weakref.WeakSet()  # open worker connections, aborted if it freezes
        # Called with (model key, one-line reason) when the worker reports a model_failed error.
        self.on_model_failed: Callable[[str, str], Awaitable[None]] | None = None

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
        found = {"state": state, "pid": pid, "managed": managed, "restarts": self.restarts}
        if state == "ready" and self._unresponsive_since is not None:
            found["state"] = "unresponsive"
            found["silent_s"] = round(time.monotonic() - self._last_pong, 1)
        return found

    @property
    def child_pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    async def ensure(self) -> None:
        """Make sure a worker answers on the socket, starting one if needed; WorkerUnresponsive while it is frozen."""
        self._refuse_if_unresponsive()
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
        self._answered()

    def _spawn(self) -> None:
        self._external = False
        argv = self.options.argv()
        log.info("starting inference worker: %s", " ".join(argv))
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=preexec, cwd=processes.SAFE_CWD,
                                      env=_worker_env())
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
                self._answered()
                log.info("inference worker ready (pid %s) after %.1fs", proc.pid, time.monotonic() - self._started_at)
                return
            await asyncio.sleep(0.05)
        raise WorkerRestarting(f"the inference worker did not answer on {self.socket} within {START_TIMEOUT_S:.0f}s")

    async def _ping(self, timeout: float = PING_TIMEOUT_S) -> int | None:
        """The pid of the worker answering on the socket, or None."""
        try:
            reply = await asyncio.wait_for(self._single({"op": protocol.OP_PING}), timeout)
        except (OSError, ConnectionError, asyncio.TimeoutError, ValueError):
            return None
        return reply.get("pid") if reply.get("event") == protocol.EV_PONG else None

    # ------------------------------------------------------------ liveness

    def _answered(self) -> None:
        if self._unresponsive_since is not None:
            log.warning("inference worker answers again after %.1fs of silence",
                        time.monotonic() - self._last_pong)
        self._last_pong, self._unresponsive_since = time.monotonic(), None

    def _refuse_if_unresponsive(self) -> None:
        if self._unresponsive_since is None:
            return
        silent = time.monotonic() - self._last_pong
        if self.child_pid is not None:
            replaced = max(0.0, self._unresponsive_since + self.options.replace_after_s - time.monotonic())
            then = f"; it is replaced in {replaced:.0f}s unless it answers again"
        else:
            then = ""
        raise WorkerUnresponsive(f"the inference worker has not answered for {silent:.0f}s "
                                 f"(MLXK_WORKER_TIMEOUT={self.options.timeout_s:g}){then}; retry the request")

    async def _check_alive(self) -> None:
        """Ping a ready worker; mark it unresponsive after timeout_s of silence, kill our own after replace_after_s."""
        if not self._ready or not (self._external or self.child_pid):
            return  # nothing up, or still starting (importing mlx answers no pings)
        now = time.monotonic()
        if now - self._last_liveness < LIVENESS_INTERVAL_S:
            return
        self._last_liveness = now
        timeout = self.options.timeout_s
        if await self._ping(min(PING_TIMEOUT_S, timeout)) is not None:
            self._answered()
            return
        now = time.monotonic()
        if self._external and not _lock_held(self.lock_path):
            self._lost()  # an external worker that exited: the next request finds or starts another
            return
        if now - self._last_pong < timeout:
            return
        if self._unresponsive_since is None:
            self._unresponsive_since = now
            log.warning("inference worker (pid %s) has not answered a ping for %.1fs: unresponsive; failing its "
                        "%d open requests", self.child_pid, now - self._last_pong, len(self._connections))
            for writer in list(self._connections):
                writer.transport.abort()  # its reader sees EOF: the request fails with WorkerUnresponsive
        proc = self._proc
        if proc is not None and proc.poll() is None and now - self._unresponsive_since >= self.options.replace_after_s:
            log.warning("inference worker (pid %s) unresponsive for %.1fs: killing it to start a new one",
                        proc.pid, now - self._unresponsive_since)
            proc.kill()  # the monitor restarts it like any worker that died

    def _connected(self, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)

    async def _report(self, event: dict) -> None:
        """Pass a model_failed error on to on_model_failed (the index), never failing the request a second time."""
        if event.get("type") != protocol.ERR_MODEL_FAILED or self.on_model_failed is None:
            return
        key, reason = event.get("model"), event.get("reason")
        if not isinstance(key, str) or not isinstance(reason, str):
            return
        try:
            await self.on_model_failed(key, reason)
        except Exception:  # recording the verdict is best effort; the request already has its error
            log.exception("could not record that %s failed", key)

    async def _watch(self) -> None:
        """Restart a managed worker that exits; the requests it was serving already got their 503."""
        while not self._stopping:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            proc = self._proc
            if proc is None or proc.poll() is None or self._stopping:
                if not self._stopping:
                    await self._check_alive()
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
                    self._ready, self._unresponsive_since = False, None
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
        """The op's terminal event. Cancelling the caller closes the connection at once (aclosing), which is how the
        worker learns that an embed request's client left."""
        async with contextlib.aclosing(protocol.request(self.socket, payload, opened=self._connected)) as events:
            async for event in events:
                if event.get("event") in protocol.TERMINAL_EVENTS:
                    return event
        raise ConnectionError("no reply")

    async def call(self, payload: dict, *, start: bool = True) -> dict | None:
        """One single-reply op (status, unload, load). With start=False a worker that is not up gives None."""
        if not start and self._unresponsive_since is not None:
            return None
        if not start and not self._ready:
            # An external worker (honcho's `inference` line) may be up before this api has used it.
            if self.child_pid is not None or not await self._ping():
                return None
            self._adopt_external()
        await self.ensure()
        try:
            reply = await self._single(payload)
        except (OSError, ConnectionError, json.JSONDecodeError) as error:
            if self._unresponsive_since is None:
                self._lost()
            if not start:
                return None
            self._refuse_if_unresponsive()  # the monitor aborted it: the worker froze
            raise WorkerRestarting(f"the inference worker stopped answering ({error}); retry the request") from None
        if reply.get("event") == protocol.EV_ERROR:
            await self._report(reply)
            raise WorkerError(reply)
        return reply

    async def generate(self, payload: dict) -> AsyncIterator[dict]:
        """Every event of one generate request; a dead worker becomes WorkerRestarting (503, retryable).

        Closing this iterator early closes the connection, which cancels the request in the worker.
        """
        await self.ensure()
        events = protocol.request(self.socket, payload, opened=self._connected)
        try:
            while True:
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    return
                except (OSError, ConnectionError, json.JSONDecodeError) as error:
                    self._refuse_if_unresponsive()  # the monitor aborted it: the worker froze
                    self._lost()
                    log.warning("inference worker connection lost during request %s: %s", payload.get("id"), error)
                    raise WorkerRestarting("the inference worker stopped while generating (it is being "
                                           "restarted); retry the request") from None
                if event.get("event") == protocol.EV_ERROR:
                    await self._report(event)
                yield event
        finally:
            await events.aclose()


def _worker_env() -> dict[str, str]:
    """The inference worker's environment: the api's, minus the API key (the worker answers a local socket only and
    has no use for it, so it cannot leak from there)."""
    env = child_env(f"api (pid {os.getpid()})")
    env.pop("MLXK_API_KEY", None)
    return env
