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

import os
import sys
from pathlib import Path

SAFE_CWD = "/"   # always there, and holds no module a child could import by accident


def python_argv(*args: str) -> list[str]:
    """This interpreter with the flag that keeps the working directory off sys.path, then `args`."""
    return [sys.executable, "-P" if sys.version_info >= (3, 11) else "-I", *args]


def started_by_cli() -> str:
    """How a process started for a CLI command names its starter: `mlxk pull`, `mlxk list`..."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    return f"mlxk {command}" if command else "mlxk"
