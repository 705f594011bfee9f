"""state.db: the one way in.

`connect()` gives a raw sqlite3 connection (autocommit, WAL, busy timeout, row factory sqlite3.Row) for a unit of
work (a command, a task run, a request), migrated on first use; `write()` is the one write transaction on it. The
`list` hot path and every other caller use the same two, so what the tests exercise is what production runs;
sqlite-utils is imported only to apply migrations. A state.db that is not a database is moved aside and
rebuilt: the models table is derived from the HF cache, which is the source of truth. Nothing else costs the file: a
lock is waited out, a read-only home is reported as such (`failure_kind` tells them apart for state.db and queue.db).
"""
from __future__ import annotations

import errno
import os
import sqlite3
import time
from contextlib import nullcontext
from pathlib import Path

from mlxk.db import migrations
from mlxk.errors import StateError

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


def _migrate(path: Path, *, locked: bool = False) -> None:
    """Apply pending migrations; `locked`: the caller holds the migration lock already (flock would deadlock)."""
    import sqlite_utils  # lazy: keeps `mlxk list` light
    from sqlite_utils.migrations import Migrations  # lazy: keeps `mlxk list` light

    from mlxk.locks import file_lock  # lazy: keeps `mlxk list` light

    # Two processes starting at once must not both apply the same migration.
    with (nullcontext() if locked else file_lock(Path(f"{path}.lock"))):
        database = sqlite_utils.Database(sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000))
        try:
            _pragmas(database.conn)
            registry = Migrations("mlxk")
            for fn in migrations.MIGRATIONS:
                registry()(fn)
            registry.apply(database)
        finally:
            database.close()


# What SQLite says decides what a failure means; only real corruption ever costs the file (sqlite3's messages, from
# sqlite3_errstr: SQLITE_NOTADB, SQLITE_CORRUPT; SQLITE_BUSY/LOCKED; SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_PERM).
_CORRUPT = ("file is not a database", "malformed")
_LOCKED = ("locked", "busy")


def failure_kind(error: BaseException | None) -> str:
    """corrupt | locked | unwritable | other: what an error opening a SQLite file (state.db, queue.db) means.

    corrupt: the file is not (or no longer) a database, the one case where moving it aside is right; locked:
    another process holds it, wait and retry; unwritable: a read-only or permission-denied directory or file.
    """
    if isinstance(error, OSError):
        return "unwritable"
    if not isinstance(error, sqlite3.DatabaseError):
        return "other"
    text = str(error).lower()
    if any(marker in text for marker in _CORRUPT):
        return "corrupt"
    if any(marker in text for marker in _LOCKED):
        return "locked"
    if "readonly" in text or "read-only" in text or "unable to open" in text or "access permission" in text:
        return "unwritable"
    return "other"


def unusable(path: Path, error: BaseException, *, what: str = "state.db and queue.db"):
    """The StateError for `path` that cannot be used (never advising to delete it, unless it is corrupt);
    `details["reason"]` is failure_kind's word, so callers can fall back (index.load reads the cache instead)."""
    kind = failure_kind(error)
    reason = getattr(error, "strerror", None) or str(error)
    home = path.parent
    if kind == "unwritable" and not os.access(home if home.exists() else home.parent, os.W_OK):
        message = (f"MLXK_HOME {home} is read-only ({reason}): mlxk keeps {what} there. Make it writable or set "
                   f"MLXK_HOME to a writable directory.")
    elif kind == "locked":
        message = (f"{path} stayed locked by another process for {BUSY_TIMEOUT_MS / 1000:g}s ({reason}); "
                   f"nothing was changed. Try again in a moment (`mlxk processes` shows what is running).")
    else:
        message = f"{path} cannot be opened ({reason}); check that it and {home} are readable and writable."
    return StateError(message, path=str(path), reason=kind)


def _quarantine(path: Path, error: Exception) -> None:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        os.replace(path, aside)
    except OSError as move_error:
        raise unusable(path, move_error) from error
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    _say(f"{path} was not a database ({error}): moved it to {aside.name} and rebuilt the index from the HF cache.")


def _say(message: str) -> None:
    import logging  # here, not at the top: `list` never needs it and it costs ~3 ms

    # With no handler configured (the CLI) logging's last resort prints the bare message on stderr: one line.
    logging.getLogger("mlxk.db").warning("%s", message)


def _open(path: Path, shared: bool, *, locked: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=not shared)
    try:
        _pragmas(conn)
        if not _is_current(conn):
            _migrate(path, locked=locked)
        conn.execute("SELECT 1 FROM models LIMIT 1").fetchall()
    except BaseException:
        conn.close()
        raise
    return conn


def _create(path: Path, shared: bool) -> sqlite3.Connection:
    """First use: create (or rebuild an empty) state.db under the migration lock.

    Creating under the lock means a 0-byte file seen while holding it is really empty (another process creating
    the database holds the lock until the file has its header), and switching a new file to WAL, which SQLite does
    not retry on its busy timeout, never races another process doing the same."""
    from mlxk.locks import file_lock  # lazy: keeps `mlxk list` light

    with file_lock(Path(f"{path}.lock")):
        empty = path.exists() and path.stat().st_size == 0
        if empty:
            # Truncated in place (a crash, a user's `: > state.db`): its -wal/-shm belong to the old database, and
            # processes still holding connections keep locks in that -shm. Unlink all three, so the rebuilt file is
            # a new inode: those processes notice it and reopen (workers.process.StateConnection), instead of this
            # open waiting on their locks or their writes landing in a dead file.
            for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                name.unlink(missing_ok=True)
        conn = _open(path, shared, locked=True)
    if empty:
        _say(f"{path} was empty (0 bytes): rebuilt the index from the HF cache.")
    return conn


def _check_writable(path: Path) -> None:
    """SQLite opens a database it cannot write (a read-only directory or file) read-only and fails only at the first
    write, mid-command: refuse up front (two access() calls), so a command that writes never half-runs and `list`
    reads the cache instead."""
    for target in (path.parent, path):
        if os.access(target, os.W_OK) or (target is path and not path.exists()):
            continue
        if target is path and os.access(target, os.W_OK):
            continue   # another process created the file between the two looks (first use, 8 at once)
        code = errno.EROFS if os.statvfs(target).f_flag & os.ST_RDONLY else errno.EACCES
        raise OSError(code, os.strerror(code), str(target))


def connect(path: Path | str, *, shared: bool = False) -> sqlite3.Connection:
    """A raw connection to a migrated state.db (row factory sqlite3.Row); `shared` lets other threads use it too
    (the caller serializes them).

    Raises StateError (details["reason"]: locked | unwritable | other) when it cannot be used: a lock is waited out
    for BUSY_TIMEOUT_MS first, and only a file SQLite calls corrupt is moved aside (state.db.corrupt-<time>) and
    rebuilt, with one line on stderr; so is a 0-byte state.db.
    """
    path = Path(path)
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    quarantined = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _check_writable(path)
            fresh = not path.exists() or path.stat().st_size == 0
            conn = _create(path, shared) if fresh else _open(path, shared)
        except (sqlite3.DatabaseError, OSError) as error:
            kind = failure_kind(error)
            if kind == "locked" and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            if kind == "corrupt" and not quarantined:
                _quarantine(path, error)
                quarantined = True
                continue
            raise unusable(path, error) from error
        conn.row_factory = sqlite3.Row
        return conn


class write:
    """The one write transaction on state.db, on a raw connection (`connect`) or a sqlite-utils Database.

    Outside a transaction: BEGIN IMMEDIATE … COMMIT (ROLLBACK on an error), so writers queue on the busy timeout
    instead of deadlocking on a lock upgrade. Inside one the caller holds: a SAVEPOINT, released on success and
    rolled back on an error, so the caller's open work is never committed (or lost) behind its back.
    """

    def __init__(self, db):
        self.conn: sqlite3.Connection = getattr(db, "conn", db)
        self._savepoint: str | None = None

    def __enter__(self) -> sqlite3.Connection:
        if self.conn.in_transaction:
            self._savepoint = f"mlxk_write_{id(self):x}"
            self.conn.execute(f"SAVEPOINT {self._savepoint}")
        else:
            self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if self._savepoint is None:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        else:
            if exc_type:
                self.conn.execute(f"ROLLBACK TO {self._savepoint}")
            self.conn.execute(f"RELEASE {self._savepoint}")
        return False
