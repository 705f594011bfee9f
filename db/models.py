"""Named queries on the `models` table (one row per cached repo).

Functions take a connection from mlxk.db.connect and return plain dicts with JSON columns decoded; every write goes
through mlxk.db.write.
"""
from __future__ import annotations

import json
import sqlite3

from mlxk.db import write

COLUMNS = (
    "repo_id", "revision", "revisions", "snapshot_path", "size_bytes", "disk_bytes", "reclaimable_bytes",
    "last_modified",
    "framework", "model_type", "architecture", "capabilities", "context_length", "quantization", "quantization_config", "health",
    "runtime_compatible", "reason", "fingerprint", "checked_at", "runtime_fingerprint", "runtime_checked_at",
)
_JSON_COLUMNS = ("revisions", "capabilities")
_JSON_OR_NULL = ("quantization_config",)
# healthy, runtime verdict not known yet (mlxk.index.is_pending says the same of a decoded row)
PENDING = "health = 'healthy' AND runtime_compatible IS NULL"


def _conn(db) -> sqlite3.Connection:
    return getattr(db, "conn", db)


def _decode(row: sqlite3.Row | tuple, names) -> dict:
    record = dict(zip(names, row))
    for column in _JSON_COLUMNS:
        if column in record:
            record[column] = json.loads(record[column]) if record[column] else []
    for column in _JSON_OR_NULL:
        if record.get(column):
            record[column] = json.loads(record[column])
    if record.get("runtime_compatible") is not None:
        record["runtime_compatible"] = bool(record["runtime_compatible"])
    return record


def _select(db, where: str = "", params=(), columns=COLUMNS) -> list[dict]:
    cursor = _conn(db).execute(f"SELECT {', '.join(columns)} FROM models {where}", params)
    return [_decode(tuple(row), columns) for row in cursor.fetchall()]


def all_models(db, columns=COLUMNS) -> list[dict]:
    """Every row by repo id; `columns` (a subset of COLUMNS) skips decoding what the caller never reads."""
    return _select(db, "ORDER BY repo_id", columns=columns)


def model_objects(db, expression: str, *, stored_unless: str = "0") -> list[tuple]:
    """(repo_id, size_bytes, last_modified, pending, model object as JSON text) per row, by repo id: the stored
    `object` (see render_objects), else `expression` renders the row (mlxk.index.MODEL_OBJECT_SQL); `stored_unless`:
    an SQL condition under which a row is rendered even so (it has aliases, which the stored object leaves out)."""
    cursor = _conn(db).cursor()
    cursor.row_factory = None
    return cursor.execute(
        f"SELECT repo_id, size_bytes, last_modified, {PENDING}, "
        f"CASE WHEN object IS NULL OR {stored_unless} THEN {expression} ELSE object END "
        f"FROM models ORDER BY repo_id").fetchall()


def render_objects(db, expression: str, *, everything: bool = False) -> int:
    """Store `expression` (a row's model object as JSON, mlxk.index.MODEL_OBJECT_SQL_NO_ALIASES) in `object` where
    a write cleared it (m009's trigger), or in every row; how many rows it rendered. Writes only when some row needs
    it, so a `list` of an unchanged cache stays read-only."""
    conn = _conn(db)
    if not everything and conn.execute("SELECT 1 FROM models WHERE object IS NULL LIMIT 1").fetchone() is None:
        return 0
    with write(conn):
        if everything:   # cleared first: an UPDATE that left `object` as it was would have the trigger clear it
            conn.execute("UPDATE models SET object = NULL")
        return conn.execute(f"UPDATE models SET object = {expression} WHERE object IS NULL").rowcount


def get_model(db, repo_id: str) -> dict | None:
    rows = _select(db, "WHERE repo_id = ?", (repo_id,))
    return rows[0] if rows else None


def snapshot_paths(db, repo_ids) -> dict[str, str | None]:
    """repo id → snapshot_path, for those of `repo_ids` that are indexed: one query for any number of ids (json_each
    carries them), where a get_model per repo would decode 10,000 rows on a first `list`."""
    cursor = _conn(db).cursor()
    cursor.row_factory = None
    return dict(cursor.execute("SELECT repo_id, snapshot_path FROM models WHERE repo_id IN (SELECT value FROM "
                               "json_each(?))", (json.dumps(list(repo_ids)),)))


def model_ids(db) -> list[str]:
    """Every repo id, sorted: what a name resolves against, without decoding any row."""
    return [row[0] for row in _conn(db).execute("SELECT repo_id FROM models ORDER BY repo_id")]


def aliases(db) -> dict[str, str]:
    """Every alias (its normalized, lowercased name) and the repo id it names."""
    return dict(_conn(db).execute("SELECT name, repo_id FROM aliases"))


def has_aliases(db) -> bool:
    return _conn(db).execute("SELECT 1 FROM aliases LIMIT 1").fetchone() is not None


def set_alias(db, *, name: str, repo_id: str, created_at: str) -> None:
    """Point the alias `name` at `repo_id` (an existing alias is moved, as Ollama's copy overwrites)."""
    conn = _conn(db)
    with write(conn):
        conn.execute("INSERT INTO aliases (name, repo_id, created_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE "
                     "SET repo_id = excluded.repo_id, created_at = excluded.created_at", (name, repo_id, created_at))


def delete_alias(db, *, name: str) -> bool:
    conn = _conn(db)
    with write(conn):
        return conn.execute("DELETE FROM aliases WHERE name = ?", (name,)).rowcount > 0


def workspace_id(db, *, path: str, new_id: str, registered_at: str) -> str:
    """The id of the workspace folder `path` (absolute), registering it under `new_id` if it is not yet known."""
    conn = _conn(db)
    with write(conn):
        conn.execute("INSERT INTO workspaces (id, path, registered_at) VALUES (?, ?, ?) ON CONFLICT(path) DO NOTHING",
                     (new_id, path, registered_at))
        return conn.execute("SELECT id FROM workspaces WHERE path = ?", (path,)).fetchone()[0]


def workspace_path(db, workspace_id: str) -> str | None:
    """The folder registered as `workspace_id`, or None."""
    row = _conn(db).execute("SELECT path FROM workspaces WHERE id = ?", (workspace_id,)).fetchone()
    return row[0] if row else None


def healthy_ids(db) -> list[str]:
    """Repos whose files passed the integrity check, sorted."""
    return [row[0] for row in _conn(db).execute("SELECT repo_id FROM models WHERE health = 'healthy' ORDER BY repo_id")]


def _encode(record: dict) -> dict:
    row = {key: record[key] for key in COLUMNS if key in record}
    for column in _JSON_COLUMNS:
        if column in row and not isinstance(row[column], str) and row[column] is not None:
            row[column] = json.dumps(row[column])
    for column in _JSON_OR_NULL:
        if row.get(column) is not None and not isinstance(row[column], str):
            row[column] = json.dumps(row[column])
    if row.get("runtime_compatible") is not None:
        row["runtime_compatible"] = int(bool(row["runtime_compatible"]))
    return row


def upsert_models(db, records: list[dict]) -> None:
    """Insert or fully replace rows, in one transaction."""
    sync_models(db, upserts=records, deletes=[])


def upsert_model(db, **record) -> None:
    upsert_models(db, [record])


def delete_models(db, repo_ids: list[str]) -> None:
    sync_models(db, upserts=[], deletes=repo_ids)


def get_meta(db, key: str) -> str | None:
    row = _conn(db).execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(db, key: str, value: str) -> None:
    conn = _conn(db)
    with write(conn):
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


# ---------------------------------------------------------------- the index refresh (mlxk.index)

def freshness(db) -> dict[str, tuple[str | None, str | None]]:
    """repo_id → (fingerprint, revision): what the stat-based freshness check recomputes and compares."""
    cursor = _conn(db).cursor()
    cursor.row_factory = None   # plain tuples: a warm `list` reads this for every repo, and Row objects cost ~15 %
    return {repo_id: (stamp, revision)
            for repo_id, stamp, revision in cursor.execute("SELECT repo_id, fingerprint, revision FROM models")}


def sync_models(db, *, upserts: list[dict], deletes: list[str]) -> None:
    """Replace re-inspected rows and drop vanished repos in ONE transaction, so a reader never sees half a refresh."""
    if not upserts and not deletes:
        return
    conn = _conn(db)
    rows = [_encode(record) for record in upserts]
    with write(conn):
        conn.executemany("DELETE FROM models WHERE repo_id = ?", [(repo_id,) for repo_id in deletes])
        for row in rows:
            names = list(row)
            conn.execute(
                f"INSERT OR REPLACE INTO models ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [row[name] for name in names],
            )


def pending_runtime(db) -> list[str]:
    """Healthy repos whose runtime verdict is not known yet (NULL)."""
    cursor = _conn(db).execute(
        f"SELECT repo_id FROM models WHERE {PENDING} ORDER BY repo_id")
    return [row[0] for row in cursor]


def set_runtime_verdicts(db, verdicts: list[dict]) -> int:
    """Store runtime verdicts (repo_id, fingerprint, runtime_compatible, reason, runtime_fingerprint,
    runtime_checked_at); a verdict whose fingerprint no longer matches the row (the repo changed meanwhile) is
    dropped. Returns how many rows took a verdict."""
    if not verdicts:
        return 0
    conn = _conn(db)
    params = [(None if v["runtime_compatible"] is None else int(bool(v["runtime_compatible"])), v["reason"],
               v["runtime_fingerprint"], v["runtime_checked_at"], v["repo_id"], v["fingerprint"]) for v in verdicts]
    with write(conn):
        # rowcount, not total_changes: that would count m009's trigger clearing the object too
        return conn.executemany(
            "UPDATE models SET runtime_compatible = ?, reason = ?, runtime_fingerprint = ?, runtime_checked_at = ? "
            "WHERE repo_id = ? AND fingerprint = ?", params).rowcount


def clear_stale_runtime(db, signature: str) -> int:
    """Forget runtime verdicts made for another fingerprint or another mlx-lm (`signature`): they become pending."""
    conn = _conn(db)
    stale = [row[0] for row in conn.execute(
        "SELECT repo_id FROM models WHERE runtime_fingerprint IS NOT NULL "
        "AND runtime_fingerprint != fingerprint || '|' || ?", (signature,))]
    if not stale:
        return 0
    with write(conn):
        conn.executemany(
            "UPDATE models SET runtime_compatible = NULL, runtime_fingerprint = NULL, runtime_checked_at = NULL, "
            "reason = CASE WHEN health = 'healthy' THEN NULL ELSE reason END WHERE repo_id = ?",
            [(repo_id,) for repo_id in stale])
    return len(stale)
