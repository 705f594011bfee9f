"""`python -m mlxk.workers.inference --socket PATH ...`: the inference worker process."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from mlxk import logs
from mlxk.config import settings
from mlxk.errors import MlxkError
from .engine import Engine
from .prefixcache import PrefixCache
from .server import WorkerServer

log = logging.getLogger("mlxk.inference.main")


def _defaults() -> dict:
    """Option defaults from mlxk.config, the one place environment variables are read."""
    s = settings()
    return {"socket": str(s.inference_socket), "max_loaded": s.max_loaded, "keep_alive": s.keep_alive_s,
            "max_waiting": s.max_waiting, "max_prompt_tokens": s.max_prompt_tokens,
            "prefix_cache_dir": s.prefix_cache_dir, "prefix_cache_bytes": s.prefix_cache_bytes}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = _defaults()
    p = argparse.ArgumentParser(prog="python -m mlxk.workers.inference", description="mlxk inference worker")
    p.add_argument("--socket", default=d["socket"], help="Unix socket path to serve")
    p.add_argument("--max-loaded", type=int, default=d["max_loaded"], help="models resident at once (LRU)")
    p.add_argument("--keep-alive", type=float, default=d["keep_alive"], help="seconds an idle model stays loaded (negative: forever)")
    p.add_argument("--max-waiting", type=int, default=d["max_waiting"], help="queued requests before 'busy'")
    p.add_argument("--max-prompt-tokens", type=int, default=d["max_prompt_tokens"], help="longest prompt accepted")
    p.add_argument("--max-batch", type=int, default=32, help="most rows decoding together")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    p.add_argument("--log-level", type=str.lower, choices=("debug", "info", "warning", "error"), default=None,
                   help="default MLXK_LOG_LEVEL, else info")
    p.add_argument("--log-json", action="store_true", default=None, help="JSON lines (MLXK_LOG_JSON)")
    p.set_defaults(prefix_cache_dir=d["prefix_cache_dir"], prefix_cache_bytes=d["prefix_cache_bytes"])  # env only
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        logs.setup(args.log_level, args.log_json)
    except MlxkError as error:  # a bad environment variable: say which, no traceback
        print(f"Error: {error.message}", file=sys.stderr)
        return 1

    prefix_cache = PrefixCache(args.prefix_cache_dir, args.prefix_cache_bytes)
    server: WorkerServer | None = None
    engine = Engine(
        max_loaded=args.max_loaded, keep_alive_s=args.keep_alive, max_waiting=args.max_waiting,
        max_prompt_tokens=args.max_prompt_tokens, completion_batch_size=args.max_batch,
        deliver=lambda batch: server.deliver(batch), prefix_cache=prefix_cache,
    )
    server = WorkerServer(engine, args.socket, idle_exit_s=args.idle_exit)

    def on_signal(signum, _frame):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        engine.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start_in_thread()
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    # MLX runs on the main thread (see Engine.run); the socket server lives on its own thread.
    ok = engine.run()
    server.shutdown()
    prefix_cache.close(timeout=10)  # blocks queued for the disk are written before the process ends
    logging.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: MLX's static destructors can abort a process that used other threads.
    os._exit(code)
