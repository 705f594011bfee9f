"""state.db: the one way in.

`open_db()` gives a sqlite-utils Database for a unit of work (a command, a task run, a request). `connect()` gives
a raw sqlite3 connection with the same pragmas for the `list` hot path, where importing sqlite-utils would cost
more than the whole command. Both migrate on first use. A state.db that is not a database is moved aside and
rebuilt: the models table is derived from the HF cache, which is the source of truth.
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from mlxk.db import migrations

BUSY_TIMEOUT_MS = 10_000


def _pragmas(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")


def _is_current(conn: sqlite3.Connection) -> bool:
    try:
        applied = {row[0] for row in conn.execute("SELECT name FROM _sqlite_migrations WHERE migration_set = 'mlxk'")}
    except sqlite3.DatabaseError:
        return False
    return set(migrations.names()) <= applied


def _migrate(path: Path) -> None:
    import sqlite_utils
    from sqlite_utils.migrations import Migrations

    from mlxk.locks import file_lock

    # Two processes starting at once must not both apply the same migration.
    with file_lock(Path(f"{path}.lock")):
        database = sqlite_utils.Database(sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000))
        try:
            _pragmas(database.conn)
            registry = Migrations("mlxk")
            for fn in migrations.MIGRATIONS:
                registry()(fn)
            registry.apply(database)
        finally:
            database.close()


def _quarantine(path: Path, error: Exception) -> None:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    import logging  # here, not at the top: `list` never needs it and it costs ~3 ms

    logging.getLogger("mlxk.db").warning(
        "%s is not a usable database (%s); moved it to %s and rebuilding from the HF cache", path, error, aside)
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def connect(path: Path | str, *, shared: bool = False) -> sqlite3.Connection:
    """A raw connection to a migrated state.db (row factory sqlite3.Row); `shared` lets other threads use it too
    (the caller serializes them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=not shared)
        try:
            _pragmas(conn)
            if not _is_current(conn):
                _migrate(path)
            conn.execute("SELECT 1 FROM models LIMIT 1").fetchall()
        except sqlite3.DatabaseError as error:
            conn.close()
            if "locked" in str(error) or attempt:
                from mlxk.errors import StateError

                raise StateError(f"{path} cannot be opened: {error}. Stop other mlxk processes or delete "
                                 f"{path} (it is rebuilt from the HF cache).") from error
            _quarantine(path, error)
            continue
        conn.row_factory = sqlite3.Row
        return conn
    raise AssertionError("unreachable")


def open_db(path: Path | str | None = None):
    """A sqlite-utils Database on a migrated state.db; `None` opens the configured one."""
    import sqlite_utils

    if path is None:
        from mlxk.config import settings

        path = settings().state_db
    conn = connect(path)
    conn.row_factory = None
    conn.isolation_level = ""  # sqlite-utils manages transactions with db.atomic()/conn context
    return sqlite_utils.Database(conn)
