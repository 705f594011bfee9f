"""The worker's socket side: asyncio on its own thread, one task per connection, talking to the Engine.

The engine's loop owns MLX and runs elsewhere (the process's main thread). Events come back through
one `call_soon_threadsafe` per decode step (`deliver`), are fanned out to per-request asyncio queues,
and written as JSON lines. A connection that closes cancels its request (see protocol.py).

One worker per socket: a worker holds an exclusive flock on `<socket>.lock` (protocol.socket_lock_path) for its whole
life, taken before it touches the socket path. Checking "is anyone serving?" and binding are two steps, and
binding replaces an existing socket file, so without the lock two workers starting together (honcho's
`inference` line and one the api starts on a first request) could both bind, the second one orphaning the
first. The loser of the lock exits at once; the api's supervisor then uses the winner. The kernel drops the
lock when the process dies, however it dies, so a stale lock never blocks a new worker.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path

from . import protocol
from .embed import Embedder
from .engine import Engine
from .errors import BadRequest, InferenceError
from .protocol import socket_lock_path

log = logging.getLogger("mlxk.inference.server")

IDLE_CHECK_S = 1.0
SHUTDOWN_GRACE_S = 3.0
LOCK_RETRY_S = 0.5   # the api's supervisor probes the lock by taking it for an instant: do not lose to a probe


class WorkerServer:
    def __init__(self, engine: Engine, socket_path: str | Path, *, idle_exit_s: float | None = None):
        self.engine = engine
        self.embedder = Embedder(engine)
        self.socket_path = Path(socket_path)
        self.idle_exit_s = idle_exit_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stop: asyncio.Event | None = None
        self._handlers: set[asyncio.Task] = set()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start_in_thread(self) -> None:
        """Serve on a background thread; returns once the socket accepts connections, raises if it cannot."""
        failure: list[BaseException] = []

        def main():
            try:
                asyncio.run(self.serve())
            except Exception as e:  # reported to start_in_thread's caller, which decides the exit code
                failure.append(e)
                self._ready.set()

        self._thread = threading.Thread(target=main, name="mlxk-socket", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the socket server did not start within 30s")
        if failure:
            raise RuntimeError(f"cannot serve {self.socket_path}: {failure[0]}") from failure[0]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, let handlers write their last events, remove the socket (any thread)."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def deliver(self, batch: list) -> None:
        """Engine -> sockets, called on the MLX thread once per step with that step's events."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing during shutdown
                loop.call_soon_threadsafe(_fan_out, batch)

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._claim_socket_path()
        self._server = await asyncio.start_unix_server(
            self._on_connection, path=str(self.socket_path), limit=protocol.MAX_LINE_BYTES)
        os.chmod(self.socket_path, 0o600)  # the socket drives a model: only its owner may talk to it
        log.info("inference worker listening on %s (pid %d)", self.socket_path, os.getpid())
        self._ready.set()
        idle = asyncio.create_task(self._watch_idle()) if self.idle_exit_s else None
        try:
            await self._stop.wait()
        finally:
            if idle is not None:
                idle.cancel()
            self._server.close()
            self.engine.request_stop()  # fails in-flight rows with a retryable error, delivered to handlers
            if self._handlers:
                await asyncio.wait(self._handlers, timeout=SHUTDOWN_GRACE_S)
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            self._release_lock()  # after the unlink: a successor never sees our socket file as its own
            log.info("inference worker stopped listening")

    def _claim_socket_path(self) -> None:
        """Take the socket's lock, then remove a stale socket left by a dead worker; refuse to steal a live one."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(socket_lock_path(self.socket_path), os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                os.close(fd)
                raise RuntimeError(f"another inference worker is already serving {self.socket_path}") from None
        self._lock_fd = fd
        if not self.socket_path.exists():
            return
        try:  # a worker of a version without the lock may still serve it
            protocol.call(str(self.socket_path), {"op": protocol.OP_PING}, timeout=2)
        except (OSError, ValueError):
            self.socket_path.unlink()
            return
        self._release_lock()
        raise RuntimeError(f"another inference worker is already serving {self.socket_path}")

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    async def _watch_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            quiet = time.time() - self.engine.last_activity
            if not self._handlers and not self.engine.busy and quiet >= self.idle_exit_s:
                log.info("idle for %.0fs: exiting", quiet)
                self._stop.set()
                return

    # ---- connections ---------------------------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, BrokenPipeError):
            pass  # the client left; its request (if any) was cancelled by _generate
        except Exception:  # a supervisor of one connection: log and drop it, keep serving
            log.exception("connection handler failed")
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            return await _send(writer, BadRequest("request line too long").to_event())
        if not line.strip():
            return
        try:
            message = protocol.decode(line)
            op = message.get("op")
            if op == protocol.OP_GENERATE:
                return await self._generate(protocol.parse_generate(message), reader, writer)
            if op == protocol.OP_EMBED:
                return await self._embed(message, reader, writer)
            reply = await self._single_reply(op, message)
        except protocol.ProtocolError as e:
            reply = BadRequest(str(e)).to_event()
        except InferenceError as e:
            reply = e.to_event()
        await _send(writer, reply)

    async def _single_reply(self, op: str, message: dict) -> dict:
        if op == protocol.OP_PING:
            return {"event": protocol.EV_PONG, "pid": os.getpid()}
        if op == protocol.OP_STATUS:
            return {**self.engine.status(), **self.embedder.stats()}
        if op == protocol.OP_UNLOAD:
            model = message.get("model")
            if model is not None and not isinstance(model, str):
                raise protocol.ProtocolError('"model" must be a string or null')
            return await asyncio.wrap_future(self.engine.unload(model))
        if op == protocol.OP_LOAD:
            ref = protocol.parse_model_ref(message.get("model"))
            keep_alive = message.get("keep_alive")
            if keep_alive is not None and (isinstance(keep_alive, bool) or not isinstance(keep_alive, (int, float))):
                raise protocol.ProtocolError('"keep_alive" must be a number or null')
            return await asyncio.wrap_future(self.engine.load(ref, keep_alive))
        raise protocol.ProtocolError(f"unknown op {op!r}; expected one of {', '.join(protocol.OPS)}")

    async def _embed(self, message: dict, reader, writer) -> None:
        """The embed op; a client that hangs up before the vectors come cancels it (Embedder.embed drops a request
        still waiting for its batch)."""
        work = asyncio.ensure_future(self._embed_reply(message))
        try:
            while True:
                hangup = asyncio.ensure_future(reader.read(1))
                await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
                if work.done():
                    hangup.cancel()
                    return await _send(writer, work.result())
                if not hangup.result():  # EOF: the client left (stray bytes after the request line are ignored)
                    log.info("client of an embed request hung up: cancelled")
                    return
        finally:
            work.cancel()

    async def _embed_reply(self, message: dict) -> dict:
        try:
            return await self.embedder.embed(message)
        except protocol.ProtocolError as e:
            return BadRequest(str(e)).to_event()
        except InferenceError as e:
            return e.to_event()

    async def _generate(self, request: protocol.GenerateRequest, reader, writer) -> None:
        events: asyncio.Queue = asyncio.Queue()
        try:
            ticket = self.engine.submit(request, context=events)
        except InferenceError as e:
            return await _send(writer, e.to_event())
        # The client never sends more after its line, so EOF on the read side means it hung up. The read wakes the
        # loop through the events queue: one awaited get per step, no task and no asyncio.wait per event.
        hangup = _watch_hangup(reader, events)
        try:
            while True:
                if events.empty() and hangup.done():  # a hang-up counts once the events that came before it are written
                    if hangup.result():  # stray bytes after the request line: ignore, keep watching
                        hangup = _watch_hangup(reader, events)
                        continue
                    self.engine.cancel(ticket)
                    log.info("client of %s hung up: cancelled", request.id)
                    return
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                batch = [e for e in batch if e is not _HANGUP]
                if not batch:
                    continue
                writer.write(b"".join(protocol.encode(e) for e in batch))
                await writer.drain()
                if any(e.get("event") in (protocol.EV_DONE, protocol.EV_ERROR) for e in batch):
                    return
        except (ConnectionError, BrokenPipeError):
            self.engine.cancel(ticket)
            raise
        except asyncio.CancelledError:
            self.engine.cancel(ticket)
            raise
        finally:
            hangup.cancel()


_HANGUP = object()   # put on a request's events queue when its client's read side ends (or fails)


def _watch_hangup(reader: asyncio.StreamReader, events: asyncio.Queue) -> asyncio.Future:
    hangup = asyncio.ensure_future(reader.read(1))
    hangup.add_done_callback(lambda _: events.put_nowait(_HANGUP))
    return hangup


def _fan_out(batch: list) -> None:
    for ticket, event in batch:
        ticket.context.put_nowait(event)


async def _send(writer: asyncio.StreamWriter, event: dict) -> None:
    writer.write(protocol.encode(event))
    await writer.drain()

