"""Named pause points, so tests reach a fault point deterministically instead of sleeping and hoping.

A step of a job calls `checkpoint("pull.linking")`. Unless MLXK_TEST_PAUSE_AT names that step, this is one cached
frozenset lookup. When it does, the process writes `$MLXK_HOME/run/paused-<step>` (its pid, one line) and waits
until that file is removed: the test reads the marker, then `kill -9`s the pid at exactly that point, or deletes the
marker to let the step go on. Never set in production; the variable is documented only here and in tests.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from mlxk.config import settings

_steps: frozenset[str] | None = None


def _armed() -> frozenset[str]:
    global _steps
    if _steps is None:
        from mlxk.config import test_pause_at

        _steps = test_pause_at()
    return _steps


def marker(home: Path, step: str) -> Path:
    """The file a paused process writes for `step` (also what a test waits for and deletes)."""
    return Path(home) / "run" / f"paused-{step}"


def checkpoint(step: str, *, poll_s: float = 0.02) -> None:
    """Pause here while MLXK_TEST_PAUSE_AT names `step` and the marker file exists; a no-op otherwise."""
    if step not in _armed():
        return

    path = marker(settings().home, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")
    while path.exists():
        time.sleep(poll_s)
