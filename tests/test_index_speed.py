"""The index at 10,000 repos: a big first index is spread over processes and gives exactly the rows one process
gives; the steady-state `list` path stays free of what the parallel index, the downloader and the worker use."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlxk import db, index
from mlxk.db import models as queries
from tests import factory
from tests.fixtures.cli import MLXK, ROOT

_VOLATILE = ("checked_at", "runtime_checked_at")


def _rows(conn) -> dict[str, dict]:
    return {row["repo_id"]: {k: v for k, v in row.items() if k not in _VOLATILE} for row in queries.all_models(conn)}


def test_a_parallel_first_index_gives_the_rows_one_process_gives(tmp_path, hf_cache, monkeypatch):
    for name in factory.VARIANTS:
        factory.make_variant(hf_cache, name)
    for i in range(6):
        factory.write_repo(hf_cache, f"mlx-community/m{i}-4bit", factory.tiny_model_files(), hardlink=True)
    serial = db.connect(tmp_path / "serial.db")
    index.refresh(serial, hf_cache)
    calls = []
    real = index._inspect_all

    def spy(targets, signature):
        calls.append(len(targets))
        return real(targets, signature)

    monkeypatch.setattr(index, "PARALLEL_MIN_REPOS", 4)
    monkeypatch.setattr(index, "_inspect_all", spy)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)   # two workers even on a one-CPU runner
    parallel = db.connect(tmp_path / "parallel.db")
    result = index.refresh(parallel, hf_cache)
    assert calls == [len(factory.VARIANTS) + 6] and len(result.added) == calls[0]
    assert _rows(parallel) == _rows(serial)


HEAVY_FOR_LIST = ("multiprocessing", "concurrent.futures", "httpx", "filelock", "huey", "sqlite_utils",
                  "huggingface_hub", "mlx", "mlx_lm", "numpy", "mlxk.health", "mlxk.hub")


def test_list_json_stays_off_the_heavy_modules_once_indexed(hf_cache):
    for i in range(3):
        factory.write_repo(hf_cache, f"mlx-community/m{i}-4bit", factory.tiny_model_files(), hardlink=True)
    env = os.environ.copy()
    first = subprocess.run([*MLXK, "list", "--json"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    probe = ("import sys, atexit\n"
             f"atexit.register(lambda: print(sorted(m for m in {HEAVY_FOR_LIST!r} if m in sys.modules), "
             "file=sys.stderr))\n"
             "from mlxk.cli import main\n"
             "sys.argv = ['mlxk', 'list', '--json']\n"
             "main()\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert first.returncode == 0 and done.returncode == 0, (first.stderr, done.stderr)
    assert done.stderr.strip().splitlines()[-1] == "[]"


# What a command that only lists or explains must never import: the model stack, the server stack, the Hub client,
# the job queue, sqlite-utils (migrations only), the constrained-decoding and terminal-UI libraries.
HEAVY_ANYWHERE = ("mlx", "mlx_lm", "transformers", "numpy", "fastapi", "starlette", "uvicorn", "pydantic",
                  "huggingface_hub", "httpx", "huey", "sqlite_utils", "llguidance", "prompt_toolkit")


@pytest.mark.parametrize("args", [["list", "--json"], ["list"], ["--help"], ["list", "--help"]])
def test_listing_and_help_import_nothing_heavy(args, hf_cache):
    """`mlxk list` (its runtime checks still pending: the scan it asked for is queued) and `--help`, each in its own
    interpreter: the import sweep moved imports to the tops of modules, and this keeps it from pulling the heavy
    stacks onto these paths."""
    factory.write_repo(hf_cache, "mlx-community/m0-4bit", factory.tiny_model_files(), hardlink=True)
    env = os.environ.copy()
    first = subprocess.run([*MLXK, "list", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    probe = ("import sys, atexit\n"
             f"atexit.register(lambda: print(sorted(m for m in {HEAVY_ANYWHERE!r} if m in sys.modules), "
             "file=sys.stderr))\n"
             "from mlxk.cli import main\n"
             f"sys.argv = ['mlxk', *{args!r}]\n"
             "main()\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]"


def test_a_warm_list_writes_nothing(hf_cache, isolated):
    """Once the index is current (rows, rendered objects, mlx-lm's registry), `list --json` only reads: no commit
    reaches state.db (SQLite's data_version would move) and its files keep their size and mtime."""
    for i in range(3):
        factory.write_repo(hf_cache, f"mlx-community/m{i}-4bit", factory.tiny_model_files(), hardlink=True)

    def listed():
        done = subprocess.run([*MLXK, "list", "--json", "--no-scan"], cwd=ROOT, env=os.environ.copy(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    first = listed()
    files = [isolated / name for name in ("state.db", "state.db-wal")]
    watcher = db.connect(isolated / "state.db")
    version = watcher.execute("PRAGMA data_version").fetchone()[0]
    stats = [(path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    assert listed() == first
    assert watcher.execute("PRAGMA data_version").fetchone()[0] == version
    assert [(path.stat().st_size, path.stat().st_mtime_ns) for path in files] == stats
    watcher.close()
