"""Append-only, named schema migrations of state.db.

A name is never edited once released: change the schema by appending a new function. The registry is a plain list
so the `list` fast path can tell whether the schema is current without importing sqlite-utils (~90 ms).
"""
from __future__ import annotations

MIGRATIONS: list = []


def migration(fn):
    MIGRATIONS.append(fn)
    return fn


def names() -> list[str]:
    return [fn.__name__ for fn in MIGRATIONS]


@migration
def m001_models(db):
    db["models"].create(
        {
            "repo_id": str,
            "revision": str,           # what refs/main names, else the newest snapshot
            "revisions": str,          # JSON list of every cached snapshot hash, newest first
            "snapshot_path": str,
            "size_bytes": int,         # blobs counted once
            "reclaimable_bytes": int,  # leftover partial downloads beside a complete snapshot
            "last_modified": str,      # UTC ISO-8601
            "framework": str,          # mlx | gguf | pytorch | unknown
            "model_type": str,         # chat | base | embedding
            "architecture": str,       # config.json model_type (llama, qwen3, ...)
            "capabilities": str,       # JSON list
            "context_length": int,
            "quantization": str,
            "health": str,             # healthy | unhealthy
            "runtime_compatible": int,  # 1 | 0 | NULL = not checked yet (pending)
            "reason": str,
            "fingerprint": str,        # stat fingerprint of what integrity checked
            "checked_at": str,
            "runtime_fingerprint": str,  # fingerprint the runtime verdict belongs to
            "runtime_checked_at": str,
        },
        pk="repo_id",
    )


@migration
def m002_jobs(db):
    db["jobs"].create(
        {
            "id": str,
            "kind": str,               # pull | rm | clone | push | scan
            "target": str,             # repo id (or workspace for push)
            "args": str,               # JSON
            "state": str,              # queued | running | succeeded | failed | cancelled
            "bytes_done": int,
            "bytes_total": int,
            "files_done": int,
            "files_total": int,
            "rate": float,             # bytes per second
            "eta": float,              # seconds
            "message": str,
            "error": str,              # JSON {"type", "message"}
            "result": str,             # JSON
            "attempts": int,
            "cancel_requested": int,
            "task_id": str,            # the Huey task id
            "worker": str,             # id of the worker holding it
            "created_at": str,
            "started_at": str,
            "finished_at": str,
            "updated_at": str,
        },
        pk="id",
        defaults={"state": "queued", "attempts": 0, "cancel_requested": 0,
                  "bytes_done": 0, "files_done": 0},
    )
    db["jobs"].create_index(["state"])
    db["jobs"].create_index(["target", "kind"])
    db["jobs"].create_index(["created_at"])


@migration
def m003_workers(db):
    db["workers"].create(
        {
            "id": str,                 # host:pid:start
            "kind": str,               # queue | inference | api
            "pid": int,
            "host": str,
            "started_at": str,
            "heartbeat_at": str,
            "heartbeat_ts": float,     # unix seconds, for cheap liveness checks
        },
        pk="id",
    )


@migration
def m004_meta(db):
    db["meta"].create({"key": str, "value": str}, pk="key")


@migration
def m005_job_settings(db):
    # The Hub endpoint and cache directory of the command that queued the job (JSON); never a secret.
    db["jobs"].add_column("settings", str)


@migration
def m006_responses(db):
    # OpenAI Responses API objects kept for GET /v1/responses/{id} and previous_response_id (store: true).
    db["responses"].create(
        {
            "id": str,                 # resp_…
            "created_at": float,       # unix seconds
            "model": str,              # the resolved repo id
            "body": str,               # JSON: the Response object as answered
            "messages": str,           # JSON: the conversation as chat messages, its output included
        },
        pk="id",
    )
    db["responses"].create_index(["created_at"])


@migration
def m007_aliases(db):
    # Other names for cached models (Ollama's /api/copy): `name` as mlxk.names.parse normalizes it, lowercased.
    db["aliases"].create({"name": str, "repo_id": str, "created_at": str}, pk="name")
    db["aliases"].create_index(["repo_id"])


@migration
def m008_mlx_knife_fields(db):
    # mlx-knife's model object: quantization as the config's settings (JSON; the label stays in `quantization`), and
    # size_bytes of the current snapshot alone; what the repo takes on disk (every revision, partial files) moves to
    # disk_bytes. Every repo is inspected again (fingerprint cleared) so the new columns are filled on the next refresh.
    db["models"].add_column("quantization_config", str)
    db["models"].add_column("disk_bytes", int)
    db.execute("UPDATE models SET fingerprint = NULL")


@migration
def m009_model_object(db):
    # `list --json` at 10,000 repos: each row's model object (mlxk.index.MODEL_OBJECT_SQL_NO_ALIASES) kept as JSON
    # text, rendered once after a write instead of by SQLite on every read (~30 ms of a 10,000-repo `list`). Any
    # UPDATE that does not set `object` itself clears it (the trigger), whoever writes, so a stale object is never
    # read: a NULL one is rendered on read, and mlxk.index renders the cleared ones (found by the partial index).
    db["models"].add_column("object", str)
    db.execute("CREATE INDEX models_unrendered ON models (repo_id) WHERE object IS NULL")
    # With objects inline, a row is ~1 KB: the queries every `list` runs read these small indexes instead of the rows
    # (db.models.freshness, and pending_runtime with its condition, db.models.PENDING).
    db.execute("CREATE INDEX models_freshness ON models (repo_id, fingerprint, revision)")
    db.execute("CREATE INDEX models_pending ON models (repo_id) "
               "WHERE health = 'healthy' AND runtime_compatible IS NULL")
    db.execute("CREATE TRIGGER models_object_stale AFTER UPDATE ON models WHEN NEW.object IS OLD.object "
               "BEGIN UPDATE models SET object = NULL WHERE repo_id = NEW.repo_id; END")


@migration
def m010_workspaces(db):
    # Workspace folders the user ran (`mlxk run ./dir`): the absolute path, registered by the CLI, and the opaque id
    # the server resolves (`workspace:<hex>`). The server never takes a folder path from a request; it loads only a
    # folder registered here. One id per path (re-registering reuses it).
    db["workspaces"].create({"id": str, "path": str, "registered_at": str}, pk="id")
    db["workspaces"].create_index(["path"], unique=True)
