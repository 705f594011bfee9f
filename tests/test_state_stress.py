"""state.db and queue.db under stress: a read-only MLXK_HOME, locks, concurrent first use, empty and corrupt files.

The rule these pin (mlxk.db.failure_kind): only a file SQLite calls corrupt is moved aside and rebuilt; a lock is
waited out and never answered with "delete it"; a read-only home is one line naming MLXK_HOME, while `list` and
`show` still answer from a scan of the HF cache.

The read-only home is a real read-only bind mount (root ignores chmod), made inside `unshare -m` so it is private to
the command under test; where the machine does not allow that the tests say so and skip.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from mlxk import db
from mlxk.errors import StateError

MLXK = str(Path(sys.executable).parent / "mlxk")
RO_SHELL = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def run_mlxk(*args, env=None, timeout=120):
    return subprocess.run([MLXK, *args], capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy())


def read_only(home: Path, *args):
    """Run `mlxk ARGS` with `home` mounted read-only for that command alone."""
    return subprocess.run(["unshare", "-m", "sh", "-c", RO_SHELL, str(home), MLXK, *args], capture_output=True,
                          text=True, timeout=120, env=os.environ.copy())


@pytest.fixture
def ro_home(isolated, model_factory):
    """MLXK_HOME with a filled state.db and queue.db, a cached chat model it knows and one it does not yet; commands
    see the home read-only."""
    model_factory.repo("mlx-community/tiny-chat")
    assert run_mlxk("list").returncode == 0
    assert run_mlxk("pull", "org/never", env={**os.environ, "MLXK_WORKER_IDLE": "1",
                                              "HF_ENDPOINT": "http://127.0.0.1:9"}).returncode == 0
    from tests.fixtures.queue import reap_background_workers

    reap_background_workers(isolated)
    # The last connection out checkpoints and removes -wal/-shm. A worker killed just now may still be closing its
    # files: wait until our close is the last one, so nothing outside the read-only mount changes the home later.
    deadline = time.monotonic() + 20
    while True:
        db.connect(isolated / "state.db").close()
        if not any((isolated / f"state.db{suffix}").exists() for suffix in ("-wal", "-shm")):
            break
        assert time.monotonic() < deadline, "state.db stayed open by another process"
        time.sleep(0.1)
    # A repo the index has not seen: whether SQLite can open the read-only file or not, `list` cannot save it.
    model_factory.repo("mlx-community/tiny-new")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", RO_SHELL, str(isolated), "sh", "-c", 'touch "$0/probe"',
                            str(isolated)], capture_output=True, text=True)
    if probe.returncode == 0 or "Read-only" not in probe.stderr:
        pytest.skip(f"this machine cannot make a private read-only mount (unshare -m + mount -o remount,ro): "
                    f"{probe.stderr.strip() or 'the mount stayed writable'}")
    return isolated


def snapshot(home: Path) -> dict:
    return {p.name: p.stat().st_size for p in home.iterdir() if p.is_file()}


def test_read_only_home_lists_shows_and_checks_from_the_cache(ro_home):
    before = snapshot(ro_home)
    listed = read_only(ro_home, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [m["name"] for m in json.loads(listed.stdout)["data"]["models"]] == ["mlx-community/tiny-chat",
                                                                             "mlx-community/tiny-new"]
    warning = listed.stderr.strip().splitlines()
    assert len(warning) == 1 and f"MLXK_HOME {ro_home} is read-only" in warning[0]
    assert "without the index" in warning[0] and "Traceback" not in listed.stderr

    shown = read_only(ro_home, "show", "tiny-new", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["data"]["model"]["name"] == "mlx-community/tiny-new"
    assert "read-only" in shown.stderr

    checked = read_only(ro_home, "health", "tiny-new", "--json")   # checks now; the verdict is not kept
    assert checked.returncode == 0, checked.stderr
    assert "read-only" in checked.stderr and "nothing was saved" in checked.stderr
    assert snapshot(ro_home) == before   # nothing moved aside, nothing written


@pytest.mark.parametrize("bare, args", [
    (True, ["jobs"]), (True, ["jobs", "--json"]), (True, ["pull", "org/other"]),
    (False, ["pull", "org/other"]), (False, ["pull", "org/other", "--json"]), (False, ["rm", "mlx-community/tiny-chat"]),
])
def test_read_only_home_is_one_line_naming_it(ro_home, bare, args):
    """A command that must write (or a bare home, with no state.db to read) fails in one line naming MLXK_HOME."""
    if bare:
        for path in ro_home.iterdir():
            if path.is_file():
                path.unlink()
    before = snapshot(ro_home)
    done = read_only(ro_home, *args)
    assert done.returncode == 1, (done.stdout, done.stderr)
    if "--json" in args:
        error = json.loads(done.stdout)["error"]
        assert error["code"] == "state_error" and error["reason"] == "unwritable"
        text = error["message"]
    else:
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        text = lines[0]
    assert f"MLXK_HOME {ro_home} is read-only" in text and "writable" in text
    assert "delete" not in text and "moved" not in text and "Traceback" not in done.stderr
    assert snapshot(ro_home) == before
    assert (ro_home.parent / "hf" / "hub" / "models--mlx-community--tiny-chat").is_dir()


# ---------------------------------------------------------------- what an error means


@pytest.mark.parametrize("error, kind", [
    (sqlite3.DatabaseError("file is not a database"), "corrupt"),
    (sqlite3.DatabaseError("database disk image is malformed"), "corrupt"),
    (sqlite3.OperationalError("database is locked"), "locked"),
    (sqlite3.OperationalError("database table is locked: models"), "locked"),
    (sqlite3.OperationalError("attempt to write a readonly database"), "unwritable"),
    (sqlite3.OperationalError("unable to open database file"), "unwritable"),
    (PermissionError(13, "Permission denied"), "unwritable"),
    (OSError(30, "Read-only file system"), "unwritable"),
    (sqlite3.OperationalError("no such table: models"), "other"),
])
def test_failure_kind(error, kind):
    assert db.failure_kind(error) == kind


def _hold_exclusive(path: Path) -> sqlite3.Connection:
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO meta (key, value) VALUES ('held', 'by a test')")
    return holder


def test_a_locked_state_db_is_waited_for_and_never_moved_or_deleted(isolated, monkeypatch):
    path = isolated / "state.db"
    db.connect(path).close()
    holder = _hold_exclusive(path)
    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 300)
    try:
        with pytest.raises(StateError) as raised:
            db.connect(path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert raised.value.details["reason"] == "locked"
    assert "locked" in raised.value.message and "delete" not in raised.value.message
    assert path.exists() and not list(isolated.glob("state.db.corrupt-*"))
    db.connect(path).close()   # usable again once the holder is gone


def test_a_locked_queue_db_is_not_called_unusable(isolated):
    from mlxk.workers import queue

    queue.get_huey()
    queue.forget()
    holder = sqlite3.connect(isolated / "queue.db", isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE held_by_test (x)")
    try:
        result = run_mlxk("pull", "org/model", "--json")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    error = json.loads(result.stdout)["error"]
    assert result.returncode == 1 and error["reason"] == "locked", error
    assert "delete" not in error["message"] and "queue.db" in error["message"]
    assert (isolated / "queue.db").exists()


# ---------------------------------------------------------------- concurrent first use


def _first_use(path: str, barrier, results) -> None:
    from mlxk.db import jobs as jobs_db

    barrier.wait()
    try:
        conn = db.connect(path)
        jobs_db.create_job(conn, id=uuid.uuid4().hex[:12], kind="pull", target=f"org/m{os.getpid()}", args={},
                           task_id="t")
        conn.close()
        results.put("ok")
    except Exception as error:  # noqa: BLE001 — the test reports every failure
        results.put(repr(error))


def test_eight_processes_creating_state_db_at_once_all_succeed(tmp_path):
    """SQLite does not retry a new file's switch to WAL on its busy timeout: before db.connect created state.db under
    its lock, ~1 in 60 such rounds had a process fail with "database is locked … delete state.db"."""
    context = multiprocessing.get_context("fork")
    failures = []
    for round_ in range(40):
        path = tmp_path / f"round{round_}" / "state.db"
        barrier, results = context.Barrier(8), context.Queue()
        procs = [context.Process(target=_first_use, args=(str(path), barrier, results)) for _ in range(8)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        failures += [o for o in outcomes if o != "ok"]
        assert not list(path.parent.glob("state.db.corrupt-*"))
    assert failures == []


def test_the_switch_to_wal_waits_out_a_writer(isolated):
    """The deterministic core of the race above: while another connection holds a write lock on a not-yet-WAL file,
    SQLite refuses the WAL switch at once (its busy timeout does not apply); connect waits it out instead of failing
    with "database is locked … delete state.db"."""
    import threading

    isolated.mkdir(parents=True)
    path = isolated / "state.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as setup:
        setup.execute("CREATE TABLE unrelated (x)")
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN IMMEDIATE")
    reader.execute("INSERT INTO unrelated VALUES (1)")   # holds a RESERVED lock until ROLLBACK
    release = threading.Timer(0.5, reader.execute, args=("ROLLBACK",))
    release.start()
    try:
        conn = db.connect(path)
    finally:
        release.join()
        reader.close()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_eight_commands_on_an_empty_home_at_once_all_succeed(tmp_path):
    """pulls (state.db, queue.db and a background worker, all created at once), `jobs` and `list` side by side."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "MLXK_WORKER_IDLE": "1"}   # pulls that fail later
    for round_ in range(3):
        home = tmp_path / f"home{round_}"
        env["MLXK_HOME"] = str(home)
        commands = [["pull", f"org/m{round_}a", "--json"], ["jobs", "--json"], ["pull", f"org/m{round_}b", "--json"],
                    ["list", "--json"]]
        procs = [subprocess.Popen([MLXK, *commands[i % 4]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                  text=True) for i in range(8)]
        try:
            for proc in procs:
                out, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err
                assert json.loads(out)["status"] == "success"
                assert "locked" not in err and "empty" not in err
            assert not list(home.glob("state.db.corrupt-*")) and not list(home.glob("queue.db.corrupt-*"))
        finally:
            run_mlxk("processes", "stop", env=env)


# ---------------------------------------------------------------- empty and corrupt files say so


def test_an_empty_state_db_is_rebuilt_and_says_so_once(model_factory, isolated):
    model_factory.repo("mlx-community/tiny-chat")
    isolated.mkdir(parents=True)
    (isolated / "state.db").write_bytes(b"")
    first = run_mlxk("list", "--json")
    assert first.returncode == 0, first.stderr
    assert [m["name"] for m in json.loads(first.stdout)["data"]["models"]] == ["mlx-community/tiny-chat"]
    lines = first.stderr.strip().splitlines()
    assert len(lines) == 1 and "was empty (0 bytes)" in lines[0] and "rebuilt" in lines[0]
    again = run_mlxk("list", "--json")
    assert again.returncode == 0 and "empty" not in again.stderr


def test_a_corrupt_state_db_is_moved_aside_with_one_line(model_factory, isolated):
    model_factory.repo("mlx-community/tiny-chat")
    isolated.mkdir(parents=True)
    (isolated / "state.db").write_bytes(b"not a database\n" * 400)
    done = run_mlxk("list", "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "was not a database" in lines[0] and "state.db.corrupt-" in lines[0]
    assert len(list(isolated.glob("state.db.corrupt-*"))) == 1
