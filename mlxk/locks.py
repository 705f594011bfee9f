"""An exclusive advisory lock on a file, held for a `with` block: how racing CLIs agree on who starts a process.

The kernel drops it if the holder dies, so a crashed CLI never leaves it stuck. db/ takes it around migrations too,
importing it only when it migrates (this module is off the path of `mlxk list`).
"""
from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
