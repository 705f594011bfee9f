"""mlxk.index: the index follows the cache (adds, changes, deletions made behind its back), runtime verdicts stay
tied to the fingerprint and mlx-lm they were made with, and the model object speaks mlx-knife 2.0.8's JSON."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from mlxk import db
from mlxk.db import models as queries
from mlxk import cache, index, names
from mlxk.units import human_size
from tests import factory


@pytest.fixture
def conn(tmp_path):
    connection = db.connect(tmp_path / "mlxk" / "state.db")
    yield connection
    connection.close()


def row_of(conn, repo_id):
    return queries.get_model(conn, repo_id)


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_of_a_missing_repo_is_all_dashes(hf_cache):
    assert cache.fingerprint(hf_cache / "models--nobody--here", None) == "-:-:-"


# ---------------------------------------------------------------- refresh: the index follows the cache


def test_missing_cache_is_an_empty_index(conn, tmp_path):
    result = index.refresh(conn, tmp_path / "no" / "such" / "cache")
    assert (result.added, result.changed, result.removed, result.pending) == ([], [], [], [])
    assert index.rows(conn) == []


def test_every_variant_gets_the_verdict_the_factory_expects(conn, hf_cache):
    for name in factory.VARIANTS:
        factory.make_variant(hf_cache, name)
    first = index.refresh(conn, hf_cache)
    assert sorted(first.added) == sorted(v.repo_id for v in factory.VARIANTS.values())
    # Without runtime checks: integrity is settled, and so are the verdicts that need no mlx-lm.
    for variant in factory.VARIANTS.values():
        row = row_of(conn, variant.repo_id)
        assert (row["health"], row["framework"], row["model_type"]) == \
               (variant.health, variant.framework, variant.model_type), variant.name
        if variant.name in ("gguf", "pytorch", "legacy_weights"):
            assert row["runtime_compatible"] is False and row["reason"], variant.name
        elif variant.health == "healthy":
            assert row["runtime_compatible"] is None and index.is_pending(row), variant.name
            assert variant.repo_id in first.pending
        else:
            assert row["reason"] and not index.is_pending(row), variant.name
    checked = index.refresh(conn, hf_cache, runtime=True)
    assert "mlx-community/tiny-unsupported-model-type" in checked.runtime_checked
    assert checked.pending == [] and not checked.touched
    for variant in factory.VARIANTS.values():
        row = row_of(conn, variant.repo_id)
        assert row["health"] == variant.health, variant.name
        assert row["runtime_compatible"] == variant.runtime_compatible, variant.name
        assert (row["reason"] is None) == (variant.rule is None), variant.name
    assert "notamodel" in row_of(conn, "mlx-community/tiny-unsupported-model-type")["reason"]


def test_a_second_refresh_touches_nothing(conn, model_factory, hf_cache):
    model_factory.repo("mlx-community/a")
    model_factory.repo("mlx-community/b")
    index.refresh(conn, hf_cache)
    before = index.rows(conn)
    again = index.refresh(conn, hf_cache)
    assert (again.added, again.changed, again.removed) == ([], [], [])
    assert index.rows(conn) == before


def test_changes_made_behind_our_back_are_found(conn, model_factory, hf_cache):
    kept = model_factory.repo("mlx-community/kept")
    gone = model_factory.repo("mlx-community/gone")
    moved = model_factory.repo("mlx-community/moved")
    index.refresh(conn, hf_cache)

    shutil.rmtree(gone.repo_dir)                                   # rm -rf
    new_commit = factory.add_revision(moved, {"extra.txt": b"new file in a new commit"})  # hf download of main
    model_factory.repo("mlx-community/fresh")                      # another tool pulled something
    result = index.refresh(conn, hf_cache)

    assert result.removed == ["mlx-community/gone"]
    assert result.added == ["mlx-community/fresh"]
    assert result.changed == ["mlx-community/moved"]
    assert row_of(conn, "mlx-community/gone") is None
    moved_row = row_of(conn, "mlx-community/moved")
    assert moved_row["revision"] == new_commit.revision
    assert moved_row["revisions"][0] == new_commit.revision and len(moved_row["revisions"]) == 2
    assert row_of(conn, kept.repo_id)["revision"] == kept.revision


def test_a_download_finishing_elsewhere_turns_the_repo_healthy(conn, hf_cache):
    repo = factory.make_variant(hf_cache, "incomplete_download")
    index.refresh(conn, hf_cache)
    assert row_of(conn, repo.repo_id)["health"] == "unhealthy"
    assert "did not finish" in row_of(conn, repo.repo_id)["reason"]
    # What huggingface_hub does when the download completes: rename the blob, link it into the snapshot.
    weights = factory.tiny_model_files()["model.safetensors"]
    etag = factory.file_info("model.safetensors", weights).etag
    os.replace(repo.repo_dir / "blobs" / f"{etag}.incomplete", repo.repo_dir / "blobs" / etag)
    (repo.repo_dir / "blobs" / etag).write_bytes(weights)
    os.symlink(f"../../blobs/{etag}", repo.snapshot_dir / "model.safetensors")
    result = index.refresh(conn, hf_cache)
    assert result.changed == [repo.repo_id]
    row = row_of(conn, repo.repo_id)
    assert (row["health"], row["reason"]) == ("healthy", None)
    assert result.pending == [repo.repo_id]


def test_leftover_partial_download_beside_a_whole_snapshot_is_reclaimable(conn, hf_cache):
    repo = factory.make_variant(hf_cache, "healthy_with_leftover_incomplete")
    index.refresh(conn, hf_cache)
    row = row_of(conn, repo.repo_id)
    assert row["health"] == "healthy"
    partial = sum(p.stat().st_size for p in (repo.repo_dir / "blobs").glob("*.incomplete"))
    assert partial > 0 and row["reclaimable_bytes"] == partial


def test_refresh_scoped_to_some_repos(conn, model_factory, hf_cache):
    a = model_factory.repo("mlx-community/a")
    b = model_factory.repo("mlx-community/b")
    index.refresh(conn, hf_cache)
    shutil.rmtree(a.repo_dir)
    shutil.rmtree(b.repo_dir)
    result = index.refresh(conn, hf_cache, repos={"mlx-community/b"})
    assert result.removed == ["mlx-community/b"]
    assert row_of(conn, "mlx-community/a") is not None   # out of scope: left for the next full refresh


# ---------------------------------------------------------------- unreadable repos


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_unreadable_config_is_an_unhealthy_verdict_not_a_crash(conn, model_factory, hf_cache):
    repo = model_factory.repo("mlx-community/odd")
    link = repo.path("config.json")
    link.unlink()
    link.symlink_to("/proc/self/mem")  # stat works, read() fails with EIO: unreadable even for root
    index.refresh(conn, hf_cache)
    row = row_of(conn, repo.repo_id)
    assert row["health"] == "unhealthy"
    assert "config.json cannot be read" in row["reason"]


def test_unreadable_snapshots_folder_is_an_unhealthy_verdict(conn, model_factory, hf_cache):
    repo = model_factory.repo("mlx-community/looped")
    shutil.rmtree(repo.repo_dir / "snapshots")
    os.symlink("snapshots", repo.repo_dir / "snapshots")  # a symlink loop: ELOOP for everyone, root included
    result = index.refresh(conn, hf_cache)
    assert result.added == [repo.repo_id]
    row = row_of(conn, repo.repo_id)
    assert row["health"] == "unhealthy" and row["reason"].startswith("cannot read")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_is_an_unhealthy_verdict(conn, model_factory, hf_cache):
    repo = model_factory.repo("mlx-community/locked")
    os.chmod(repo.blob_path("config.json"), 0)
    try:
        index.refresh(conn, hf_cache)
    finally:
        os.chmod(repo.blob_path("config.json"), 0o644)
    assert row_of(conn, repo.repo_id)["health"] == "unhealthy"


# ---------------------------------------------------------------- runtime verdicts


def test_runtime_verdict_goes_pending_when_the_repo_changes(conn, model_factory, hf_cache):
    repo = model_factory.repo("mlx-community/tiny-chat")
    index.refresh(conn, hf_cache, runtime=True)
    assert row_of(conn, repo.repo_id)["runtime_compatible"] is True
    factory.add_revision(repo, {"notes.txt": b"a new commit"})
    result = index.refresh(conn, hf_cache)
    assert result.changed == [repo.repo_id] and result.pending == [repo.repo_id]
    assert row_of(conn, repo.repo_id)["runtime_compatible"] is None


def test_runtime_verdict_goes_pending_when_mlx_lm_changes(conn, model_factory, hf_cache):
    repo = model_factory.repo("mlx-community/tiny-chat")
    index.refresh(conn, hf_cache, runtime=True)
    row = row_of(conn, repo.repo_id)
    assert row["runtime_fingerprint"].startswith(row["fingerprint"] + "|mlx-lm ")
    # As if the verdict had been made by another mlx-lm, and the install has moved since.
    conn.execute("UPDATE models SET runtime_fingerprint = fingerprint || '|mlx-lm 0.0.1'")
    queries.set_meta(conn, index.SIGNATURE_KEY, "mlx-lm 0.0.1")
    queries.set_meta(conn, index.STAMP_KEY, "somewhere-else:0")
    result = index.refresh(conn, hf_cache)
    assert result.pending == [repo.repo_id]
    assert row_of(conn, repo.repo_id)["runtime_compatible"] is None
    index.refresh(conn, hf_cache, runtime=True)
    assert row_of(conn, repo.repo_id)["runtime_compatible"] is True


def test_a_verdict_for_an_older_fingerprint_is_not_stored(conn, model_factory, hf_cache):
    repo = model_factory.repo("mlx-community/tiny-chat")
    index.refresh(conn, hf_cache)
    stored = queries.set_runtime_verdicts(conn, [{
        "repo_id": repo.repo_id, "fingerprint": "stale", "runtime_compatible": True, "reason": None,
        "runtime_fingerprint": "stale|mlx-lm x", "runtime_checked_at": "2026-01-01T00:00:00Z"}])
    assert stored == 0
    assert row_of(conn, repo.repo_id)["runtime_compatible"] is None


def test_force_rechecks_even_unchanged_repos(conn, model_factory, hf_cache):
    repo = model_factory.repo("mlx-community/tiny-chat")
    index.refresh(conn, hf_cache, runtime=True)
    result = index.refresh(conn, hf_cache, runtime=True, force=True)
    assert result.changed == [repo.repo_id] and result.runtime_checked == [repo.repo_id]


# ---------------------------------------------------------------- the model object


MLX_KNIFE_FIELDS = ["name", "hash", "size_bytes", "last_modified", "framework", "model_type", "capabilities",
                    "health", "runtime_compatible", "reason", "cached"]


def test_model_object_speaks_mlx_knife(conn, hf_cache):
    written = {name: factory.make_variant(hf_cache, name) for name in ("healthy_chat", "gguf", "pytorch",
                                                                       "config_missing")}
    index.refresh(conn, hf_cache, runtime=True)
    objects = {obj["name"]: obj for obj in map(index.model_object, index.rows(conn))}
    chat = objects["mlx-community/tiny-healthy-chat"]
    assert list(chat)[:11] == MLX_KNIFE_FIELDS
    assert re.fullmatch(r"[0-9a-f]{40}", chat["hash"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", chat["last_modified"])
    assert (chat["framework"], chat["model_type"], chat["health"], chat["runtime_compatible"], chat["cached"]) == \
           ("MLX", "chat", "healthy", True, True)
    assert chat["capabilities"][:2] == ["text-generation", "chat"]
    assert chat["size_bytes"] == written["healthy_chat"].size_bytes
    assert chat["context_length"] > 0 and chat["architecture"] == "llama"
    assert objects["example-org/tiny-gguf"]["framework"] == "GGUF"
    assert objects["example-org/tiny-pytorch"]["framework"] == "PyTorch"
    broken = objects["mlx-community/tiny-config-missing"]
    # mlx-knife says runtime_compatible false when integrity failed; null is reserved for "pending"
    assert (broken["health"], broken["runtime_compatible"]) == ("unhealthy", False)
    assert broken["reason"] == "config.json missing"


def test_sqlite_renders_the_same_model_objects_as_python(conn, hf_cache, model_factory):
    """`list --json` embeds MODEL_OBJECT_SQL's text; it must say exactly what model_object() says, in every state."""
    for name in factory.VARIANTS:
        factory.make_variant(hf_cache, name)
    model_factory.repo("mlx-community/tiny-pending")
    index.refresh(conn, hf_cache)
    checked = ["mlx-community/tiny-healthy-chat"]
    index.refresh(conn, hf_cache, runtime=True, repos=checked)
    # states the cache alone does not produce: an incompatible verdict, odd text, empty and unknown columns
    conn.execute("UPDATE models SET runtime_compatible = 0, reason = 'needs \"mlx-lm\" ≥ 9 — ünïcode\n' "
                 "WHERE repo_id = 'example-org/tiny-pytorch'")
    conn.execute("UPDATE models SET framework = NULL, capabilities = NULL, revisions = '' "
                 "WHERE repo_id = 'mlx-community/tiny-config-missing'")
    conn.execute("UPDATE models SET framework = 'onnx' WHERE repo_id = 'example-org/tiny-gguf'")
    conn.commit()
    _assert_sql_renders_model_objects(conn)
    # with aliases (Ollama's /api/copy) the rendering looks them up per row: two on one model, none elsewhere
    index.add_alias(conn, names.parse("mlx-community/tiny-healthy-chat"), "zeta")
    index.add_alias(conn, names.parse("tiny-healthy-chat"), "Alpha:v2")
    _assert_sql_renders_model_objects(conn)
    chat = next(json.loads(e["object"]) for e in index.listing(conn) if e["repo_id"] == "mlx-community/tiny-healthy-chat")
    assert chat["aliases"] == ["alpha-v2", "zeta"]
    assert index.resolve(conn, names.parse("ALPHA:v2")).row["repo_id"] == "mlx-community/tiny-healthy-chat"


def _assert_sql_renders_model_objects(conn):
    expected = {row["repo_id"]: index.with_provisional_verdict(conn, index.model_object(row))
                for row in index.rows(conn)}
    rendered = {entry["repo_id"]: entry for entry in index.listing(conn)}
    assert list(rendered) == list(expected)
    states, pending = set(), set()
    for repo_id, entry in rendered.items():
        obj = json.loads(entry["object"])
        assert obj == expected[repo_id] and list(obj) == list(expected[repo_id]), repo_id
        assert (entry["size_bytes"], entry["last_modified"]) == (obj["size_bytes"], obj["last_modified"])
        assert entry["pending"] == obj["runtime_pending"]
        assert isinstance(obj["runtime_compatible"], bool)  # mlx-knife's API: always a boolean
        states.add((obj["health"], obj["runtime_compatible"], obj["framework"]))
        pending.add(obj["runtime_pending"])
    # the comparison covered every branch of the SQL
    assert pending == {True, False}
    assert {("healthy", True, "MLX"), ("unhealthy", False, "Unknown"),
            ("healthy", False, "PyTorch"), ("healthy", False, "onnx")} <= states


def test_model_objects_are_stored_and_any_write_clears_its_row(conn, hf_cache, model_factory):
    """m009: a refresh leaves every row's model object rendered in state.db, so `list --json` reads text; an UPDATE by
    anyone (here the server catalog's verdict write) clears that row's object, the listing renders it itself until
    the next refresh stores it again, and a refresh of an unchanged cache writes nothing."""
    a = model_factory.repo("mlx-community/tiny-a").repo_id
    model_factory.repo("mlx-community/tiny-b")

    def stored():
        return dict(conn.execute("SELECT repo_id, object FROM models"))

    def listed_as_python_says():
        listed = {entry["repo_id"]: json.loads(entry["object"]) for entry in index.listing(conn)}
        assert listed == {row["repo_id"]: index.with_provisional_verdict(conn, index.model_object(row))
                          for row in index.rows(conn)}
        return listed

    index.refresh(conn, hf_cache)
    assert None not in stored().values()
    listed_as_python_says()
    row = queries.get_model(conn, a)
    assert queries.set_runtime_verdicts(conn, [{
        "repo_id": a, "fingerprint": row["fingerprint"], "runtime_compatible": False, "reason": "needs mlx-lm 9",
        "runtime_fingerprint": f"{row['fingerprint']}|mlx-lm x", "runtime_checked_at": "2026-01-01T00:00:00Z"}]) == 1
    assert stored()[a] is None and stored()["mlx-community/tiny-b"] is not None
    assert listed_as_python_says()[a]["reason"] == "needs mlx-lm 9"
    index.refresh(conn, hf_cache)
    assert json.loads(stored()[a])["reason"] == "needs mlx-lm 9"
    before = conn.total_changes
    index.refresh(conn, hf_cache)
    assert conn.total_changes == before   # nothing to render, nothing written


def test_objects_stored_by_another_rendering_are_not_read_and_are_rendered_again(conn, hf_cache, model_factory):
    """An mlxk whose model object differs from the one that stored the objects (an upgrade) never embeds them: the
    listing renders every row, and the next refresh stores them all again."""
    repo_id = model_factory.repo("mlx-community/tiny-a").repo_id
    index.refresh(conn, hf_cache)
    conn.execute("UPDATE models SET object = '{\"from\": \"an older mlxk\"}'")
    queries.set_meta(conn, index.OBJECT_SQL_KEY, "json_object('from', 'an older mlxk')")
    assert json.loads(index.listing(conn)[0]["object"])["name"] == repo_id
    index.refresh(conn, hf_cache)
    assert json.loads(conn.execute("SELECT object FROM models").fetchone()[0])["name"] == repo_id
    assert queries.get_meta(conn, index.OBJECT_SQL_KEY) == index.MODEL_OBJECT_SQL_NO_ALIASES


@pytest.mark.parametrize("ts", [0, 1_700_000_000.9, 4_102_444_800])
def test_timestamps_match_the_output_format(ts):
    from mlxk.output import iso_utc

    assert index.iso_utc(ts) == iso_utc(ts)


def test_size_counts_blobs_once_across_revisions(conn, model_factory, hf_cache):
    repo = model_factory.repo("mlx-community/tiny-chat")
    factory.add_revision(repo, {"notes.txt": b"twelve bytes"})
    index.refresh(conn, hf_cache)
    assert row_of(conn, repo.repo_id)["size_bytes"] == repo.size_bytes + len(b"twelve bytes")


# ---------------------------------------------------------------- one refresh, one transaction


def test_a_refresh_that_fails_halfway_leaves_the_index_as_it_was(tmp_path, model_factory, hf_cache,
                                                                 monkeypatch):
    """Deletes and upserts of one refresh land together or not at all: here the third row cannot be written (a value
    SQLite cannot bind, injected at the inspect seam), so the delete and the first upsert before it must roll back."""
    conn = db.connect(tmp_path / "mlxk" / "state.db")
    gone = model_factory.repo("mlx-community/gone")
    index.refresh(conn, hf_cache)
    shutil.rmtree(gone.repo_dir)
    model_factory.repo("mlx-community/a-good")
    model_factory.repo("mlx-community/b-broken")
    real_inspect = index.inspect

    def inspect(repo_id, path, signature=None):
        record = real_inspect(repo_id, path, signature)
        return {**record, "quantization": object()} if repo_id.endswith("b-broken") else record

    monkeypatch.setattr(index, "inspect", inspect)
    with pytest.raises(Exception, match="bind|type"):
        index.refresh(conn, hf_cache)
    reader = db.connect(tmp_path / "mlxk" / "state.db")
    try:
        assert queries.model_ids(reader) == ["mlx-community/gone"]
    finally:
        reader.close()
        conn.close()


# ---------------------------------------------------------------- mlx-lm changed since the verdicts


def _verdicts_with(conn, hf_cache, model_factory, *, signature: str, stamp: str) -> str:
    """A runtime verdict stored as if made with mlx-lm `signature`, and the install stamp then recorded."""
    repo = model_factory.repo("mlx-community/tiny-chat")
    index.refresh(conn, hf_cache, runtime=True)
    assert row_of(conn, repo.repo_id)["runtime_compatible"] is True
    conn.execute("UPDATE models SET runtime_fingerprint = fingerprint || ?", (f"|{signature}",))
    queries.set_meta(conn, index.SIGNATURE_KEY, signature)
    queries.set_meta(conn, index.STAMP_KEY, stamp)
    return repo.repo_id


def _installed_mlx_lm() -> tuple[str, int]:
    import importlib.util

    origin = importlib.util.find_spec("mlx_lm").origin
    return origin, os.stat(origin).st_mtime_ns


def test_mlx_lm_upgraded_in_place_sends_verdicts_back_to_pending(conn, model_factory, hf_cache):
    """pip upgrades mlx-lm where it was: same path, newer files. The stamp recorded before (that path, an older mtime)
    no longer holds, the version differs, so the verdicts made with the old one are pending again."""
    origin, mtime = _installed_mlx_lm()
    repo_id = _verdicts_with(conn, hf_cache, model_factory, signature="mlx-lm 0.0.1", stamp=f"{origin}:{mtime - 1}")
    result = index.refresh(conn, hf_cache)
    assert result.pending == [repo_id] and row_of(conn, repo_id)["runtime_compatible"] is None
    assert queries.get_meta(conn, index.STAMP_KEY) == f"{origin}:{mtime}"
    from mlxk.health import mlx_lm_signature

    assert queries.get_meta(conn, index.SIGNATURE_KEY) == mlx_lm_signature()


def test_files_touched_but_same_mlx_lm_keep_their_verdicts(conn, model_factory, hf_cache):
    from mlxk.health import mlx_lm_signature

    origin, mtime = _installed_mlx_lm()
    repo_id = _verdicts_with(conn, hf_cache, model_factory, signature=mlx_lm_signature(), stamp=f"{origin}:{mtime - 1}")
    assert index.refresh(conn, hf_cache).pending == []
    assert row_of(conn, repo_id)["runtime_compatible"] is True
    assert queries.get_meta(conn, index.STAMP_KEY) == f"{origin}:{mtime}"   # re-stamped: the next check is one stat


def test_an_unchanged_install_is_not_asked_again(conn, model_factory, hf_cache, monkeypatch):
    """The stamp holds (same file, same mtime): refresh trusts it and never computes the signature (~25 ms of
    importlib.metadata on every `list`)."""
    origin, mtime = _installed_mlx_lm()
    repo_id = _verdicts_with(conn, hf_cache, model_factory, signature="mlx-lm 0.0.1", stamp=f"{origin}:{mtime}")
    from mlxk import health

    monkeypatch.setattr(health, "mlx_lm_signature", lambda: pytest.fail("the signature was computed"))
    assert index.refresh(conn, hf_cache).pending == []
    assert row_of(conn, repo_id)["runtime_compatible"] is True


def test_a_file_added_or_removed_in_a_snapshot_subfolder_is_found(conn, model_factory, hf_cache):
    """QA F2: `sub/notes.txt` removed, `sub/more.bin` added: only `sub`'s mtime moves, not the snapshot's."""
    files = factory.tiny_model_files()
    files["sub/deeper/notes.txt"] = b"n" * 50_000
    repo = model_factory.write("org/nested", files)
    plain = model_factory.repo("org/plain")
    for folder in (repo.snapshot_dir / "sub", repo.snapshot_dir / "sub" / "deeper"):
        os.utime(folder, (1_000_000, 1_000_000))     # an old mtime, so the change below surely moves it
    index.refresh(conn, hf_cache)
    before = row_of(conn, repo.repo_id)["size_bytes"]
    assert cache.stamped_subdirs(row_of(conn, repo.repo_id)["fingerprint"]) == ["sub", "sub/deeper"]
    assert cache.stamped_subdirs(row_of(conn, plain.repo_id)["fingerprint"]) == []   # the common repo pays nothing
    assert index.refresh(conn, hf_cache).changed == []                                # unchanged stays unchanged

    (repo.snapshot_dir / "sub" / "deeper" / "notes.txt").unlink()
    result = index.refresh(conn, hf_cache)
    assert result.changed == [repo.repo_id]
    assert row_of(conn, repo.repo_id)["size_bytes"] == before - 50_000

    (repo.snapshot_dir / "sub" / "more.bin").write_bytes(b"\0" * 70_000)
    assert index.refresh(conn, hf_cache).changed == [repo.repo_id]
    assert row_of(conn, repo.repo_id)["size_bytes"] == before - 50_000 + 70_000


def test_a_preallocated_partial_download_counts_the_bytes_it_holds(conn, hf_cache):
    """QA F4: huggingface_hub preallocates `.incomplete` blobs sparse: disk bytes are what is allocated, and the
    reason says how far the download got ("partial (X of Y)")."""
    repo = factory.make_variant(hf_cache, "incomplete_download")
    partial = next((repo.repo_dir / "blobs").glob("*.incomplete"))
    with open(partial, "r+b") as fh:
        fh.truncate(66_000_000)                           # a sparse tail, never written
    st = partial.stat()
    if st.st_blocks * 512 >= st.st_size:
        pytest.skip("this filesystem does not keep files sparse")
    index.refresh(conn, hf_cache)
    row = row_of(conn, repo.repo_id)
    held = cache.allocated_bytes(st)
    assert held < 66_000_000
    other = cache.disk_usage(repo.repo_dir).size_bytes
    assert row["disk_bytes"] == other + held
    assert f"is partial ({human_size(held)} of 66.0 MB);" in row["reason"], row["reason"]


def test_the_runtime_check_reinspects_a_repo_edited_in_place(conn, model_factory, hf_cache):
    """QA F1(c): weights truncated in place after the row was made (no fingerprint moves): the runtime check inspects
    the repo again, so its verdict is unhealthy, never `healthy` with a reason about files the row does not hold."""
    repo = model_factory.repo("org/edited")
    index.refresh(conn, hf_cache)
    assert row_of(conn, repo.repo_id)["health"] == "healthy"
    weights = repo.blob_path("model.safetensors")
    before = {p: os.stat(p).st_mtime_ns for p in (repo.repo_dir / "blobs", repo.snapshot_dir)}
    os.truncate(weights, weights.stat().st_size - 1000)
    assert {p: os.stat(p).st_mtime_ns for p in before} == before   # nothing the fingerprint looks at moved
    index.refresh(conn, hf_cache, runtime=True)
    row = row_of(conn, repo.repo_id)
    assert row["health"] == "unhealthy" and row["runtime_compatible"] is None, row
    assert not index.changed_in_place(row)
