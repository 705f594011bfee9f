"""Timestamps as mlxk writes them everywhere: UTC ISO-8601 with a Z (`2026-11-25T02:01:07Z`).

One place for the domain, the workers and the surfaces alike; state.db's job rows keep milliseconds (db.jobs).
"""
from __future__ import annotations

import time
from datetime import datetime


def iso_utc(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def parse_iso(value: str | None) -> float | None:
    """Unix seconds of an ISO-8601 timestamp (with Z or an offset); None stays None."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
