"""mlxk.hub.push against the test Hub with the real huggingface_hub client (LFS batch API, Xet off)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mlxk import errors
from mlxk import hub as hubmod   # `hub` is the test server fixture

TOKEN = "tok-writer"


def _workspace(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _model_files() -> dict[str, bytes]:
    weights = (hashlib.sha256(b"push").digest() * 40_000)[:1_200_000]
    return {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights,
            "README.md": b"---\nlibrary_name: mlx\n---\n# tiny\n", "sub/extra.txt": b"extra"}


def _push(server, workspace, repo_id, **kw):
    kw.setdefault("token", TOKEN)
    kw.setdefault("force", True)   # these workspaces hold random bytes as weights: they test the transport, not health
    return hubmod.push(workspace, repo_id, endpoint=server.endpoint, **kw)


@pytest.fixture
def writer(hub):
    hub.add_token(TOKEN, "writer")
    return hub


def test_push_round_trip_with_lfs_files(writer, tmp_path):
    files = _model_files()
    ws = _workspace(tmp_path / "ws", files)
    repo_id = writer.unique_repo("writer/tiny")
    result = _push(writer, ws, repo_id, private=True, message="first upload")

    assert result.created and result.private and not result.dry_run
    assert result.url == f"{writer.endpoint}/{repo_id}"
    assert result.bytes_uploaded == sum(len(b) for b in files.values())
    assert {s["path"]: (s["action"], s["lfs"]) for s in result.plan}["model.safetensors"] == ("upload", True)
    remote = writer.repo(repo_id)
    assert remote.private and remote.resolve("main").sha == result.revision
    assert remote.files()["model.safetensors"].lfs
    assert [r for r in writer.requests if "/info/lfs/objects/batch" in r.path]   # really went through LFS

    pulled = hubmod.pull(repo_id, cache_dir=tmp_path / "cache", endpoint=writer.endpoint, token=TOKEN)
    snap = pulled.snapshot_path
    back = {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()}
    back.pop(".gitattributes")    # the Hub writes one into every new repo
    assert back == files


def test_second_push_uploads_only_what_changed(writer, tmp_path):
    ws = _workspace(tmp_path / "ws", _model_files())
    repo_id = writer.unique_repo("writer/incr")
    first = _push(writer, ws, repo_id, private=True)
    same = _push(writer, ws, repo_id, private=True)
    assert same.revision == first.revision and same.bytes_uploaded == 0 and not same.created
    assert {s["action"] for s in same.plan} == {"unchanged"}

    (ws / "config.json").write_bytes(b'{"model_type": "llama", "v": 2}')
    writer.clear_requests()
    changed = _push(writer, ws, repo_id)          # an existing private repo needs no flag
    assert [s["path"] for s in changed.plan if s["action"] == "upload"] == ["config.json"]
    assert changed.revision != first.revision
    assert not [r for r in writer.requests if "/info/lfs/objects/batch" in r.path]
    assert writer.repo(repo_id).read("config.json") == b'{"model_type": "llama", "v": 2}'


def test_refuses_an_existing_public_repo_unless_public(writer, tmp_path):
    ws = _workspace(tmp_path / "ws", _model_files())
    repo_id = writer.unique_repo("writer/public")
    before = writer.add_repo(repo_id, {"config.json": b"{}"})
    with pytest.raises(errors.Conflict, match="PUBLIC.*--public"):
        _push(writer, ws, repo_id)
    with pytest.raises(errors.Conflict, match="PUBLIC"):
        _push(writer, ws, repo_id, private=True)
    assert writer.repo(repo_id).resolve("main").sha == before
    result = _push(writer, ws, repo_id, public=True)
    assert not result.private and not result.created and result.revision != before


def test_public_on_an_existing_private_repo_is_refused_not_ignored(writer, tmp_path):
    ws = _workspace(tmp_path / "ws", _model_files())
    repo_id = writer.unique_repo("writer/private")
    before = writer.add_repo(repo_id, {"config.json": b"{}"}, private=True)
    with pytest.raises(errors.Conflict, match=r"exists and is private.*--public would be ignored.*/settings"):
        _push(writer, ws, repo_id, public=True)
    with pytest.raises(errors.Conflict, match=r"exists and is private"):
        _push(writer, ws, repo_id, public=True, dry_run=True)
    assert writer.repo(repo_id).private and writer.repo(repo_id).resolve("main").sha == before
    result = _push(writer, ws, repo_id)    # no flag: it stays what it is
    assert result.private and writer.repo(repo_id).private


def test_a_workspace_check_only_rejects_is_refused_unless_forced(writer, tmp_path):
    from tests import factory

    files = factory.tiny_model_files()
    files["model.safetensors"] = files["model.safetensors"][:-100]      # truncated: the header says more
    ws = _workspace(tmp_path / "ws", files)
    repo_id = writer.unique_repo("writer/truncated")
    writer.clear_requests()
    with pytest.raises(errors.WorkspaceInvalid, match=r"not ready to push.*--force") as refused:
        _push(writer, ws, repo_id, private=True, force=False)
    assert refused.value.details["findings"][0]["rule"]
    assert writer.requests == [] or {r.method for r in writer.requests} <= {"GET"}
    with pytest.raises(KeyError):
        writer.repo(repo_id)
    result = _push(writer, ws, repo_id, private=True, force=True)
    assert result.created and writer.repo(repo_id).read("model.safetensors") == files["model.safetensors"]


def test_a_new_repo_needs_private_or_public(writer, tmp_path):
    ws = _workspace(tmp_path / "ws", _model_files())
    repo_id = writer.unique_repo("writer/new")
    with pytest.raises(errors.Conflict, match="--private"):
        _push(writer, ws, repo_id)
    with pytest.raises(KeyError):
        writer.repo(repo_id)


def test_dry_run_plans_against_the_remote_and_writes_nothing(writer, tmp_path):
    files = _model_files()
    ws = _workspace(tmp_path / "ws", files)
    new_id = writer.unique_repo("writer/dry")
    writer.clear_requests()
    plan = _push(writer, ws, new_id, private=True, dry_run=True)
    assert plan.dry_run and not plan.created and plan.revision is None and plan.bytes_uploaded == 0
    assert {s["action"] for s in plan.plan} == {"upload"}
    with pytest.raises(KeyError):
        writer.repo(new_id)

    existing = writer.unique_repo("writer/dry")
    sha = writer.add_repo(existing, {"config.json": files["config.json"], "model.safetensors": b"old"},
                          private=True)
    writer.clear_requests()
    plan = _push(writer, ws, existing, dry_run=True)
    actions = {s["path"]: s["action"] for s in plan.plan}
    assert actions == {"README.md": "upload", "config.json": "unchanged", "model.safetensors": "upload",
                       "sub/extra.txt": "upload"}
    assert plan.revision == sha and writer.repo(existing).resolve("main").sha == sha
    assert {r.method for r in writer.requests} == {"GET"}      # no create, preupload, LFS or commit call


def test_hfignore_excludes_files(writer, tmp_path):
    files = {**_model_files(), "train.log": b"x", "keep.log": b"k", "scratch/a.bin": b"a", "deep/scratch/b": b"b",
             "notes/draft.md": b"d", ".git/HEAD": b"ref"}
    ws = _workspace(tmp_path / "ws", files)
    (ws / ".hfignore").write_text("# local leftovers\n*.log\n!keep.log\nscratch/\n/notes/draft.md\n")
    repo_id = writer.unique_repo("writer/ignore")
    result = _push(writer, ws, repo_id, private=True)
    assert sorted(s["path"] for s in result.plan) == ["README.md", "config.json", "keep.log", "model.safetensors",
                                                      "sub/extra.txt"]
    assert sorted(writer.repo(repo_id).files()) == sorted([".gitattributes", *(s["path"] for s in result.plan)])


@pytest.mark.parametrize("token, words", [
    (None, ["needs a Hugging Face token", "HF_TOKEN", "hf auth login"]),
    ("wrong-token", ["rejected your token"]),
])
def test_token_problems_are_auth_errors(writer, tmp_path, token, words):
    ws = _workspace(tmp_path / "ws", _model_files())
    with pytest.raises(errors.AuthError) as raised:
        hubmod.push(ws, writer.unique_repo("writer/auth"), private=True, endpoint=writer.endpoint, token=token,
                    force=True)
    for word in words:
        assert word in raised.value.message


def test_token_comes_from_settings_when_not_given(writer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    ws = _workspace(tmp_path / "ws", _model_files())
    result = hubmod.push(ws, writer.unique_repo("writer/env"), private=True, endpoint=writer.endpoint, force=True)
    assert result.created


def test_check_workspace_reports_integrity_findings(tmp_path):
    from tests.factory import tiny_model_files

    good = _workspace(tmp_path / "good", tiny_model_files())
    assert hubmod.check_workspace(good) == []
    (good / "config.json").unlink()
    findings = hubmod.check_workspace(good)
    assert findings and "config.json" in findings[0].message
