"""Which cached models can be served, and what a user's model name means — shared by the api and `mlxk run`.

Resolution reads the index (state.db) after a cheap refresh, so a model downloaded a second ago is found and a
deleted one is not. A name that matches a model the index says cannot run fails with the index's reason, never
with a loader traceback from the worker. Imports nothing heavy: `mlxk run` resolves names before it starts a
server.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mlxk import cache, names
from mlxk.config import Settings
from mlxk.errors import ModelNotRunnable

log = logging.getLogger("mlxk.server.catalog")

SERVABLE_TYPES = ("chat", "base")


@dataclass(frozen=True)
class Servable:
    repo_id: str
    revision: str
    path: str                  # absolute snapshot directory
    model_type: str | None
    context_length: int | None
    last_modified: str | None

    @property
    def key(self) -> str:
        """Identity of the weights for the inference worker: repo + full commit."""
        return f"{self.repo_id}@{self.revision}"


def load_rows(settings: Settings) -> list[dict]:
    """Every model row, after bringing the index up to date with the cache."""
    from contextlib import closing

    from mlxk import index

    with closing(index.load(settings.state_db, settings.hf_hub_cache)) as loaded:
        return index.rows(loaded.conn)


def why_not_runnable(row: dict) -> str | None:
    """None when the row can be served; else the reason shown to the user."""
    if row.get("health") != "healthy":
        return row.get("reason") or "the model failed its integrity check (see `mlxk health`)"
    if (row.get("framework") or "").lower() != "mlx":
        framework = row.get("framework") or "unknown"
        return row.get("reason") or f"it is a {framework} model, not MLX"
    if row.get("runtime_compatible") is False:
        return row.get("reason") or "the installed mlx-lm cannot run this model type"
    if row.get("model_type") not in SERVABLE_TYPES:
        return f"it is an {row.get('model_type')} model; only chat and base models generate text"
    return None


def runnable(rows: list[dict]) -> list[dict]:
    return [row for row in rows if why_not_runnable(row) is None]


def resolve(name: str, rows: list[dict], settings: Settings) -> Servable:
    """The servable model `name` means (exact, fuzzy or `name@hash`), or a clear MlxkError."""
    from mlxk import index

    resolved = index.resolve_in(rows, names.parse(name))
    row, revision = resolved.row, resolved.revision
    repo_id = row["repo_id"]
    reason = why_not_runnable(row)
    if reason:
        raise ModelNotRunnable(f"{repo_id} cannot be run: {reason}", name=repo_id, reason=reason)
    path = row["snapshot_path"]
    if revision != row["revision"]:
        path = str(cache.repo_dir(settings.hf_hub_cache, repo_id) / "snapshots" / revision)
    return Servable(repo_id=repo_id, revision=revision, path=str(Path(path).resolve()),
                    model_type=row.get("model_type"), context_length=row.get("context_length"),
                    last_modified=row.get("last_modified"))


def find(name: str, settings: Settings) -> Servable:
    return resolve(name, load_rows(settings), settings)
