"""The model index: one row per cached repo in state.db, kept true by cheap stat checks.

Why: `mlxk list` must answer in milliseconds for 1,000s of repos, yet the HF cache is the source of truth and other
tools change it behind mlxk's back (`hf download`, `rm -rf`). So every refresh stats a handful of paths per repo
(`cache.fingerprint`) and re-inspects only the repos whose fingerprint moved; all writes of one refresh land in one
transaction. The runtime verdict needs mlx-lm's model registry (an import of ~1 s), so `list` never computes it:
it stays NULL ("pending") until `health` or the worker's scan task calls `refresh(..., runtime=True)`. A verdict is
valid only for the fingerprint and the mlx-lm it was made with (`runtime_fingerprint`).

Every function takes a connection from mlxk.db.connect (the one way into state.db).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlxk import db
from mlxk.db import models as queries
from mlxk import cache
from mlxk.clock import iso_utc, parse_iso
from mlxk.errors import MlxkError
from mlxk.errors import AmbiguousMatch, Conflict, InvalidName, ModelNotFound
from mlxk.units import compact_size


def _log():
    """This module's logger, got when there is something to say: importing `logging` is ~3 ms of `list`."""
    import logging  # lazy: keeps `mlxk list` light

    return logging.getLogger("mlxk.index")


# Spellings of the mlx-knife 2.0.8 JSON API, so scripts written for it keep working.
FRAMEWORK_LABELS = {"mlx": "MLX", "gguf": "GGUF", "pytorch": "PyTorch", "unknown": "Unknown"}
HASH_DISPLAY = 7   # the short hash mlx-knife shows
STAMP_KEY = "mlx_lm_stamp"          # meta: where mlx-lm is installed + its mtime, cheap to recompute
SIGNATURE_KEY = "mlx_lm_signature"  # meta: the mlx-lm the stored verdicts were made with
REGISTRY_KEY = "mlx_lm_registry"    # meta: that mlx-lm's model modules and remappings, read once per install
OBJECT_SQL_KEY = "model_object_sql"  # meta: the rendering (MODEL_OBJECT_SQL_NO_ALIASES) of the stored objects


@dataclass
class Refresh:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)          # healthy, runtime verdict not known yet
    runtime_checked: list[str] = field(default_factory=list)  # got a runtime verdict in this call

    @property
    def touched(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def refresh(conn, cache_dir: Path, *, runtime: bool = False, repos=None, force: bool = False) -> Refresh:
    """Bring the index in line with the cache; `repos` limits it to those ids, `force` re-inspects regardless.

    With runtime=True, pending repos (all healthy ones in scope with force) get mlx-lm's runtime check.
    """
    cache_dir = Path(cache_dir)
    scope = None if repos is None else set(repos)
    result = Refresh()
    known = queries.freshness(conn)
    on_disk = _repos_on_disk(cache_dir, scope)
    if scope is not None:
        known = {repo_id: state for repo_id, state in known.items() if repo_id in scope}
    result.removed = sorted(set(known) - set(on_disk))
    result.added = sorted(set(on_disk) - set(known))
    result.changed = sorted(_changed(cache_dir, on_disk, known) if not force else set(on_disk) & set(known))
    signature = _Signature()
    records = _inspect_all([(repo_id, os.path.join(cache_dir, on_disk[repo_id]))
                            for repo_id in result.added + result.changed], signature)
    queries.sync_models(conn, upserts=records, deletes=result.removed)
    if result.touched:
        _log().info("index: %d added, %d changed, %d removed", len(result.added), len(result.changed),
                    len(result.removed))
    _forget_stale_verdicts(conn, signature)
    pending = queries.pending_runtime(conn)
    if runtime:
        targets = _runtime_targets(conn, pending, scope, force)
        result.runtime_checked = _check_runtime(conn, cache_dir, targets, signature)
        pending = queries.pending_runtime(conn)
    result.pending = [repo_id for repo_id in pending if scope is None or repo_id in scope]
    _render_objects(conn)
    return result


def _render_objects(conn) -> None:
    """Keep every row's model object rendered in state.db (m009), so `list --json` reads text instead of having SQLite
    render 10,000 objects each time: the rows a write cleared, or all of them when this mlxk renders differently
    from the one that stored them. Reads two things and writes nothing when all is rendered."""
    if queries.get_meta(conn, OBJECT_SQL_KEY) != MODEL_OBJECT_SQL_NO_ALIASES:
        queries.render_objects(conn, MODEL_OBJECT_SQL_NO_ALIASES, everything=True)
        queries.set_meta(conn, OBJECT_SQL_KEY, MODEL_OBJECT_SQL_NO_ALIASES)
    else:
        queries.render_objects(conn, MODEL_OBJECT_SQL_NO_ALIASES)


PARALLEL_MIN_REPOS = 200   # a first index of more repos than this is spread over processes (one per CPU)


def _inspect_all(targets: list[tuple[str, str]], signature: _Signature) -> list[dict]:
    """Rows for (repo id, folder) pairs. Inspecting reads a few files per repo and is CPU-bound in Python, so a big
    batch (a first index of 10,000 repos) goes to a process pool; a few repos (every later `list`) stay in this
    process, which then never imports multiprocessing."""
    workers = min(os.cpu_count() or 1, len(targets) // (PARALLEL_MIN_REPOS // 2))
    if workers < 2 or len(targets) < PARALLEL_MIN_REPOS:
        return [inspect(repo_id, Path(path), signature) for repo_id, path in targets]
    import multiprocessing  # lazy: keeps `mlxk list` light
    from concurrent.futures import ProcessPoolExecutor  # lazy: keeps `mlxk list` light

    # fork is cheap and safe only where no other thread can hold a lock the child inherits (Linux, one thread);
    # elsewhere (macOS, a worker's threads) spawn.
    method = "fork" if sys.platform.startswith("linux") and threading.active_count() == 1 else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        return list(pool.map(_inspect_pair, targets, chunksize=max(1, len(targets) // (workers * 8))))


def _inspect_pair(target: tuple[str, str]) -> dict:
    repo_id, path = target
    return inspect(repo_id, Path(path))


def _repos_on_disk(cache_dir: Path, scope: set[str] | None) -> dict[str, str]:
    """repo id → its folder's name in the cache, as plain strings: 1,000 Path objects would cost `list` more than the
    scandir itself."""
    if scope is None:
        return {repo_id: entry.name for repo_id, entry in cache.iter_repo_dirs(cache_dir)}
    found = {}
    for repo_id in scope:
        path = cache.repo_dir(cache_dir, repo_id)
        if path.is_dir():
            found[repo_id] = path.name
    return found


def _changed(cache_dir: Path, on_disk: dict[str, str], known: dict[str, tuple]) -> list[str]:
    """The indexed repos whose fingerprint moved: four stats each, relative to the open cache (the whole of a warm
    `list`'s disk work). A repo with snapshot subfolders never matches the four stats alone (its stored token has
    their lines too), so only it pays the second call that stats them as well."""
    fingerprint = cache.fingerprint
    subdirs = cache.stamped_subdirs
    with cache.open_dir(cache_dir) as fd:
        if fd is None:
            return [repo_id for repo_id, name in on_disk.items() if repo_id in known
                    and fingerprint(os.path.join(cache_dir, name), known[repo_id][1]) != known[repo_id][0]
                    and fingerprint(os.path.join(cache_dir, name), known[repo_id][1],
                                    subdirs=subdirs(known[repo_id][0])) != known[repo_id][0]]
        return [repo_id for repo_id, name in on_disk.items() if repo_id in known
                and fingerprint(name, known[repo_id][1], dir_fd=fd) != known[repo_id][0]
                and fingerprint(name, known[repo_id][1], dir_fd=fd, subdirs=subdirs(known[repo_id][0]))
                != known[repo_id][0]]


class _Signature:
    """mlx_lm_signature(), computed at most once per refresh and only when needed (importlib.metadata is ~25 ms)."""

    def __init__(self):
        self._value: str | None = None

    def __str__(self) -> str:
        if self._value is None:
            from mlxk.health import mlx_lm_signature

            self._value = mlx_lm_signature()
        return self._value


def _mlx_lm_stamp() -> str:
    """Where mlx-lm is installed and when its files last changed: a 0.1 ms stand-in for the signature."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.origin:
        return "absent"
    try:
        return f"{spec.origin}:{os.stat(spec.origin).st_mtime_ns}"
    except OSError:
        return "absent"


def _stamp_holds(stamp: str | None) -> bool:
    """Is the mlx-lm this stamp names still there, unchanged? One stat instead of a find_spec (~1.5 ms of `list`).

    An "absent" stamp never holds: only find_spec can tell that mlx-lm has been installed since."""
    origin, _, mtime = (stamp or "").rpartition(":")
    try:
        return bool(origin) and os.stat(origin).st_mtime_ns == int(mtime)
    except (OSError, ValueError):
        return False


def _forget_stale_verdicts(conn, signature: _Signature) -> None:
    """When mlx-lm was installed, upgraded or removed, verdicts made with the old one go back to pending."""
    stored = queries.get_meta(conn, STAMP_KEY)
    if _stamp_holds(stored):
        return
    stamp = _mlx_lm_stamp()
    if stored == stamp:
        return
    current = str(signature)
    if queries.get_meta(conn, SIGNATURE_KEY) != current:
        cleared = queries.clear_stale_runtime(conn, current)
        if cleared:
            _log().info("mlx-lm is now %s: %d runtime verdicts are pending again", current, cleared)
        queries.set_meta(conn, SIGNATURE_KEY, current)
    queries.set_meta(conn, STAMP_KEY, stamp)


def provisional_verdicts(conn, repo_ids) -> dict[str, tuple[bool, str | None]]:
    """(runtime_compatible, reason) for repos still pending mlx-lm's check, from its registry as read from its files
    (mlxk.registry, no import), so every `--json` model object says true or false, as mlx-knife's API promises, on
    the first `list` after a repo appears. The stored verdict (worker scan, `health`) imports the module itself and
    replaces this one."""
    if not repo_ids:
        return {}
    from mlxk import registry  # lazy: keeps `mlxk list` light

    found = _registry(conn)
    verdicts = {}
    for repo_id, snapshot in queries.snapshot_paths(conn, repo_ids).items():
        config, _ = _read_config(Path(snapshot) if snapshot else None)
        verdicts[repo_id] = registry.verdict(found, config if isinstance(config, dict) else None)
    return verdicts


def _registry(conn) -> dict | None:
    """The installed mlx-lm's registry, from state.db while the install is unchanged, else read and kept there."""
    stored = queries.get_meta(conn, REGISTRY_KEY)
    if stored:
        kept = json.loads(stored)
        if _stamp_holds(kept.get("stamp")):
            return kept.get("registry")
    from mlxk import registry  # lazy: keeps `mlxk list` light

    stamp = _mlx_lm_stamp()
    found = registry.read(stamp.rpartition(":")[0] if stamp != "absent" else None)
    queries.set_meta(conn, REGISTRY_KEY, json.dumps({"stamp": stamp, "registry": found}))
    return found


def _runtime_targets(conn, pending: list[str], scope: set[str] | None, force: bool) -> list[str]:
    candidates = queries.healthy_ids(conn) if force else pending
    return [repo_id for repo_id in candidates if scope is None or repo_id in scope]


# ---------------------------------------------------------------------------------------------------------------
# Inspecting one repo


def _now() -> str:
    return iso_utc(time.time())


def inspect(repo_id: str, path: Path, signature: _Signature | None = None) -> dict:
    """A full `models` row for one repo: integrity, detection, sizes; the runtime verdict when it needs no mlx-lm."""
    signature = signature or _Signature()
    # The fingerprint is taken BEFORE reading (listing the snapshots included), so a change made while we read shows
    # up as a change next time.
    stamp = cache.fingerprint(path, None)
    try:
        revisions = cache.list_revisions(path)
        revision = cache.current_revision(path, revisions)
        stamp = cache.extend_fingerprint(stamp, path, revision) + cache.subdir_stamp(path, revision)
        return _inspect(repo_id, path, stamp, signature, revisions, revision)
    except OSError as error:
        # An unreadable folder or file is a verdict about the repo, not a reason for `list` to fail.
        _log().warning("cannot read %s: %s", path, error)
        return _unreadable(repo_id, path, stamp, error)


def _inspect(repo_id: str, path: Path, stamp: str, signature: _Signature, revisions: list[str],
             revision: str | None) -> dict:
    from mlxk import health  # lazy: keeps `mlxk list` light
    from mlxk.detect import detect  # lazy: keeps `mlxk list` light

    view = health.inspect_repo(repo_id, path, revisions=revisions, revision=revision)
    findings = health.check_integrity(view)
    detection = detect(view)
    usage = cache.disk_usage(path)
    healthy = not findings
    record = {
        "repo_id": repo_id,
        "revision": view.revision,
        "revisions": view.revisions,
        "snapshot_path": str(view.snapshot) if view.snapshot else None,
        # mlx-knife's size_bytes: the files of the current snapshot (else, with no snapshot, the repo's bytes)
        "size_bytes": _snapshot_bytes(view) if view.snapshot else usage.size_bytes + usage.incomplete_bytes,
        # what the repo takes on disk: every revision's blobs once, partial downloads included
        "disk_bytes": usage.size_bytes + usage.incomplete_bytes,
        "reclaimable_bytes": usage.incomplete_bytes if healthy else 0,
        "last_modified": iso_utc(cache.last_modified(path, view.revision)),
        "framework": detection.framework,
        "model_type": detection.model_type,
        "architecture": detection.architecture,
        "capabilities": list(detection.capabilities or []),
        "context_length": detection.context_length,
        "quantization": detection.quantization,
        "quantization_config": detection.quantization_config,
        "health": "healthy" if healthy else "unhealthy",
        "runtime_compatible": None,
        "reason": findings[0].message if findings else None,
        "fingerprint": stamp,
        "checked_at": _now(),
        "runtime_fingerprint": None,
        "runtime_checked_at": None,
    }
    if healthy:
        # Framework and weight-name rules need no mlx-lm: settle them now so GGUF/PyTorch never show as pending.
        for rule in (health.check_framework, health.check_legacy_weights):
            finding = rule(view, detection)
            if finding:
                record.update(runtime_compatible=False, reason=finding.message,
                              runtime_fingerprint=f"{stamp}|{signature}", runtime_checked_at=record["checked_at"])
                break
    return record


def changed_in_place(row: dict, *, mtimes: bool = True) -> bool:
    """Has a file of the row's snapshot been edited in place since it was inspected (truncated, appended, rewritten
    without a rename)? The fingerprint cannot see that (no folder changes), and one stat per file of every repo would
    cost `list` too much, so this is for one repo at a time (`show NAME`, the runtime check): the snapshot's bytes
    differ from the row's `size_bytes`, or (with `mtimes`) a file's mtime is at least a second past the second the
    row was inspected in (checked_at has whole seconds; an edit of the same size within that second goes unseen
    until `mlxk health`). A workspace row or one without a snapshot: False."""
    if row.get("display_name") is not None or not row.get("snapshot_path") or not row.get("checked_at"):
        return False
    checked = parse_iso(row["checked_at"])
    seen: dict[tuple[int, int], int] = {}
    newest = 0.0
    for root, _dirs, names in os.walk(row["snapshot_path"]):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue   # a dangling link: inspection counted it as 0 bytes too
            seen[(st.st_dev, st.st_ino)] = st.st_size
            newest = max(newest, st.st_mtime)
    return sum(seen.values()) != row["size_bytes"] or (mtimes and newest >= checked + 1)


def _snapshot_bytes(view) -> int:
    """Bytes of the files the snapshot links to, each blob once."""
    blobs = {}
    for entry in view.files:
        blobs[str(entry.target or entry.path)] = entry.size or 0
    return sum(blobs.values())


def _unreadable(repo_id: str, path: Path, stamp: str, error: OSError) -> dict:
    where = error.filename or path
    return {
        "repo_id": repo_id, "revision": None, "revisions": [], "snapshot_path": None, "size_bytes": 0, "disk_bytes": 0,
        "reclaimable_bytes": 0, "last_modified": None, "framework": "unknown", "model_type": None,
        "architecture": None, "capabilities": [], "context_length": None, "quantization": None,
        "quantization_config": None, "health": "unhealthy", "runtime_compatible": None,
        "reason": f"cannot read {where}: {error.strerror or error}; check its permissions",
        "fingerprint": stamp, "checked_at": _now(), "runtime_fingerprint": None, "runtime_checked_at": None,
    }


def _check_runtime(conn, cache_dir: Path, repo_ids: list[str], signature: _Signature) -> list[str]:
    """mlx-lm's verdict for each repo, stored against the fingerprint the repo had when we looked."""
    if not repo_ids:
        return []
    from mlxk import health  # lazy: keeps `mlxk list` light
    from mlxk.detect import detect  # lazy: keeps `mlxk list` light
    from mlxk.faults import checkpoint  # lazy: keeps `mlxk list` light

    verdicts, edited = [], []
    for repo_id in repo_ids:
        row = queries.get_model(conn, repo_id)
        if row is None or row["health"] != "healthy":
            continue
        path = cache.repo_dir(cache_dir, repo_id)
        if cache.fingerprint(path, row["revision"], subdirs=cache.stamped_subdirs(row["fingerprint"])) \
                != row["fingerprint"]:
            continue  # changed since it was inspected; the next refresh re-inspects it first
        if changed_in_place(row, mtimes=False):
            # A file was edited in place after the row was made: mlx-lm's complaint would be about files the row
            # does not describe (a "healthy" repo whose weights "exceed the file"), so inspect it again instead.
            edited.append(inspect(repo_id, path, signature))
            continue
        view = health.inspect_repo(repo_id, path)
        finding = health.check_runtime(view, detect(view))
        verdicts.append({
            "repo_id": repo_id, "fingerprint": row["fingerprint"], "runtime_compatible": finding is None,
            "reason": finding.message if finding else None,
            "runtime_fingerprint": f"{row['fingerprint']}|{signature}", "runtime_checked_at": _now(),
        })
    checkpoint("index.runtime_checked")   # tests: stop a worker whose task thread has just run mlx-lm
    if edited:
        _log().info("index: %d edited in place, inspected again", len(edited))
        queries.sync_models(conn, upserts=edited, deletes=[])
    queries.set_runtime_verdicts(conn, verdicts)
    return [v["repo_id"] for v in verdicts]


# ---------------------------------------------------------------------------------------------------------------
# Reading the index


def rows(conn, columns=queries.COLUMNS) -> list[dict]:
    """Every row, each with `aliases`: the other names it has (Ollama's /api/copy), sorted."""
    found = queries.all_models(conn, columns)
    by_repo: dict[str, list[str]] = {}
    for alias, repo_id in sorted(queries.aliases(conn).items()):
        by_repo.setdefault(repo_id, []).append(alias)
    for row in found:
        row["aliases"] = by_repo.get(row["repo_id"], [])
    return found


def is_pending(row: dict) -> bool:
    return row["health"] == "healthy" and row["runtime_compatible"] is None


def disk_total(rows) -> int:
    """Bytes on disk of these models together: every revision and partial file of each repo (`disk_bytes`; blobs
    shared between revisions counted once)."""
    return sum(row["disk_bytes"] or 0 for row in rows)


def is_runnable_chat(row: dict) -> bool:
    """The default `list` view: healthy MLX chat models not known to be incompatible (pending ones included)."""
    return (row["health"] == "healthy" and row["framework"] == "mlx" and row["model_type"] == "chat"
            and row["runtime_compatible"] is not False)


def model_object(row: dict) -> dict:
    """The JSON model object: mlx-knife 2.0.8's fields first, with its spellings, then mlxk's own.

    `runtime_compatible` is false when integrity failed (as mlx-knife says) and null while the check is pending.
    """
    healthy = row["health"] == "healthy"
    return {
        "name": row["repo_id"],
        "hash": row["revision"],
        "size_bytes": row["size_bytes"],
        "last_modified": row["last_modified"],
        "framework": FRAMEWORK_LABELS.get(row["framework"] or "unknown", row["framework"]),
        "model_type": row["model_type"],
        "capabilities": row["capabilities"],
        "health": row["health"],
        "runtime_compatible": row["runtime_compatible"] if healthy else False,
        "reason": row["reason"],
        "cached": True,
        # mlx-knife's workspace fields: null for a cache model
        "origin": None, "content_hash": None, "hash_modified": None, "clean": None, "display_name": None,
        "quantization": row["quantization_config"],
        "context_length": row["context_length"],
        "revision": row["revision"],
        "revisions": row["revisions"],
        "quantization_label": row["quantization"],
        "architecture": row["architecture"],
        "reclaimable_bytes": row["reclaimable_bytes"],
        "aliases": row.get("aliases") or [],
        "disk_bytes": row["disk_bytes"],
        "runtime_pending": healthy and row["runtime_compatible"] is None,
    }


def _model_object_sql(*, aliases: bool = True) -> str:
    """model_object() as an SQLite JSON expression over a `models` row, for `list --json`.

    With 1,000s of repos, reading rows into dicts, building model objects and encoding them costs `list` ~15 ms of
    its ~100 ms budget; SQLite's json_object() renders the same objects in ~3 ms and `list` embeds the text as is.
    tests/test_index.py holds the two renderings equal for every health and runtime state.
    """
    labels = " ".join(f"WHEN '{key}' THEN '{label}'" for key, label in FRAMEWORK_LABELS.items())
    fields = {
        "name": "repo_id",
        "hash": "revision",
        "size_bytes": "size_bytes",
        "last_modified": "last_modified",
        "framework": f"CASE coalesce(nullif(framework, ''), 'unknown') {labels} ELSE framework END",
        "model_type": "model_type",
        "capabilities": "json(coalesce(nullif(capabilities, ''), '[]'))",
        "health": "health",
        "runtime_compatible": "json(CASE WHEN health != 'healthy' OR health IS NULL THEN 'false' "
                              "WHEN runtime_compatible IS NULL THEN 'null' "
                              "WHEN runtime_compatible THEN 'true' ELSE 'false' END)",
        "reason": "reason",
        "cached": "json('true')",
        "origin": "NULL", "content_hash": "NULL", "hash_modified": "NULL", "clean": "NULL", "display_name": "NULL",
        "quantization": "json(nullif(quantization_config, ''))",
        "context_length": "context_length",
        "revision": "revision",
        "revisions": "json(coalesce(nullif(revisions, ''), '[]'))",
        "quantization_label": "quantization",
        "architecture": "architecture",
        "reclaimable_bytes": "reclaimable_bytes",
        "aliases": ("json((SELECT json_group_array(name) FROM (SELECT name FROM aliases a "
                    "WHERE a.repo_id = models.repo_id ORDER BY name)))") if aliases else "json('[]')",
        "disk_bytes": "disk_bytes",
        "runtime_pending": f"json(CASE WHEN {queries.PENDING} THEN 'true' ELSE 'false' END)",
    }
    return "json_object(" + ", ".join(f"'{key}', {value}" for key, value in fields.items()) + ")"


MODEL_OBJECT_SQL = _model_object_sql()
MODEL_OBJECT_SQL_NO_ALIASES = _model_object_sql(aliases=False)  # the usual case: no per-row alias lookups


def listing(conn) -> list[dict]:
    """Every repo as {repo_id, size_bytes, last_modified, pending, object}: `object` is its model object as JSON text,
    the rest is what `list` sorts, filters and counts by. A pending repo's object carries its provisional verdict."""
    found = [{"repo_id": repo_id, "size_bytes": size, "last_modified": modified, "pending": bool(pending),
              "object": text}
             for repo_id, size, modified, pending, text in _model_objects(conn)]
    verdicts = provisional_verdicts(conn, [row["repo_id"] for row in found if row["pending"]])
    if verdicts:
        import json

        for row in found:
            if row["repo_id"] in verdicts:
                row["object"] = json.dumps(_with_verdict(json.loads(row["object"]), verdicts[row["repo_id"]]))
    return found


def _model_objects(conn) -> list[tuple]:
    """queries.model_objects with the stored objects where they hold: not for a repo with aliases (the stored object
    has none), nor when they were rendered by another mlxk (_render_objects renders them again on the next refresh)."""
    stale = "0" if queries.get_meta(conn, OBJECT_SQL_KEY) == MODEL_OBJECT_SQL_NO_ALIASES else "1"
    if not queries.has_aliases(conn):
        return queries.model_objects(conn, MODEL_OBJECT_SQL_NO_ALIASES, stored_unless=stale)
    return queries.model_objects(conn, MODEL_OBJECT_SQL, stored_unless=f"{stale} OR EXISTS (SELECT 1 FROM aliases a "
                                                                        "WHERE a.repo_id = models.repo_id)")


def _with_verdict(model: dict, verdict: tuple[bool, str | None]) -> dict:
    model["runtime_compatible"], model["reason"] = verdict
    model["runtime_pending"] = True   # mlxk's own: provisional until the worker's scan or `health` imports it
    return model


def model_objects(state_db: Path, found: list[dict]) -> list[dict]:
    """model_object() of rows read earlier (the server's catalog), pending verdicts made provisional as `list --json`
    makes them; state.db (where mlx-lm's registry is kept) is opened only when a row is pending."""
    pending = [row["repo_id"] for row in found if is_pending(row)]
    verdicts = {}
    if pending:
        from contextlib import closing

        from mlxk import db

        with closing(db.connect(state_db)) as conn:
            verdicts = provisional_verdicts(conn, pending)
    return [_with_verdict(model_object(row), verdicts[row["repo_id"]]) if row["repo_id"] in verdicts
            else model_object(row) for row in found]


def with_provisional_verdict(conn, model: dict) -> dict:
    """A model object whose runtime verdict is pending gets the provisional one (see provisional_verdicts)."""
    if model["health"] == "healthy" and model["runtime_compatible"] is None:
        _with_verdict(model, provisional_verdicts(conn, [model["name"]])[model["name"]])
    return model


# ---------------------------------------------------------------------------------------------------------------
# Opening the index for a command


@dataclass
class Loaded:
    conn: object               # sqlite3.Connection to state.db, or to a private copy when state.db is locked
    refresh: Refresh
    warning: str | None = None  # state.db was locked or read-only: this index lives in a temp dir, not kept

    def close(self) -> None:
        self.conn.close()


_PRIVATE_DIRS: list = []  # TemporaryDirectory objects of private indexes, removed at interpreter exit


def load(state_db: Path, cache_dir: Path, **refresh_options) -> Loaded:
    """Open state.db and refresh it; when it cannot be written (another process holds it locked, or MLXK_HOME is
    read-only), index the cache privately instead and say why in `warning`.

    A corrupt state.db is moved aside and rebuilt by db.connect; a locked or read-only one must not make `list` or
    `show` fail, because the HF cache, not state.db, is the source of truth.
    """
    try:
        conn = db.connect(state_db)
    except MlxkError as error:
        if error.details.get("reason") not in ("locked", "unwritable"):
            raise
        return _load_private(state_db, cache_dir, error, **refresh_options)
    try:
        return Loaded(conn, refresh(conn, cache_dir, **refresh_options))
    except sqlite3.OperationalError as error:
        conn.close()
        if db.failure_kind(error) not in ("locked", "unwritable"):
            raise
        return _load_private(state_db, cache_dir, db.unusable(state_db, error), **refresh_options)
    except BaseException:
        conn.close()
        raise


def _load_private(state_db: Path, cache_dir: Path, reason: MlxkError, **refresh_options) -> Loaded:
    import tempfile  # lazy: keeps `mlxk list` light

    warning = f"{reason.message} Read the HF cache directly, without the index; nothing was saved."
    _log().info("%s", warning)
    folder = tempfile.TemporaryDirectory(prefix="mlxk-index-")
    _PRIVATE_DIRS.append(folder)
    conn = db.connect(Path(folder.name) / "state.db")
    return Loaded(conn, refresh(conn, cache_dir, **refresh_options), warning=warning)


# ---------------------------------------------------------------------------------------------------------------
# Names → rows


def check_pattern(pattern: str) -> str:
    """A `list` filter is a case-insensitive substring of repo ids, as in mlx-knife (`1B-4bit`, `.2-1B`, `Llama 3`): it
    only filters, never names a path, so only what no repo id can hold is refused (control characters, overlength)."""
    from mlxk import names  # lazy: keeps `mlxk list` light

    if any(ord(ch) < 32 or ord(ch) == 127 for ch in pattern) or len(pattern) > names.MAX_REPO_ID_LENGTH:
        problem = "it contains control characters" if len(pattern) <= names.MAX_REPO_ID_LENGTH else \
            f"it is {len(pattern)} characters long; a repo id has at most {names.MAX_REPO_ID_LENGTH}"
        raise InvalidName(f"invalid model name pattern {pattern!r}: {problem}. A pattern is a piece of a repo id, "
                          "like 'qwen' or '-4bit'.", name=pattern)
    return pattern


def matches(row: dict, pattern: str | None) -> bool:
    return not pattern or pattern.lower() in row["repo_id"].lower()


@dataclass
class Resolved:
    row: dict
    revision: str | None       # the snapshot the name points at (the current one unless `@rev` said otherwise)


def resolve(conn, ref) -> Resolved:
    """The one indexed repo (and snapshot) a parsed name (mlxk.names.ModelRef) means; raises names' errors.

    The name is matched against the ids alone and only the chosen row is read: decoding 1,000s of rows for one name
    would cost `show` and `health NAME` more than the rest of their work."""
    from mlxk import names  # lazy: keeps `mlxk list` light

    while True:
        aliases = queries.aliases(conn)
        row = queries.get_model(conn, names.resolve(ref.repo, queries.model_ids(conn), aliases))
        if row is not None:  # None: another process removed it between the two reads, so the ids are stale
            row["aliases"] = sorted(a for a, repo_id in aliases.items() if repo_id == row["repo_id"])
            return _at_revision(row, ref)


def add_alias(conn, source, destination: str) -> dict:
    """Give the cached model `source` (a parsed name) another name, `destination` (Ollama's /api/copy): kept in
    state.db, resolved by mlxk.names.resolve before any other rule, shown by `list`. An alias names a model (its
    current revision), so `destination` takes no '@revision'; it may not be a cached repo's own id (InvalidName).
    Nor may it be a name that already means a cached model by names.resolve's other rules (a short name like
    `tiny-random`, a substring like `qwen3`, even one that matches several): the alias, resolved first, would
    silently send that name elsewhere, so it is refused (Conflict, 409, naming the model(s) it would shadow). An
    existing alias is overwritten (Ollama's copy overwrites a copy)."""
    from mlxk import names  # lazy: keeps `mlxk list` light

    row = resolve(conn, source).row
    ref = names.parse(destination)
    if ref.revision:
        raise InvalidName(f"invalid alias {destination!r}: an alias names a model, not a revision; leave out "
                          f"'@{ref.revision}' (or the commit tag)", name=destination)
    key = names.alias_key(destination)
    ids = queries.model_ids(conn)
    if any(repo_id.lower() == key for repo_id in ids):
        raise InvalidName(f"invalid alias {destination!r}: it is already the name of a cached model", name=destination)
    if key not in queries.aliases(conn):
        try:
            shadowed = [names.resolve(key, ids)]
        except AmbiguousMatch as error:
            shadowed = error.details.get("matches") or []
        except ModelNotFound:
            shadowed = []
        if shadowed:
            raise Conflict(f"alias {destination!r} would shadow {', '.join(shadowed[:5])}: {destination!r} already "
                           f"means {'that model' if len(shadowed) == 1 else 'those models'} (a short name or part "
                           "of the name), and an alias would silently send it elsewhere. Pick a name that matches "
                           "no cached model.", name=destination, matches=shadowed)
    queries.set_alias(conn, name=key, repo_id=row["repo_id"], created_at=iso_utc(time.time()))
    return {"alias": key, "repo_id": row["repo_id"]}


def remove_alias(conn, name: str) -> bool:
    """Forget the alias `name` (the model it names stays); False when `name` is no alias."""
    from mlxk import names  # lazy: keeps `mlxk list` light

    return queries.delete_alias(conn, name=names.alias_key(name))


def resolve_in(all_rows: list[dict], ref) -> Resolved:
    """`resolve` over rows already read (the server keeps them for a moment across a burst of requests)."""
    from mlxk import names  # lazy: keeps `mlxk list` light

    by_id = {row["repo_id"]: row for row in all_rows}
    aliases = {alias: row["repo_id"] for row in all_rows for alias in row.get("aliases") or []}
    return _at_revision(by_id[names.resolve(ref.repo, list(by_id), aliases)], ref)


def _at_revision(row: dict, ref) -> Resolved:
    """The snapshot of a resolved repo that `ref` names: the current one, or the commit or ref after its '@'."""
    from mlxk import names  # lazy: keeps `mlxk list` light

    if not ref.revision:
        return Resolved(row, row["revision"])
    repo_path = Path(row["snapshot_path"]).parent.parent if row["snapshot_path"] else None
    refs = cache.refs(repo_path) if repo_path is not None else {}
    return Resolved(row, names.pick_revision(row["repo_id"], ref.revision, row["revisions"] or [], refs))


# ---------------------------------------------------------------------------------------------------------------
# `health`: check now


def check_health(state_db: Path, cache_dir: Path, ref=None) -> tuple[Loaded, list[dict]]:
    """Re-inspect and runtime-check one repo (a parsed name) or all, write the verdicts, return the rows.

    Every repo is inspected once: all of them in one forced refresh, or, for a name, the index is refreshed first
    (the name may be new to it) and the named repo is inspected again only if that refresh did not just do it."""
    loaded = load(state_db, cache_dir, runtime=ref is None, force=ref is None)
    try:
        if ref is None:
            checked = rows(loaded.conn)
        else:
            repo_id = resolve(loaded.conn, ref).row["repo_id"]
            # A repo that refresh just (re-)inspected needs only the runtime check it left pending: a verdict it
            # already settled (framework, weight names) is the one check_runtime would give again.
            fresh = repo_id in loaded.refresh.added or repo_id in loaded.refresh.changed
            refresh(loaded.conn, cache_dir, runtime=True, repos={repo_id}, force=not fresh)
            checked = [row for row in [queries.get_model(loaded.conn, repo_id)] if row is not None]
    except BaseException:
        loaded.close()
        raise
    return loaded, checked


def verdict(row: dict) -> str:
    """healthy | unhealthy | not_runnable | pending: one word per repo for tables and summaries."""
    if row["health"] != "healthy":
        return "unhealthy"
    if row["runtime_compatible"] is None:
        return "pending"
    return "healthy" if row["runtime_compatible"] else "not_runnable"


def summarize(checked: list[dict]) -> dict:
    counts = {"total": len(checked), "healthy": 0, "unhealthy": 0, "not_runnable": 0, "pending": 0}
    for row in checked:
        counts[verdict(row)] += 1
    return counts


def health_report(checked: list[dict], summary: dict) -> dict:
    """`health --json` data: mlx-knife's `healthy[]`, `unhealthy[]` (integrity) and counts, then mlxk's own
    runtime-aware `models` and summary counts. An unhealthy model is a finding, not a failed command (exit 0)."""
    entries = {"healthy": [], "unhealthy": []}
    for row in checked:
        entries[row["health"]].append({
            "name": row["repo_id"], "status": row["health"], "reason": row["reason"] or "Model is healthy",
            "hash": row["revision"], "runtime_compatible": model_object(row)["runtime_compatible"],
            # mlx-knife 2.0.8 marks a workspace entry `cached: false, managed: false` (a folder mlxk does not manage)
            **({"cached": False, "managed": False} if row.get("display_name") is not None else {})})
    counts = {"total": len(checked), "healthy_count": len(entries["healthy"]),
              "unhealthy_count": len(entries["unhealthy"])}
    return {**entries, "summary": {**counts, **summary},
            "models": [workspace_object(row) if row.get("display_name") is not None else model_object(row)
                       for row in checked]}


# ---------------------------------------------------------------------------------------------------------------
# `show`: one repo in detail


def describe(resolved: Resolved, *, files: bool = False, config: bool = False) -> dict:
    """mlx-knife's `show` data: the model object of the snapshot the name selected (`NAME@HASH` describes that
    revision), `metadata` from its config.json, and on request its files or the config itself."""
    row = resolved.row
    snapshot = _snapshot_dir(row, resolved.revision)
    model = model_object(row)
    if resolved.revision and resolved.revision != row["revision"] and snapshot is not None:
        entries = cache.snapshot_files(snapshot)
        blobs = {(f.target or f.path): f.size or 0 for f in entries}
        model.update(hash=resolved.revision, revision=resolved.revision, size_bytes=sum(blobs.values()),
                     last_modified=iso_utc(cache.last_modified(snapshot.parent.parent, resolved.revision)))
    parsed, problem = _read_config(snapshot)
    detail = {"model": model, "metadata": _metadata(row, parsed if isinstance(parsed, dict) else None),
              "workspace_metadata": None, "revision": resolved.revision, "checked_at": row["checked_at"],
              "runtime_checked_at": row["runtime_checked_at"]}
    if files:
        detail["files"] = [_file_entry(f) for f in cache.snapshot_files(snapshot)] if snapshot else []
    if config:
        detail["config"], detail["config_error"] = parsed, problem
    return detail


def workspace(typed: str) -> dict:
    """A workspace folder (`./dir`) as a row model_object() renders (`cached: false`, `hash: null`, `name` the
    absolute path, `display_name` as typed): integrity, detection and the runtime check, read now (no index)."""
    from mlxk import health  # lazy: keeps `mlxk list` light
    from mlxk.detect import detect  # lazy: keeps `mlxk list` light

    path = Path(typed).expanduser().resolve()
    if not path.is_dir():
        raise ModelNotFound(f"workspace {typed!r} is not a folder ({path}).", name=typed)
    if not (path / "config.json").exists():   # never walk a folder that is no model (`show /`)
        raise ModelNotFound(f"workspace {typed!r} is not a model folder: {path} has no config.json.", name=typed)
    view = health.inspect_dir(path, str(path))
    findings = health.check_integrity(view)
    detection = detect(view)
    runtime = None if findings else health.check_runtime(view, detection)
    problem = (findings[0] if findings else runtime)
    return {"repo_id": str(path), "revision": None, "revisions": [], "snapshot_path": str(path),
            "size_bytes": sum(f.size or 0 for f in view.files), "disk_bytes": sum(f.size or 0 for f in view.files),
            "reclaimable_bytes": 0,
            "last_modified": iso_utc(path.stat().st_mtime), "framework": detection.framework,
            "model_type": detection.model_type, "architecture": detection.architecture,
            "capabilities": list(detection.capabilities or []), "context_length": detection.context_length,
            "quantization": detection.quantization, "quantization_config": detection.quantization_config,
            "health": "unhealthy" if findings else "healthy", "runtime_compatible": not findings and runtime is None,
            "reason": problem.message if problem else None, "checked_at": _now(), "runtime_checked_at": _now(),
            "display_name": typed}


def workspace_object(row: dict) -> dict:
    return {**model_object(row), "cached": False, "display_name": row["display_name"]}


def describe_workspace(row: dict, *, files: bool = False, config: bool = False) -> dict:
    """`show ./dir`: describe() for a workspace row (see workspace())."""
    detail = describe(Resolved(row, None), files=False, config=config)
    detail["model"] = workspace_object(row)
    detail["workspace_metadata"] = {}   # mlx-knife 2.0.8: an object for a workspace (null for a cached model)
    if files:
        detail["files"] = [_file_entry(f) for f in cache.snapshot_files(Path(row["snapshot_path"]))]
    return detail


METADATA_KEYS = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers")


def _metadata(row: dict, config: dict | None) -> dict | None:
    """mlx-knife's `show` metadata: the architecture, quantization label, context length and a few config numbers."""
    if config is None:
        return None
    from mlxk.detect import context_length, quantization  # lazy: keeps `mlxk list` light

    architectures = config.get("architectures")
    found = {"model_type": config.get("model_type"),
             "architecture": architectures[0] if isinstance(architectures, list) and architectures else None,
             "quantization": quantization(config), "context_length": context_length(config)}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for key in METADATA_KEYS:
        value = config.get(key, text.get(key))
        if isinstance(value, int) and not isinstance(value, bool):
            found[key] = value
    return found


def _snapshot_dir(row: dict, revision: str | None) -> Path | None:
    if row.get("display_name") is not None:   # a workspace: the folder itself
        return Path(row["snapshot_path"])
    if not row["snapshot_path"] or not revision:
        return None
    return Path(row["snapshot_path"]).parent / revision


def _file_entry(entry: cache.SnapshotFile) -> dict:
    """mlx-knife's file entry ({name, size, type}: a size for people, what the file is), then mlxk's exact fields."""
    blob = entry.target.name if entry.is_symlink and entry.target else ""
    return {
        "name": entry.name,
        "size": compact_size(entry.size),
        "type": file_kind(entry.name),
        "size_bytes": entry.size,
        # LFS blobs are named by their sha256 (64 hex), regular git files by their git blob sha1 (40 hex)
        "lfs": len(blob) == 64,
        "link_ok": entry.size is not None,
    }


def file_kind(name: str) -> str:
    """weights | tokenizer | config | other, as mlx-knife's `show --files` names them."""
    base = name.rsplit("/", 1)[-1].lower()
    if base.endswith((".safetensors", ".gguf", ".bin", ".npz", ".pt", ".pth")) and "index" not in base:
        return "weights"
    if base.startswith("tokenizer") and not base.endswith("_config.json") or base.endswith((".model", ".tiktoken")) \
            or base in ("vocab.json", "merges.txt"):
        return "tokenizer"
    if base.endswith((".json", ".jinja", ".yaml", ".yml")):
        return "config"
    return "other"


def _read_config(snapshot: Path | None) -> tuple[object, str | None]:
    if snapshot is None:
        return None, "the repo has no snapshot"
    try:
        return json.loads((snapshot / "config.json").read_bytes()), None
    except FileNotFoundError:
        return None, "config.json is missing"
    except OSError as error:
        return None, f"config.json cannot be read: {error.strerror or error}"
    except ValueError as error:
        return None, f"config.json is not valid JSON ({error})"
