"""Which cached models can be served, and what a user's model name means — shared by the api and `mlxk run`.

Resolution reads the index (state.db) after a cheap refresh, so a model downloaded a second ago is found and a
deleted one is not. A name that matches a model the index says cannot run fails with the index's reason, never
with a loader traceback from the worker. Imports nothing heavy: `mlxk run` resolves names before it starts a
server.
"""
from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from mlxk import cache, names
from mlxk import db, index
from mlxk.clock import iso_utc
from mlxk.config import Settings
from mlxk.db import models as queries
from mlxk.errors import ModelNotRunnable
from mlxk.health import mlx_lm_signature

SERVABLE_TYPES = ("chat", "base")
EMBEDDING_TYPES = ("embedding",)


@dataclass(frozen=True)
class Servable:
    repo_id: str
    revision: str
    path: str                  # absolute snapshot directory

    @property
    def key(self) -> str:
        """Identity of the weights for the inference worker: repo + full commit."""
        return f"{self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class Catalog:
    """The index as one refresh left it."""
    rows: list[dict]
    # Repos to hand to a background runtime scan. Empty when state.db was locked (index.Loaded.warning): the
    # rows then came from a private index that is thrown away, and `mlxk list` queues nothing then either.
    pending: list[str]


def load(settings: Settings) -> Catalog:
    """Every model row (and the repos pending a runtime check), after bringing the index up to date with the cache."""
    with closing(index.load(settings.state_db, settings.hf_hub_cache)) as loaded:
        pending = [] if loaded.warning else loaded.refresh.pending
        return Catalog(index.rows(loaded.conn), pending)


def why_not_runnable(row: dict, types: tuple[str, ...] = SERVABLE_TYPES) -> str | None:
    """None when the row can be served (as one of `types`: generation by default); else the reason shown."""
    if row.get("health") != "healthy":
        return row.get("reason") or "the model failed its integrity check (see `mlxk health`)"
    if (row.get("framework") or "").lower() != "mlx":
        framework = row.get("framework") or "unknown"
        return row.get("reason") or f"it is a {framework} model, not MLX"
    if row.get("runtime_compatible") is False:
        return row.get("reason") or "the installed mlx-lm cannot run this model type"
    if row.get("model_type") not in types:
        if types == EMBEDDING_TYPES:
            return f"it is a {row.get('model_type')} model; only embedding models give embeddings"
        return f"it is an {row.get('model_type')} model; only chat and base models generate text"
    return None


def runnable(rows: list[dict]) -> list[dict]:
    return [row for row in rows if why_not_runnable(row) is None]


def resolve_row(name: str, rows: list[dict], types: tuple[str, ...] = SERVABLE_TYPES) -> tuple[dict, str]:
    """The runnable row `name` means (exact, fuzzy or `name@hash`) and the revision it names, or a clear MlxkError."""
    resolved = index.resolve_in(rows, names.parse(name))
    row = resolved.row
    reason = why_not_runnable(row, types)
    if reason:
        raise ModelNotRunnable(f"{row['repo_id']} cannot be run: {reason}", name=row["repo_id"], reason=reason)
    return row, resolved.revision


def resolve(name: str, rows: list[dict], settings: Settings, types: tuple[str, ...] = SERVABLE_TYPES) -> Servable:
    """The servable model `name` means, or a clear MlxkError."""
    row, revision = resolve_row(name, rows, types)
    repo_id = row["repo_id"]
    path = row["snapshot_path"]
    if revision != row["revision"]:
        path = str(cache.repo_dir(settings.hf_hub_cache, repo_id) / "snapshots" / revision)
    return Servable(repo_id=repo_id, revision=revision, path=str(Path(path).resolve()))


def mark_failed(settings: Settings, key: str, reason: str) -> bool:
    """Record in the index that the model `key` ("org/name@<commit>") failed in the inference worker.

    The verdict (runtime_compatible false, `reason`) goes through the index's own runtime-verdict query, stored
    against the fingerprint the row has now: a changed repo is re-inspected and judged again, and so is every
    repo when mlx-lm changes. Only the revision the row describes is marked (a `name@hash` run of an older one is
    not). Returns whether a row took the verdict."""
    repo_id, _, revision = key.partition("@")
    with closing(db.connect(settings.state_db)) as conn:
        row = queries.get_model(conn, repo_id)
        if row is None or row["revision"] != revision:
            return False
        return queries.set_runtime_verdicts(conn, [{
            "repo_id": repo_id, "fingerprint": row["fingerprint"], "runtime_compatible": False, "reason": reason,
            "runtime_fingerprint": f"{row['fingerprint']}|{mlx_lm_signature()}",
            "runtime_checked_at": iso_utc(time.time())}]) > 0


def find(name: str, settings: Settings, types: tuple[str, ...] = SERVABLE_TYPES) -> Servable:
    return resolve(name, load(settings).rows, settings, types)
