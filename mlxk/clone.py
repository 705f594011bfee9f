"""Copy a cached snapshot into a flat, editable workspace, copy-on-write where the filesystem allows."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mlxk.clone")


@dataclass
class CloneResult:
    dest: Path
    files: int
    bytes: int
    method: str      # "clonefile" | "reflink" | "copy"


def clone(snapshot: Path, dest: Path, *, progress=None) -> CloneResult:
    raise NotImplementedError
