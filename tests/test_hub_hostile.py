"""A hostile (or broken) Hub cannot touch the user's files: every path, oid and size of its file listing is checked
before pull writes anything, and nothing is ever created outside HF_HUB_CACHE.

The test Hub (tests/hubserver.py `serve_hostile`) adds raw entries to a repo's tree listing; mlxk.hub.pull, the same
code the pull job runs, talks to it over real HTTP. Each reproduction from issue 9 is one row of HOSTILE.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from mlxk import errors
from mlxk import hub as hubmod   # `hub` is the test server fixture
from tests.fixtures.cli import run_json
from tests.fixtures.jobs import repo_path

VICTIM = b"the user's own file, not the Hub's\n"
SECRET = b"api_key=do-not-upload\n"   # 22 bytes


def _safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 8


def _files() -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"version": "1.0"}',
            "model.safetensors": _safetensors()}


@pytest.fixture
def world(tmp_path):
    """The user's files around the cache: tmp/victim.txt, tmp/secret.txt, tmp/hf/hub (the cache)."""
    (tmp_path / "victim.txt").write_bytes(VICTIM)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    assert len(SECRET) == 22
    return tmp_path


def _outside(root: Path, cache: Path, home: Path) -> dict[str, tuple]:
    """Everything under `root` but the cache and MLXK_HOME (and the test's own worker logs): path -> (is a link,
    link target or bytes)."""
    seen = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d) not in (cache, home)]
        for name in names + [d for d in dirs if Path(folder, d).is_symlink()]:
            path = Path(folder, name)
            if path.parent == root and name.startswith("worker-") and name.endswith(".log"):
                continue
            link = path.is_symlink()
            seen[str(path.relative_to(root))] = (link, os.readlink(path) if link else path.read_bytes())
    return seen


# (id, entry builder: (hub, repo_id, world) -> raw tree entry or None for a replace-listing case, the file named)
HOSTILE = [
    ("dotdot", lambda h, r, w: h.hostile_entry(r, "../../../../../victim.txt", like="config.json"),
     "../../../../../victim.txt"),
    ("inner-dotdot", lambda h, r, w: h.hostile_entry(r, "a/../../x", like="config.json"), "a/../../x"),
    ("absolute", lambda h, r, w: h.hostile_entry(r, str(w / "victim.txt"), like="config.json"),
     "ABS"),
    ("nul", lambda h, r, w: h.hostile_entry(r, "notes\0.txt", like="config.json"), "notes\0.txt"),
    ("control", lambda h, r, w: h.hostile_entry(r, "notes\n.txt", like="config.json"), "notes\n.txt"),
    ("backslash", lambda h, r, w: h.hostile_entry(r, "..\\..\\victim.txt", like="config.json"),
     "..\\..\\victim.txt"),
    ("long-name", lambda h, r, w: h.hostile_entry(r, "n" * 304, like="config.json"), "n" * 304),
    ("through-a-file", lambda h, r, w: h.hostile_entry(r, "config.json/inner.txt", like="tokenizer.json"),
     "config.json/inner.txt"),
    ("listed-twice", lambda h, r, w: h.hostile_entry(r, "config.json", like="tokenizer.json"), "config.json"),
    ("empty-part", lambda h, r, w: h.hostile_entry(r, "a//b.txt", like="config.json"), "a//b.txt"),
    ("oid-to-local-file", lambda h, r, w: h.hostile_entry(r, "notes.txt", oid="../../../../secret.txt", size=22),
     "notes.txt"),
    ("oid-not-hex", lambda h, r, w: h.hostile_entry(r, "notes.txt", oid="zz" * 20, size=3), "notes.txt"),
    ("lfs-oid-to-local-file", lambda h, r, w: h.hostile_entry(
        r, "extra.safetensors", like="model.safetensors", lfs={"oid": "../../../../secret.txt", "size": 22}),
     "extra.safetensors"),
    ("negative-size", lambda h, r, w: h.hostile_entry(r, "notes.txt", like="config.json", size=-1), "notes.txt"),
    ("size-not-int", lambda h, r, w: h.hostile_entry(r, "notes.txt", like="config.json", size="12"), "notes.txt"),
    ("no-path", lambda h, r, w: h.hostile_entry(r, None, like="config.json"), None),
]


def _serve(hub, entry_of, world, *, cached_before: bool = False):
    """A repo whose listing carries the hostile entry; `cached_before`: an earlier, clean commit of it is already in
    the cache (so blobs/ exists, as in the reports: `blobs/../../..` then resolves)."""
    repo_id = hub.unique_repo("org/hostile")
    old = None
    if cached_before:
        old = hub.add_repo(repo_id, {**_files(), "README.md": b"# v1"})
        hubmod.pull(repo_id, cache_dir=Path(os.environ["HF_HUB_CACHE"]), endpoint=hub.endpoint)
    hub.add_repo(repo_id, _files())
    hub.serve_hostile(repo_id, [entry_of(hub, repo_id, world)])
    return repo_id, old


def _cache_state(repo_id: str) -> dict:
    root = repo_path(repo_id)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else p.is_dir() or p.read_bytes())
            for p in root.rglob("*") if ".lock" not in p.name}


@pytest.mark.parametrize("cached_before", [False, True], ids=["fresh", "cached-before"])
@pytest.mark.parametrize("case, entry_of, named", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_pull_refuses_a_hostile_listing_and_writes_nothing(hub, world, isolated, case, entry_of, named,
                                                            cached_before):
    cache = Path(os.environ["HF_HUB_CACHE"])
    repo_id, old = _serve(hub, entry_of, world, cached_before=cached_before)
    before, cached = _outside(world, cache, isolated), _cache_state(repo_id)
    hub.clear_requests()

    with pytest.raises(errors.InvalidHubReply) as raised:
        hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint)

    error = raised.value
    named = str(world / "victim.txt") if named == "ABS" else named
    assert error.type == "invalid_hub_reply"
    if named is not None:
        assert error.details["file"] == named and repr(named) in error.message, error.message
    assert "Nothing was written" in error.message
    # The user's files are untouched, nothing new exists outside the cache (lock files included).
    assert (world / "victim.txt").read_bytes() == VICTIM and not (world / "victim.txt").is_symlink()
    assert (world / "secret.txt").read_bytes() == SECRET
    assert _outside(world, cache, isolated) == before
    # Validation runs before the first write: the repo in the cache is exactly as it was (absent when fresh).
    assert _cache_state(repo_id) == cached
    assert bool(cached) == cached_before
    # No request for any file body was made.
    assert not [r for r in hub.requests if "/resolve/" in r.path or r.origin == "cdn"]


def test_the_original_reproductions_fail_and_list_never_calls_them_healthy(hub, world, isolated, worker):
    """Through the CLI and a real worker: each pull job fails with the typed error; `mlxk list --json` shows no
    trace of the first repo and the clean older commit of the second; `mlxk clone` copies that commit, no secret."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    before = _outside(world, cache, isolated)
    escape, _ = _serve(hub, HOSTILE[0][1], world)
    secret, old = _serve(hub, HOSTILE[10][1], world, cached_before=True)

    for repo_id, named in ((escape, "../../../../../victim.txt"), (secret, "notes.txt")):
        result, doc = run_json("pull", repo_id, "--wait")
        assert result.exit_code == 1, doc
        assert doc["error"]["code"] == "invalid_hub_reply" and repr(named) in doc["error"]["message"], doc
    # clone uses the healthy cached commit: the secret is nowhere in the workspace.
    result, doc = run_json("clone", secret, str(world / "workspace"), "--wait")
    assert result.exit_code == 0, doc
    workspace = {p.relative_to(world / "workspace").as_posix(): p.read_bytes()
                 for p in (world / "workspace").rglob("*") if p.is_file()}
    assert "notes.txt" not in workspace and SECRET not in workspace.values() and "README.md" in workspace

    result, doc = run_json("list")
    models = {m["name"]: m for m in doc["data"]["models"]}
    assert escape not in models   # nothing was written, not even its folder
    assert models[secret]["hash"] == old and models[secret]["health"] == "healthy", models[secret]["reason"]
    assert (world / "victim.txt").read_bytes() == VICTIM and not (world / "victim.txt").is_symlink()
    after = _outside(world, cache, isolated)
    assert {k: v for k, v in after.items() if not k.startswith("workspace/")} == before


def test_a_listing_that_is_not_a_list_of_objects_is_refused(hub, world):
    cache = Path(os.environ["HF_HUB_CACHE"])
    for entries in (["not an object"], [17]):
        repo_id = hub.unique_repo("org/garbled")
        hub.add_repo(repo_id, _files())
        hub.serve_hostile(repo_id, entries)
        with pytest.raises(errors.InvalidHubReply) as raised:
            hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint)
        assert "is not an object" in raised.value.message
        assert not repo_path(repo_id).exists()


def test_a_next_page_on_another_server_is_refused_before_the_token_goes_there(hub, world):
    hub.add_token("tok-dave", "dave")
    cache = Path(os.environ["HF_HUB_CACHE"])
    repo_id = hub.unique_repo("dave/paged")
    hub.add_repo(repo_id, _files(), private=True)
    hub.tree_page_size = 1
    hub.tree_next_endpoint = hub.cdn_endpoint   # another origin

    with pytest.raises(errors.InvalidHubReply) as raised:
        hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, token="tok-dave")

    assert "next page is on another server" in raised.value.message
    assert not [r for r in hub.requests if r.origin == "cdn"]
    assert not repo_path(repo_id).exists()


def test_a_paged_listing_from_the_hub_itself_still_pulls(hub):
    repo_id = hub.unique_repo("org/paged")
    hub.add_repo(repo_id, _files())
    hub.tree_page_size = 1
    result = hubmod.pull(repo_id, cache_dir=Path(os.environ["HF_HUB_CACHE"]), endpoint=hub.endpoint)
    assert result.files == len(_files()) and len([r for r in hub.requests if "/tree/" in r.path]) == len(_files())


def test_a_hostile_trees_json_left_in_the_cache_is_checked_too(hub, world):
    """trees/<sha>.json (ours or huggingface_hub's) saves the tree call: it is checked like the Hub's answer, and an
    invalid one is ignored (the Hub is asked again) and replaced."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    repo_id = hub.unique_repo("org/tree-json")
    sha = hub.add_repo(repo_id, _files())
    config = hub.repo(repo_id).files()["config.json"]
    tree = repo_path(repo_id) / "trees" / f"{sha}.json"
    tree.parent.mkdir(parents=True)
    tree.write_text(json.dumps({"format_version": 1, "files": {
        "../../../../victim.txt": {"size": config.size, "blob_id": config.oid}}}))

    result = hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint)

    assert (world / "victim.txt").read_bytes() == VICTIM and not (world / "victim.txt").is_symlink()
    assert sorted(p.name for p in result.snapshot_path.iterdir()) == sorted(_files())
    assert sorted(json.loads(tree.read_text())["files"]) == sorted(_files())
    assert [r for r in hub.requests if f"/tree/{sha}" in r.path]


def test_path_rules_accept_what_real_repos_use():
    for path in ("config.json", "sub/dir/model-00001-of-00002.safetensors", ".gitattributes", "a.b/c..d",
                 "ünïcode/名前.txt", "x" * 255):
        assert hubmod.path_problem(path) is None, path
