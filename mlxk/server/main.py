"""Run the api in the foreground under uvicorn (what `mlxk serve` does).

uvicorn turns SIGINT/SIGTERM into a graceful shutdown; the app's lifespan then stops the inference worker it
started, so no child keeps the port or the socket.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from mlxk import logs
from mlxk.errors import ConfigError, Conflict
from mlxk.server.app import create_app
from mlxk.server.deps import ServerConfig

log = logging.getLogger("mlxk.server.main")

GRACEFUL_SHUTDOWN_S = 5


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(config: ServerConfig) -> None:
    """Anything but loopback exposes the models to the network: refuse it without an API key."""
    if not is_loopback(config.host) and not config.api_key:
        raise ConfigError(
            f"refusing to listen on {config.host} without an API key: anyone on the network could use the "
            "server. Set MLXK_API_KEY or pass --api-key-file PATH (or --api-key KEY), or bind 127.0.0.1.",
            host=config.host,
        )


def hide_from_process_list(secret: str) -> None:
    """Start this process again without `--api-key KEY` on its command line; the key moves to MLXK_API_KEY.

    /proc/<pid>/cmdline (what `ps` shows every user) is rewritten by exec, keeping the pid; the environment is
    readable by the process's own user only. Rewriting argv in place (setproctitle) was tried and dropped: on Linux it
    clobbers /proc/<pid>/environ, so `mlxk processes` could no longer tell whose server it is. Returns only when the
    command line holds no key (then it does nothing).
    """
    argv, skip = [], False
    for arg in sys.orig_argv:
        if skip:
            skip = False
        elif arg == "--api-key":
            skip = True
        elif not arg.startswith("--api-key="):
            argv.append(arg)
    if argv == list(sys.orig_argv):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, {**os.environ, "MLXK_API_KEY": secret})


def read_key_file(path: Path) -> str:
    """The API key in `path` (its first line, stripped); ConfigError naming the file when it is unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the API key file {path}: {getattr(error, 'strerror', None) or error}",
                          path=str(path)) from None
    key = (text.splitlines() or [""])[0].strip()
    if not key:
        raise ConfigError(f"the API key file {path} is empty; write the key on its first line", path=str(path))
    return key


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything starts, so a busy port is one clear line (not uvicorn's log,
    exit 3, after the app has started): Conflict when the port is taken, ConfigError for an address we cannot use."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn: TIME_WAIT of a previous run is fine
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise Conflict(f"port {port} on {host} is in use by another program (another `mlxk serve`?): stop it "
                           "(`mlxk processes`) or choose another port with --port or MLXK_PORT.",
                           host=host, port=port) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}; check --host and --port "
                          "(MLXK_HOST, MLXK_PORT).", host=host, port=port) from None
    return sock


def run_server(config: ServerConfig, *, log_level: str | None = None, log_json: bool | None = None) -> str | None:
    """Serve until stopped; returns the signal that stopped it (SIGTERM, SIGINT), None when it ended otherwise."""
    check_bind(config)
    logs.setup(log_level, log_json, secrets=[config.api_key])
    sock = bind(config.host, config.port)
    # log_config=None: uvicorn installs no handlers of its own, so its error and access logs go through ours
    # (same format, redacted, with the request id).
    uv_config = uvicorn.Config(create_app(config), host=config.host, port=config.port, log_config=None,
                               log_level=logging.getLevelName(logging.getLogger().level).lower(),
                               access_log=True, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, lifespan="on")
    server = uvicorn.Server(uv_config)
    log.info("mlxk serving on http://%s:%s (inference socket %s)", config.host, config.port,
             config.settings.inference_socket)
    with sock, _signals_noted() as stopped_by:
        server.run(sockets=[sock])
    if not server.started:
        raise ConfigError(f"the server could not start on {config.host}:{config.port}; see the messages above")
    return stopped_by[-1] if stopped_by else None


@contextmanager
def _signals_noted():
    """uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again under the handlers it found.
    Handlers that only note it let `serve` end normally (its --json envelope, exit 0) after a requested stop."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    noted: list[str] = []
    previous = {sig: signal.signal(sig, lambda number, frame: noted.append(signal.Signals(number).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield noted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
