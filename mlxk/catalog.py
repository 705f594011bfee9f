"""Which cached models can be served, and what a user's model name means — shared by the api and `mlxk run`.

Resolution reads the index (state.db) after a cheap refresh, so a model downloaded a second ago is found and a
deleted one is not. A name that matches a model the index says cannot run fails with the index's reason, never
with a loader traceback from the worker. Imports nothing heavy: `mlxk run` resolves names before it starts a
server.

Workspaces (mlx-knife's model folders, `mlxk run ./dir`) are served by an opaque id, never by a path: the CLI, run
by the user who owns MLXK_HOME, registers the folder (register_workspace) and sends `workspace:<16 hex>`; the server
resolves only registered ids, so no HTTP client can make it read a folder of its choosing.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from mlxk import cache, db, index, names
from mlxk.clock import iso_utc
from mlxk.config import Settings
from mlxk.db import models as queries
from mlxk.errors import ModelNotFound, ModelNotRunnable
from mlxk.health import mlx_lm_signature

SERVABLE_TYPES = ("chat", "base")
EMBEDDING_TYPES = ("embedding",)


@dataclass(frozen=True)
class Servable:
    repo_id: str
    revision: str
    path: str                  # absolute snapshot directory
    row: dict | None = field(default=None, compare=False)   # a workspace's row (cached models: see Catalog.rows)

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
        rows = index.rows(loaded.conn)
        # A row the runtime scan has not judged yet takes the provisional verdict `list --json` shows (mlx-lm's
        # registry read from its files, plus the worker's own encoders): a model type nothing here runs is neither
        # listed as servable (/api/tags, /v1/models) nor sent to the worker before the scan says so.
        unjudged = [row["repo_id"] for row in rows if index.is_pending(row)]
        verdicts = index.provisional_verdicts(loaded.conn, unjudged) if unjudged else {}
        for row in rows:
            if row["repo_id"] in verdicts:
                row["runtime_compatible"], row["reason"] = verdicts[row["repo_id"]]
        return Catalog(rows, pending)


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


def runnable(rows: list[dict], types: tuple[str, ...] = SERVABLE_TYPES) -> list[dict]:
    """The rows that can be served as one of `types` (generation by default)."""
    return [row for row in rows if why_not_runnable(row, types) is None]


def resolve_row(name: str, rows: list[dict], types: tuple[str, ...] = SERVABLE_TYPES) -> tuple[dict, str]:
    """The runnable row `name` means (exact, fuzzy or `name@hash`) and the revision it names, or a clear MlxkError."""
    resolved = index.resolve_in(rows, names.parse(name))
    row = resolved.row
    reason = why_not_runnable(row, types)
    if reason:
        raise ModelNotRunnable(f"{row['repo_id']} cannot be run: {reason}", name=row["repo_id"], reason=reason)
    return row, resolved.revision


def resolve(name: str, rows: list[dict], settings: Settings, types: tuple[str, ...] = SERVABLE_TYPES) -> Servable:
    """The servable model `name` means (a cached model's name, or a registered `workspace:<id>`), or a clear
    MlxkError."""
    if is_workspace_id(name):
        return resolve_workspace(name, settings, types)
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


WORKSPACE_PREFIX = "workspace:"
_WORKSPACE_ID = re.compile(r"^workspace:[0-9a-f]{16}$")


def is_workspace_id(name: str) -> bool:
    """`workspace:<16 hex>`: a workspace folder registered by `mlxk run PATH` (see register_workspace)."""
    return bool(_WORKSPACE_ID.match(name or ""))


def _workspace_row(typed: str, types: tuple[str, ...]) -> dict:
    """The folder's row (index.workspace: config.json, weights, integrity and runtime, as `show`/`health ./dir`
    check it), or ModelNotFound / ModelNotRunnable."""
    row = index.workspace(typed)
    reason = why_not_runnable(row, types)
    if reason:
        raise ModelNotRunnable(f"workspace {typed!r} cannot be run: {reason}", name=typed, reason=reason)
    return row


def register_workspace(typed: str, settings: Settings, types: tuple[str, ...] = SERVABLE_TYPES) -> str:
    """Check that the folder `typed` (`./dir`, `/abs/dir`, `~/dir`) holds a runnable model and record it in
    state.db; returns its id, `workspace:<16 hex>` (the same id every time for the same absolute path).

    Only the CLI calls this: the user names the folder on their own command line. Raises ModelNotFound (not a
    folder, no config.json) or ModelNotRunnable (the integrity or runtime check's reason). Writes nothing into the
    folder."""
    row = _workspace_row(typed, types)
    with closing(db.connect(settings.state_db)) as conn:
        return queries.workspace_id(conn, path=row["snapshot_path"], new_id=WORKSPACE_PREFIX + secrets.token_hex(8),
                                    registered_at=iso_utc(time.time()))


def _stamp(path: Path) -> str:
    """What the folder's files are now (names, sizes, modification times), 16 hex digits: the workspace's
    "revision", so a changed folder is a different model to the inference worker and is loaded again."""
    digest = hashlib.sha256()
    for rel, entry in cache.walk_files(path):
        try:
            stat = entry.stat()
        except OSError:
            continue
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def resolve_workspace(workspace_id: str, settings: Settings, types: tuple[str, ...] = SERVABLE_TYPES) -> Servable:
    """The registered workspace `workspace_id` as a Servable (key `workspace:<id>@<stamp>`), checked now: a folder
    that was deleted or no longer holds a runnable model is ModelNotFound / ModelNotRunnable naming the folder and
    the fix."""
    with closing(db.connect(settings.state_db)) as conn:
        path = queries.workspace_path(conn, workspace_id)
    if path is None:
        raise ModelNotFound(
            f"no workspace is registered as {workspace_id!r}: register a model folder with `mlxk run PATH` (the "
            "server never reads a folder path from a request).", name=workspace_id)
    stamp = _stamp(Path(path))
    row = _checked_workspaces.get((path, stamp, types))
    if row is None:
        try:
            row = _workspace_row(path, types)
        except ModelNotFound as error:
            raise ModelNotFound(
                f"workspace {workspace_id} ({path}) no longer holds a model: {error.message} Put the model back, or "
                "run `mlxk run PATH` on the folder that holds it now.", name=workspace_id) from None
        if len(_checked_workspaces) >= 64:
            _checked_workspaces.clear()
        _checked_workspaces[(path, stamp, types)] = row
    return Servable(repo_id=workspace_id, revision=stamp, path=path, row=row)


# (path, stamp, types) -> the row of a workspace that passed its checks: an unchanged folder is not inspected again
# on every request (a changed one has another stamp)
_checked_workspaces: dict[tuple, dict] = {}
