import sqlite3
import threading
from contextlib import closing

import pytest

from mlxk import db
from mlxk.db import migrations
from mlxk.db import models as model_queries
from mlxk.errors import StateError


def test_migrations_build_the_design_tables_in_memory():
    import sqlite_utils
    from sqlite_utils.migrations import Migrations

    memory = sqlite_utils.Database(memory=True)
    registry = Migrations("mlxk")
    for fn in migrations.MIGRATIONS:
        registry()(fn)
    registry.apply(memory)
    assert {"models", "jobs", "workers", "meta"} <= set(memory.table_names())
    columns = memory["models"].columns_dict
    for name in ("repo_id", "revision", "snapshot_path", "size_bytes", "last_modified", "framework", "model_type",
                 "capabilities", "context_length", "quantization", "health", "runtime_compatible", "reason",
                 "fingerprint", "checked_at"):
        assert name in columns
    jobs = memory["jobs"].columns_dict
    for name in ("id", "kind", "target", "args", "state", "bytes_done", "bytes_total", "files_done", "files_total",
                 "rate", "eta", "message", "error", "attempts", "created_at", "started_at", "finished_at", "worker"):
        assert name in jobs


def test_connect_is_wal_and_migrated_once(tmp_path):
    path = tmp_path / "state.db"
    first = db.connect(path)
    assert first.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    applied = [r[0] for r in first.execute("SELECT name FROM _sqlite_migrations")]
    assert applied == migrations.names()
    db.connect(path)  # second open applies nothing new
    assert [r[0] for r in first.execute("SELECT name FROM _sqlite_migrations")] == applied


def test_two_connections_share_queries(tmp_path):
    path = tmp_path / "state.db"
    raw = db.connect(path)
    model_queries.upsert_model(raw, repo_id="o/a", capabilities=["chat"], revisions=["r1"], runtime_compatible=None)
    other = db.connect(path)
    model_queries.upsert_model(other, repo_id="o/b", capabilities=[], revisions=[], runtime_compatible=False)
    rows = {r["repo_id"]: r for r in model_queries.all_models(raw)}
    assert rows["o/a"]["capabilities"] == ["chat"] and rows["o/a"]["runtime_compatible"] is None
    assert rows["o/b"]["runtime_compatible"] is False
    model_queries.delete_models(raw, ["o/a"])
    assert model_queries.get_model(other, "o/a") is None


def test_production_has_one_way_into_state_db():
    """No sqlite-utils Database outside migrations, no raw sqlite3.connect outside db.connect, one transaction
    helper: db.write."""
    from tests.fixtures.cli import ROOT

    for path in [*ROOT.glob("mlxk/**/*.py"), *ROOT.glob("db/*.py"), *ROOT.glob("workers/**/*.py")]:
        text = path.read_text()
        if path.name != "__init__.py" or path.parent.name != "db":
            assert "sqlite_utils" not in text and "open_db" not in text, path
        assert "BEGIN IMMEDIATE" not in text or path.parent.name == "db" and path.name == "__init__.py", path
        assert "sqlite3.connect(" not in text or path.parent.name == "db" and path.name == "__init__.py", path


def test_write_never_commits_what_the_caller_has_open(tmp_path):
    """Inside a caller's transaction, a query's own write is a savepoint: rolling the caller back undoes both."""
    conn = db.connect(tmp_path / "state.db")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO meta (key, value) VALUES ('mine', '1')")
    model_queries.set_meta(conn, "theirs", "2")
    assert conn.in_transaction
    conn.execute("ROLLBACK")
    assert model_queries.get_meta(conn, "mine") is None and model_queries.get_meta(conn, "theirs") is None


def test_write_rolls_back_its_own_work_on_an_error_and_keeps_the_callers(tmp_path):
    conn = db.connect(tmp_path / "state.db")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO meta (key, value) VALUES ('mine', '1')")
    with pytest.raises(RuntimeError):
        with db.write(conn):
            conn.execute("INSERT INTO meta (key, value) VALUES ('theirs', '2')")
            raise RuntimeError("boom")
    conn.execute("COMMIT")
    assert model_queries.get_meta(conn, "mine") == "1" and model_queries.get_meta(conn, "theirs") is None


def test_corrupt_state_db_is_moved_aside_and_rebuilt(tmp_path):
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    conn = db.connect(path)
    assert conn.execute("SELECT count(*) FROM models").fetchone()[0] == 0
    assert list(tmp_path.glob("state.db.corrupt-*"))


def test_concurrent_first_opens_migrate_once(tmp_path):
    path = tmp_path / "state.db"
    errors = []

    def open_it():
        try:
            db.connect(path).close()
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with closing(sqlite3.connect(path)) as check:
        assert check.execute("SELECT count(*) FROM _sqlite_migrations").fetchone()[0] == len(migrations.MIGRATIONS)


def test_unopenable_path_is_a_clear_state_error(tmp_path):
    folder = tmp_path / "state.db"
    folder.mkdir()  # a directory where the file should be
    with pytest.raises((StateError, sqlite3.OperationalError, IsADirectoryError)):
        db.connect(folder)


def test_stored_responses_round_trip_prune_and_delete(tmp_path):
    import time

    from mlxk.db import responses

    conn = db.connect(tmp_path / "state.db")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(responses)")}
    assert {"id", "created_at", "model", "body", "messages"} <= columns
    old = time.time() - (responses.KEEP_DAYS + 1) * 86400
    responses.save_response(conn, id="resp_old", model="m", created_at=old, body={"id": "resp_old"}, messages=[])
    assert responses.get_response(conn, "resp_old")["body"] == {"id": "resp_old"}
    history = [{"role": "user", "content": "hi ✓"}]
    responses.save_response(conn, id="resp_new", model="m", created_at=time.time(), body={"id": "resp_new"},
                            messages=history)
    assert responses.get_response(conn, "resp_old") is None   # pruned by the newer save
    assert responses.get_response(conn, "resp_new")["messages"] == history
    assert responses.delete_response(conn, "resp_new") is True
    assert responses.delete_response(conn, "resp_new") is False and responses.get_response(conn, "resp_new") is None


def test_the_queries_every_list_runs_read_small_indexes_not_the_rows(tmp_path):
    """m009 keeps model objects inline (~1 KB a row): freshness and the pending list must not scan the table."""
    conn = db.connect(tmp_path / "state.db")
    plans = {name: " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")) for name, sql in {
        "freshness": "SELECT repo_id, fingerprint, revision FROM models",
        "pending": f"SELECT repo_id FROM models WHERE {model_queries.PENDING} ORDER BY repo_id",
        "unrendered": "SELECT 1 FROM models WHERE object IS NULL LIMIT 1",
    }.items()}
    assert plans == {"freshness": "SCAN models USING COVERING INDEX models_freshness",
                     "pending": "SCAN models USING INDEX models_pending",
                     "unrendered": "SCAN models USING INDEX models_unrendered"}
    conn.close()
