"""The test Hub server, driven by the real huggingface_hub client (and raw HTTP where the client hides things)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hubserver import git_blob_sha1

CONFIG = b'{"model_type": "llama", "hidden_size": 8}'


def api(hub, token=False) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=token)


def cache_of(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


def test_snapshot_download_writes_the_cache_layout(hub, tmp_path):
    repo_id = hub.unique_repo("org/tiny")
    weights = os.urandom(5000)
    sha = hub.add_repo(repo_id, {"config.json": CONFIG, "model.safetensors": weights, "sub/note.txt": b"hi"})
    hub.add_token("tok-alice", "alice")

    path = Path(snapshot_download(repo_id, endpoint=hub.endpoint, cache_dir=cache_of(tmp_path), token="tok-alice"))

    repo_dir = cache_of(tmp_path) / f"models--{repo_id.replace('/', '--')}"
    assert path == repo_dir / "snapshots" / sha
    assert (repo_dir / "refs" / "main").read_text() == sha
    assert (path / "config.json").read_bytes() == CONFIG
    assert (path / "model.safetensors").read_bytes() == weights
    assert (path / "sub" / "note.txt").read_bytes() == b"hi"
    # Regular blobs are named by git blob sha1, LFS blobs by sha256 (X-Linked-Etag).
    assert os.readlink(path / "config.json") == f"../../blobs/{git_blob_sha1(CONFIG)}"
    assert (repo_dir / "blobs" / hashlib.sha256(weights).hexdigest()).read_bytes() == weights
    assert json.loads((repo_dir / "trees" / f"{sha}.json").read_text())
    # The LFS body came from the CDN origin, which never saw the token; the Hub origin did.
    cdn = [r for r in hub.requests if r.origin == "cdn"]
    assert [r.method for r in cdn] == ["GET"] and cdn[0].token is None and cdn[0].bytes_sent == len(weights)
    assert all(r.token == "tok-alice" for r in hub.requests if r.origin == "hub")


def test_new_commit_updates_the_ref_and_old_commits_stay_reachable(hub, tmp_path):
    repo_id = hub.unique_repo("org/evolving")
    first = hub.add_repo(repo_id, {"config.json": b'{"v": 1}'})
    snapshot_download(repo_id, endpoint=hub.endpoint, cache_dir=cache_of(tmp_path), token=False)
    second = hub.add_repo(repo_id, {"config.json": b'{"v": 2}', "extra.txt": b"x"}, message="v2")

    path = Path(snapshot_download(repo_id, endpoint=hub.endpoint, cache_dir=cache_of(tmp_path), token=False))

    assert first != second and path.name == second
    assert (path / "config.json").read_bytes() == b'{"v": 2}'
    old = hf_hub_download(repo_id, "config.json", revision=first, endpoint=hub.endpoint,
                          cache_dir=cache_of(tmp_path), token=False)
    assert Path(old).read_bytes() == b'{"v": 1}'
    assert [c.title for c in api(hub).list_repo_commits(repo_id)][:2] == ["v2", "Upload files"]


def test_dropped_download_resumes_with_a_range_request(hub, tmp_path, monkeypatch):
    # The client resumes from whole DOWNLOAD_CHUNK_SIZE chunks; a small chunk keeps the file small.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    repo_id = hub.unique_repo("org/flaky")
    weights = os.urandom(1024 * 1024)
    hub.add_repo(repo_id, {"model.safetensors": weights})
    hub.faults.drop_after_bytes = 300_000

    path = hf_hub_download(repo_id, "model.safetensors", endpoint=hub.endpoint, cache_dir=cache_of(tmp_path),
                           token=False)

    assert Path(path).read_bytes() == weights
    first, second = [r for r in hub.requests if r.method == "GET" and r.origin == "cdn"]
    assert first.dropped and first.bytes_sent == 300_000 and first.range is None
    resumed_at = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 300_000 and resumed_at % (64 * 1024) == 0
    assert second.status == 206 and second.bytes_sent == len(weights) - resumed_at
    assert hub.faults.drop_after_bytes is None  # one shot


def test_corrupt_fault_serves_wrong_bytes_of_the_right_length(hub, tmp_path):
    repo_id = hub.unique_repo("org/corrupt")
    weights = os.urandom(4096)
    hub.add_repo(repo_id, {"model.safetensors": weights})
    hub.faults.corrupt = True

    data = Path(hf_hub_download(repo_id, "model.safetensors", endpoint=hub.endpoint,
                                cache_dir=cache_of(tmp_path), token=False)).read_bytes()

    assert len(data) == len(weights) and all(a != b for a, b in zip(data, weights))


def test_range_416_signature_and_injected_faults_over_raw_http(hub):
    repo_id = hub.unique_repo("org/raw")
    sha = hub.add_repo(repo_id, {"config.json": CONFIG, "model.safetensors": b"W" * 100})
    with httpx.Client(base_url=hub.endpoint) as http:
        part = http.get(f"/{repo_id}/resolve/main/config.json", headers={"Range": "bytes=2-5"})
        assert part.status_code == 206 and part.content == CONFIG[2:6]
        assert part.headers["content-range"] == f"bytes 2-5/{len(CONFIG)}"
        assert part.headers["x-repo-commit"] == sha and part.headers["etag"] == f'"{git_blob_sha1(CONFIG)}"'
        beyond = http.get(f"/{repo_id}/resolve/main/config.json", headers={"Range": f"bytes={len(CONFIG)}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(CONFIG)}"

        lfs = http.head(f"/{repo_id}/resolve/main/model.safetensors")
        assert lfs.status_code == 302 and lfs.headers["x-linked-size"] == "100"
        cdn_url = lfs.headers["location"]
        assert cdn_url.startswith(hub.cdn_endpoint)
        assert http.get(cdn_url, headers={"Range": "bytes=-10"}).content == b"W" * 10
        assert http.get(cdn_url.replace("sig=", "sig=0")).status_code == 403

        hub.faults.fail_status = {"/resolve/": 503}
        assert http.get(f"/{repo_id}/resolve/main/config.json").status_code == 503
        hub.faults.fail_status = {}
        hub.faults.rate_limit_bps = 400_000
        started = time.monotonic()
        assert http.get(cdn_url).content == b"W" * 100
        hub.add_repo(repo_id, {"big.txt": b"x" * 100_000})
        assert len(http.get(f"/{repo_id}/resolve/main/big.txt").content) == 100_000
        assert time.monotonic() - started >= 0.2  # 100 kB at 400 kB/s


@pytest.mark.parametrize("token, status", [(None, 401), ("tok-bob", 403)])
def test_gated_repo_needs_an_approved_token(hub, tmp_path, token, status):
    repo_id = hub.unique_repo("org/gated")
    hub.add_repo(repo_id, {"config.json": CONFIG}, gated=True)
    hub.add_token("tok-bob", "bob")
    hub.add_token("tok-carol", "carol", gated_access={repo_id})

    assert api(hub, token or False).model_info(repo_id).gated == "auto"  # info stays public
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download(repo_id, "config.json", endpoint=hub.endpoint, cache_dir=cache_of(tmp_path),
                        token=token or False)
    assert err.value.response.status_code == status
    path = hf_hub_download(repo_id, "config.json", endpoint=hub.endpoint, cache_dir=cache_of(tmp_path),
                           token="tok-carol")
    assert Path(path).read_bytes() == CONFIG


def test_private_and_missing_repos_look_the_same(hub, tmp_path):
    repo_id = hub.unique_repo("alice/secret")
    hub.add_repo(repo_id, {"config.json": CONFIG}, private=True)
    hub.add_token("tok-alice", "alice")
    hub.add_token("tok-bob", "bob")
    cases = [(repo_id, False, 401), (repo_id, "tok-bob", 404), ("org/never-made", False, 401),
             ("org/never-made", "tok-bob", 404)]
    for target, token, status in cases:
        with pytest.raises(RepositoryNotFoundError) as err:
            snapshot_download(target, endpoint=hub.endpoint, cache_dir=cache_of(tmp_path), token=token)
        assert err.value.response.status_code == status, (target, token)
    path = snapshot_download(repo_id, endpoint=hub.endpoint, cache_dir=cache_of(tmp_path), token="tok-alice")
    assert (Path(path) / "config.json").read_bytes() == CONFIG


def test_unknown_revision_missing_file_and_bad_token(hub, tmp_path):
    repo_id = hub.unique_repo("org/errors")
    sha = hub.add_repo(repo_id, {"config.json": CONFIG})
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="nope", endpoint=hub.endpoint, cache_dir=cache_of(tmp_path),
                          token=False)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.bin", endpoint=hub.endpoint, cache_dir=cache_of(tmp_path), token=False)
    repo_dir = cache_of(tmp_path) / f"models--{repo_id.replace('/', '--')}"
    assert (repo_dir / ".no_exist" / sha / "missing.bin").exists()  # X-Repo-Commit came with the 404
    with pytest.raises(HfHubHTTPError) as err:
        snapshot_download(repo_id, endpoint=hub.endpoint, cache_dir=cache_of(tmp_path), token="tok-forged")
    assert not isinstance(err.value, RepositoryNotFoundError)
    assert err.value.response.status_code == 401 and "Invalid credentials" in str(err.value)


def test_branch_names_with_slashes_route_through_percent_encoding(hub, tmp_path):
    repo_id = hub.unique_repo("org/branches")
    hub.add_repo(repo_id, {"config.json": CONFIG})
    sha = hub.add_repo(repo_id, {"config.json": b"{}"}, branch="feature/x")
    path = snapshot_download(repo_id, revision="feature/x", endpoint=hub.endpoint, cache_dir=cache_of(tmp_path),
                             token=False)
    assert Path(path).name == sha and (Path(path) / "config.json").read_bytes() == b"{}"
    refs = api(hub).list_repo_refs(repo_id)
    assert {b.name for b in refs.branches} == {"main", "feature/x"}


def test_push_round_trip_private_repo_with_lfs(hub, tmp_path):
    hub.add_token("tok-alice", "alice", orgs=["team"])
    repo_id = hub.unique_repo("team/pushed")
    client = api(hub, "tok-alice")
    url = client.create_repo(repo_id, private=True)
    assert url == f"{hub.endpoint}/{repo_id}"
    assert client.create_repo(repo_id, exist_ok=True) == url  # 409 carries the url
    folder = tmp_path / "upload"
    (folder / "nested").mkdir(parents=True)
    weights = os.urandom(200_000)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "README.md").write_text("---\nlibrary_name: mlx\ntags: [mlx]\n---\n# tiny\n")
    (folder / "nested" / "tokenizer.json").write_text("{}")

    info = client.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="push it")

    repo = hub.repo(repo_id)
    files = repo.files()
    assert repo.private and info.oid == repo.branches["main"]
    assert set(files) == {".gitattributes", "model.safetensors", "config.json", "README.md", "nested/tokenizer.json"}
    assert files["model.safetensors"].lfs and not files["config.json"].lfs
    assert repo.read("model.safetensors") == weights
    assert client.model_info(repo_id).library_name == "mlx"
    assert api(hub, "tok-alice").file_exists(repo_id, "nested/tokenizer.json")
    # Unchanged files are skipped through preupload's oid: no new commit.
    client.upload_folder(repo_id=repo_id, folder_path=folder)
    assert len(repo.history()) == 2
    back = Path(snapshot_download(repo_id, endpoint=hub.endpoint, cache_dir=cache_of(tmp_path), token="tok-alice"))
    assert (back / "model.safetensors").read_bytes() == weights
    assert (back / "nested" / "tokenizer.json").read_text() == "{}"
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(repo_id, endpoint=hub.endpoint, cache_dir=cache_of(tmp_path / "anon"), token=False)


def test_multipart_lfs_upload(hub, tmp_path):
    hub.add_token("tok-alice", "alice")
    hub.multipart_threshold, hub.multipart_chunk_size = 1024 * 1024, 512 * 1024
    repo_id = hub.unique_repo("alice/multipart")
    client = api(hub, "tok-alice")
    client.create_repo(repo_id)
    blob = os.urandom(1536 * 1024 + 7)

    client.upload_file(path_or_fileobj=blob, path_in_repo="model.safetensors", repo_id=repo_id)

    assert hub.repo(repo_id).read("model.safetensors") == blob
    parts = [r for r in hub.requests if r.origin == "cdn" and r.method == "PUT"]
    assert len(parts) == 4 and all(r.status == 200 for r in parts)
    assert [r.path.rsplit("/", 1)[-1] for r in hub.requests if r.origin == "cdn" and r.method == "POST"] == [
        "complete"]


def test_write_rules_permission_stale_parent_and_missing_lfs_object(hub):
    hub.add_token("tok-alice", "alice")
    hub.add_token("tok-bob", "bob")
    repo_id = hub.unique_repo("alice/guarded")
    first = hub.add_repo(repo_id, {"config.json": CONFIG})
    with pytest.raises(HfHubHTTPError) as err:
        api(hub, "tok-bob").upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert err.value.response.status_code == 403
    hub.add_repo(repo_id, {"config.json": b"{}"})
    with pytest.raises(HfHubHTTPError) as err:
        api(hub, "tok-alice").upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id,
                                          parent_commit=first)
    assert err.value.response.status_code == 412
    lines = [{"key": "header", "value": {"summary": "sneaky"}},
             {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "ab" * 32, "size": 3}}]
    reply = httpx.post(f"{hub.endpoint}/api/models/{repo_id}/commit/main",
                       content="".join(json.dumps(x) + "\n" for x in lines),
                       headers={"Authorization": "Bearer tok-alice", "Content-Type": "application/x-ndjson"})
    assert reply.status_code == 400 and "LFS pointer" in reply.json()["error"]
    assert len(hub.repo(repo_id).history()) == 2


def test_tree_pagination_and_paths_info(hub):
    hub.tree_page_size = 3
    repo_id = hub.unique_repo("org/many")
    hub.add_repo(repo_id, {f"d/f{i}.txt": b"%d" % i for i in range(7)})
    client = api(hub)

    listed = sorted(e.path for e in client.list_repo_tree(repo_id, recursive=True))

    assert listed == ["d"] + [f"d/f{i}.txt" for i in range(7)]
    assert len([r for r in hub.requests if "/tree/" in r.path]) == 3  # 8 entries, 3 per page
    infos = client.get_paths_info(repo_id, ["d/f1.txt", "d", "absent.txt"])
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "d/f1.txt"), ("RepoFolder", "d")]


def test_runs_as_a_module(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes(CONFIG)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "tests.hubserver", "--root", str(tmp_path / "root"),
                             "--repo", f"org/cli={src}"], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        endpoint = json.loads(proc.stdout.readline())["endpoint"]
        info = httpx.get(f"{endpoint}/api/models/org/cli").json()
        assert [s["rfilename"] for s in info["siblings"]] == ["config.json"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_account_refs_settings_and_dry_run(hub, tmp_path):
    hub.add_token("tok-alice", "alice", orgs=["team"])
    client = api(hub, "tok-alice")
    assert client.whoami()["name"] == "alice"
    repo_id = hub.unique_repo("team/admin")
    client.create_repo(repo_id)
    client.upload_file(path_or_fileobj=CONFIG, path_in_repo="config.json", repo_id=repo_id)
    client.create_branch(repo_id, branch="dev")
    client.create_tag(repo_id, tag="v1")
    refs = client.list_repo_refs(repo_id, include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1"]
    assert refs.pull_requests == []

    plan = snapshot_download(repo_id, revision="v1", dry_run=True, endpoint=hub.endpoint,
                             cache_dir=cache_of(tmp_path), token="tok-alice")
    assert {f.filename: f.file_size for f in plan if f.will_download}["config.json"] == len(CONFIG)

    client.update_repo_settings(repo_id, private=True)
    assert hub.repo(repo_id).private and not api(hub).repo_exists(repo_id)
    client.delete_repo(repo_id)
    assert not client.repo_exists(repo_id)
    gated = hub.unique_repo("org/gated-exists")
    hub.add_repo(gated, {"config.json": CONFIG}, gated="manual")
    assert api(hub).repo_exists(gated)


def test_client_hanging_up_stops_the_stream(hub):
    repo_id = hub.unique_repo("org/slow")
    size = 4 * 1024 * 1024
    hub.add_repo(repo_id, {"model.safetensors": b"\1" * size})
    hub.faults.rate_limit_bps = 1024 * 1024
    with httpx.Client(follow_redirects=True) as http:
        with http.stream("GET", f"{hub.endpoint}/{repo_id}/resolve/main/model.safetensors") as reply:
            next(reply.iter_raw(1024))
    deadline = time.monotonic() + 5
    while not [r for r in hub.requests if r.origin == "cdn"] and time.monotonic() < deadline:
        time.sleep(0.05)
    (record,) = [r for r in hub.requests if r.origin == "cdn"]
    assert record.aborted and 0 < record.bytes_sent < size


def test_subprocesses_inherit_the_hub_environment(hub, tmp_path):
    repo_id = hub.unique_repo("org/cli-download")
    sha = hub.add_repo(repo_id, {"config.json": CONFIG, "model.safetensors": b"w" * 1000})
    hf = Path(sys.executable).parent / "hf"
    done = subprocess.run([str(hf), "download", repo_id, "--cache-dir", str(cache_of(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    snapshot = cache_of(tmp_path) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha
    assert (snapshot / "config.json").read_bytes() == CONFIG and str(snapshot) in done.stdout
    # The hf CLI asks for /api/agent-harnesses even with telemetry off (terminal agent detection).
    assert {r.status for r in hub.requests} <= {200, 302}


def test_direct_lfs_mode_serves_lfs_bytes_at_resolve(hub, tmp_path):
    hub.lfs_mode = "direct"
    repo_id = hub.unique_repo("org/direct")
    weights = os.urandom(3000)
    hub.add_repo(repo_id, {"model.safetensors": weights})
    path = Path(snapshot_download(repo_id, endpoint=hub.endpoint, cache_dir=cache_of(tmp_path), token=False))
    assert (path / "model.safetensors").read_bytes() == weights
    assert os.readlink(path / "model.safetensors").endswith(hashlib.sha256(weights).hexdigest())
    assert not [r for r in hub.requests if r.origin == "cdn"]
