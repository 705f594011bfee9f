"""`mlxk list`: views, filters, sorting, bad input, a missing cache, a corrupt or locked state.db, and readers that
never see "database is locked" while `mlxk health` writes."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxk import db
from mlxk.cli import cli
from mlxk.commands import models as commands
from tests import factory

MLXK = str(Path(sys.executable).parent / "mlxk")


def mlxk(*args):
    return CliRunner(catch_exceptions=False).invoke(cli, list(args))


def listed(*args) -> list[dict]:
    result = mlxk("list", "--json", *args)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["status"] == "success" and document["error"] is None
    assert document["data"]["count"] == len(document["data"]["models"])
    return document["data"]["models"]


def names_in_table(text: str) -> list[str]:
    lines = text.strip().splitlines()
    return [line.split()[0] for line in lines[1:-1]]  # minus header and footer


@pytest.fixture
def variants(hf_cache):
    return {name: factory.make_variant(hf_cache, name) for name in factory.VARIANTS}


# ---------------------------------------------------------------- views


def test_missing_cache_is_an_empty_list_with_a_hint(hf_cache):
    hf_cache.rmdir()
    result = mlxk("list")
    assert result.exit_code == 0
    assert "No models in" in result.stdout and "mlxk pull" in result.stdout
    assert listed() == []


def test_default_view_is_runnable_mlx_chat_models_and_json_is_everything(variants):
    default = mlxk("list")
    assert default.exit_code == 0
    shown = names_in_table(default.stdout)
    expected = sorted(v.repo_id for v in factory.VARIANTS.values()
                      if v.health == "healthy" and v.framework == "mlx" and v.model_type == "chat"
                      and v.name != "legacy_weights")  # known not runnable without mlx-lm
    # unsupported_model_type needs mlx-lm to tell: until a scan it shows, marked pending
    assert shown == expected
    assert "(pending)" in default.stdout
    footer = default.stdout.strip().splitlines()[-1]
    assert footer.startswith(f"{len(expected)} models, ")
    assert f"{len(factory.VARIANTS) - len(expected)} more not shown" in footer

    everything = mlxk("list", "--all")
    assert sorted(names_in_table(everything.stdout)) == sorted(v.repo_id for v in factory.VARIANTS.values())
    assert {m["name"] for m in listed()} == {v.repo_id for v in factory.VARIANTS.values()}


def test_health_columns(variants):
    result = mlxk("list", "--all", "--health")
    header = result.stdout.splitlines()[0].split()
    assert header == ["NAME", "ID", "SIZE", "MODIFIED", "TYPE", "HEALTH", "RUNTIME", "REASON"]
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:-1]}
    assert "unhealthy" in lines["mlx-community/tiny-config-missing"]
    assert "config.json missing" in lines["mlx-community/tiny-config-missing"]
    assert " pending " in lines["mlx-community/tiny-healthy-chat"]
    assert " no " in lines["example-org/tiny-gguf"]


def test_pattern_filters_json_and_table(variants):
    assert {m["name"] for m in listed("SHARD")} == {"mlx-community/tiny-healthy-sharded",
                                                    "mlx-community/tiny-index-shard-missing",
                                                    "mlx-community/tiny-shard-empty",
                                                    "mlx-community/tiny-shard-lfs-pointer",
                                                    "mlx-community/tiny-shards-without-index"}
    assert names_in_table(mlxk("list", "healthy-chat").stdout) == ["mlx-community/tiny-healthy-chat"]
    assert listed("example-org/") and all(m["name"].startswith("example-org/") for m in listed("example-org/"))


def test_sorting(model_factory):
    model_factory.repo("mlx-community/b-small", quantize=True, mtime=1_700_000_000)
    model_factory.repo("mlx-community/a-big", mtime=1_600_000_000)
    model_factory.repo("mlx-community/c-mid", shards=2, mtime=1_800_000_000)
    by = lambda *args: [m["name"].split("/")[1] for m in listed(*args)]  # noqa: E731
    assert by() == ["a-big", "b-small", "c-mid"]
    assert by("--reverse") == ["c-mid", "b-small", "a-big"]
    assert by("--sort", "modified") == ["c-mid", "b-small", "a-big"]
    sizes = [m["size_bytes"] for m in listed("--sort", "size")]
    assert sizes == sorted(sizes, reverse=True) and by("--sort", "size")[-1] == "b-small"
    assert mlxk("list", "--sort", "colour").exit_code == 2


def test_footer_totals_what_is_shown(model_factory):
    a = model_factory.repo("mlx-community/one")
    b = model_factory.repo("mlx-community/two", quantize=True)
    from mlxk.output import human_size

    footer = mlxk("list").stdout.strip().splitlines()[-1]
    assert footer.startswith(f"2 models, {human_size(a.size_bytes + b.size_bytes)} on disk.")


def test_pending_repos_are_handed_to_the_scan_hook(model_factory, monkeypatch):
    model_factory.repo("mlx-community/tiny-chat")
    requested = []
    monkeypatch.setattr(commands, "_request_scan", requested.append)
    mlxk("list")
    assert requested == [["mlx-community/tiny-chat"]]
    mlxk("health", "tiny-chat")
    requested.clear()
    mlxk("list")
    assert requested == []  # nothing pending any more


# ---------------------------------------------------------------- bad input


BAD_PATTERNS = ["x" * 97, "bad\x07name", "tab\tname", "nul\x00"]


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_bad_patterns_are_refused_before_anything_is_touched(pattern, model_factory, isolated):
    model_factory.repo("mlx-community/tiny-chat")
    result = mlxk("list", "--json", pattern)
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["status"] == "error" and document["error"]["code"] == "invalid_name"
    assert "invalid model name" in document["error"]["message"]
    assert not isolated.exists()  # MLXK_HOME (state.db) was never created
    text = mlxk("list", pattern)
    assert text.exit_code == 1 and "invalid model name" in text.stderr and text.stdout == ""


# ---------------------------------------------------------------- state.db trouble


def run_mlxk(*args, timeout=120):
    return subprocess.run([MLXK, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def test_corrupt_state_db_is_moved_aside_and_rebuilt(model_factory, isolated):
    model_factory.repo("mlx-community/tiny-chat")
    isolated.mkdir(parents=True)
    (isolated / "state.db").write_bytes(b"this is not a database, it is a shopping list\n" * 100)
    done = run_mlxk("list", "--json")
    assert done.returncode == 0, done.stderr
    assert [m["name"] for m in json.loads(done.stdout)["data"]["models"]] == ["mlx-community/tiny-chat"]
    assert list(isolated.glob("state.db.corrupt-*"))
    with closing(sqlite3.connect(isolated / "state.db")) as check:
        assert check.execute("SELECT repo_id FROM models").fetchall() == [("mlx-community/tiny-chat",)]


def test_locked_state_db_still_lists_from_the_cache(model_factory, isolated, monkeypatch):
    model_factory.repo("mlx-community/tiny-chat")
    db.connect(isolated / "state.db").close()
    holder = sqlite3.connect(isolated / "state.db", isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO meta (key, value) VALUES ('held', 'by a test')")
    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 200)  # the real 10 s wait would only slow the test down
    try:
        result = mlxk("list", "--json")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.exit_code == 0, result.output
    assert [m["name"] for m in json.loads(result.stdout)["data"]["models"]] == ["mlx-community/tiny-chat"]
    assert "locked" in result.stderr


def test_eight_readers_never_see_database_is_locked_while_health_writes(hf_cache):
    for i in range(12):
        factory.write_repo(hf_cache, f"mlx-community/m{i:02d}", factory.tiny_model_files(), hardlink=True)
    factory.make_variant(hf_cache, "config_missing")
    env = os.environ.copy()
    # No state.db yet: every process races to create, migrate and fill it while health rewrites every row.
    writer = subprocess.Popen([MLXK, "health", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    script = (f"for i in 1 2 3 4; do {MLXK} list --json > /dev/null || exit 1; done")
    readers = [subprocess.Popen(["bash", "-c", script], stderr=subprocess.PIPE, env=env) for _ in range(8)]
    deadline = time.time() + 240
    errors, outputs = [], {}
    for process in readers + [writer]:
        out, err = process.communicate(timeout=max(1, deadline - time.time()))
        outputs[process.pid] = out
        err = err.decode()
        if process.returncode != 0 or "locked" in err:
            errors.append((process.args, process.returncode, err[-1500:]))
    assert errors == []
    checked = json.loads(outputs[writer.pid])["data"]
    assert checked["summary"] == {"total": 13, "healthy_count": 12, "unhealthy_count": 1,
                                  "healthy": 12, "unhealthy": 1, "not_runnable": 0, "pending": 0}
    assert len(json.loads(run_mlxk("list", "--json").stdout)["data"]["models"]) == 13


# ---------------------------------------------------------------- the fast path stays light


HEAVY = ("mlx", "mlx_lm", "transformers", "huggingface_hub", "numpy", "sqlite_utils", "pydantic", "mlxk.health")


def test_list_imports_nothing_heavy_once_indexed(model_factory):
    model_factory.repo("mlx-community/tiny-chat")
    assert run_mlxk("list").returncode == 0  # first run indexes (and migrates, which may import more)
    probe = ("import sys, atexit\n"
             f"atexit.register(lambda: print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr))\n"
             "from mlxk.cli import main\n"
             "sys.argv = ['mlxk', 'list', '--json']\n"
             "main()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ.copy(),
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]"


def test_list_skips_interpreter_teardown_but_flushes_and_runs_atexit(hf_cache, tmp_path):
    """main() leaves read-only commands through os._exit: every byte still arrives, atexit handlers (temp dirs of a
    private index, logging) still run, and exit codes are what the command said."""
    for i in range(40):
        factory.write_repo(hf_cache, f"mlx-community/m{i:02d}", factory.tiny_model_files(), hardlink=True)
    marker = tmp_path / "atexit-ran"
    probe = ("import atexit, pathlib, sys\n"
             f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes'))\n"
             "class Witness:\n"
             "    def __del__(self):\n"
             "        sys.stderr.write('module teardown ran')\n"
             "witness = Witness()  # collected when the interpreter tears __main__ down\n"
             "from mlxk.cli import main\n"
             "sys.argv = ['mlxk'] + sys.argv[1:]\n"
             "main()\n")

    def run(*args):
        marker.unlink(missing_ok=True)
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                              env=os.environ.copy(), timeout=60)
        return done, marker.exists()

    done, ran = run("list", "--json")
    assert (done.returncode, ran) == (0, True), done.stderr
    assert json.loads(done.stdout)["data"]["count"] == 40
    assert "module teardown ran" not in done.stderr  # it left via os._exit
    done, ran = run("list", "x" * 97)
    assert (done.returncode, ran) == (1, True)
    assert "invalid model name" in done.stderr and "Traceback" not in done.stderr
    done, ran = run("show", "nobody/nothing", "--json")
    assert (done.returncode, ran) == (1, True)
    assert json.loads(done.stdout)["status"] == "error"


def test_one_size_unit_everywhere_and_partial_files_count_on_disk(hf_cache):
    """Issue 11: a partial file showed as 116.1 MB in one view and 121.7 MB in another (1000 vs 1024), and the
    "on disk" total ignored partial downloads. Decimal units (mlxk.units) everywhere now."""
    from mlxk.units import human_size

    repo = factory.make_variant(hf_cache, "incomplete_download")
    partial = next(repo.repo_dir.glob("blobs/*.incomplete")).stat().st_size
    (model,) = listed()
    assert f"({human_size(partial)})" in model["reason"]
    on_disk = sum(p.stat().st_size for p in repo.repo_dir.glob("blobs/*"))
    assert model["disk_bytes"] == on_disk   # the partial file is on disk
    assert model["size_bytes"] < on_disk    # mlx-knife's size_bytes: the snapshot's files
    assert mlxk("list", "--all").stdout.strip().endswith(f"1 model, {human_size(on_disk)} on disk.")
    assert human_size(121_700_000) == "121.7 MB" and human_size(999) == "999 B"


@pytest.mark.parametrize("pattern, expected", [
    ("1b-4BIT", ["mlx-community/Llama-3.2-1B-4bit"]), (".2-1b", ["mlx-community/Llama-3.2-1B-4bit"]),
    ("Llama 3", []), ("../x", []), ("org/name/extra", []),
])
def test_a_pattern_is_a_plain_substring_as_in_mlx_knife(pattern, expected, model_factory):
    """Issue 12 #11: a pattern with a space or a leading '.'/'-' was an invalid_name error; it only filters."""
    model_factory.repo("mlx-community/Llama-3.2-1B-4bit")
    model_factory.repo("mlx-community/Qwen3-0.6B")
    assert [m["name"] for m in listed(pattern)] == expected


def test_show_notices_a_file_edited_in_place(model_factory):
    """QA F1(a): `show NAME` compares its snapshot's files with the row and inspects the repo again when they
    differ (the stat check `list` makes cannot see an edit in place)."""
    repo = model_factory.repo("org/edited")
    listed("--all")
    weights = repo.blob_path("model.safetensors")
    os.truncate(weights, weights.stat().st_size - 1000)
    result = mlxk("show", "org/edited", "--json")
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["data"]["model"]
    assert model["health"] == "unhealthy" and "safetensors" in model["reason"]
    assert [m["health"] for m in listed("--all")] == ["unhealthy"]   # the row itself was corrected
