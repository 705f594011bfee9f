"""mlxk.hub.pull against the test Hub: typed preflight errors, resume (in-call and across a SIGKILL), verification,
cancel, stale updates, filters, disk checks and the partial-file sweep. Real HTTP on 127.0.0.1, real cache files."""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlxk import errors
from mlxk import hub as hubmod   # `hub` is the test server fixture

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def _files(weights: int = 300_000, seed: bytes = b"w") -> dict[str, bytes]:
    blob = (hashlib.sha256(seed).digest() * (weights // 32 + 1))[:weights]
    return {"config.json": b'{"model_type": "llama"}', "model.safetensors": blob,
            "tokenizer.json": b'{"version": "1.0"}', "sub/notes.txt": b"hello"}


def _pull(hub_server, cache, repo_id, **kw):
    return hubmod.pull(repo_id, cache_dir=cache, endpoint=hub_server.endpoint, **kw)


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf" / "hub"


def _repo_path(cache, repo_id):
    return cache / ("models--" + repo_id.replace("/", "--"))


def _snapshot_bytes(result) -> dict[str, bytes]:
    snap = result.snapshot_path
    return {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()}


def _settle(hub_server, timeout: float = 5.0) -> None:
    """Wait until the server has logged the abandoned CDN request (it notices the client left a bit later)."""
    deadline = time.monotonic() + timeout
    while not _gets(hub_server, "/_cdn/") and time.monotonic() < deadline:
        time.sleep(0.02)


def _gets(hub_server, needle: str):
    return [r for r in hub_server.requests if r.method == "GET" and needle in r.path]


def test_pull_writes_the_standard_layout_and_hf_sees_it_complete(hub, cache):
    repo_id = hub.unique_repo("org/tiny")
    files = _files()
    sha = hub.add_repo(repo_id, files)
    seen = []
    result = _pull(hub, cache, repo_id, progress=seen.append)

    assert (result.revision, result.ref, result.files, result.up_to_date) == (sha, "main", 4, False)
    assert result.bytes_downloaded == result.bytes_total == sum(len(b) for b in files.values())
    assert _snapshot_bytes(result) == files
    repo = _repo_path(cache, repo_id)
    assert (repo / "refs" / "main").read_text() == sha
    link = repo / "snapshots" / sha / "sub" / "notes.txt"
    assert link.is_symlink() and os.readlink(link) == "../../../blobs/" + hub.repo(repo_id).files()[
        "sub/notes.txt"].etag
    assert not list((repo / "blobs").glob("*.incomplete"))
    assert seen[-1].bytes_done == seen[-1].bytes_total and seen[-1].files_done == 4

    # huggingface_hub itself finds the snapshot complete: one revision call, no file requests.
    from huggingface_hub import snapshot_download

    hub.clear_requests()
    path = snapshot_download(repo_id, cache_dir=cache, endpoint=hub.endpoint, token=False)
    assert Path(path) == result.snapshot_path
    assert not [r for r in hub.requests if "/resolve/" in r.path or r.origin == "cdn"]


def test_second_pull_is_up_to_date_without_downloading(hub, cache):
    repo_id = hub.unique_repo("org/tiny")
    hub.add_repo(repo_id, _files())
    _pull(hub, cache, repo_id)
    hub.clear_requests()
    again = _pull(hub, cache, repo_id)
    assert again.up_to_date and again.bytes_downloaded == 0
    assert [r.path for r in hub.requests] == [f"/api/models/{repo_id}/revision/main"]


def test_private_repo_with_token_sends_auth_to_the_hub_but_not_to_the_cdn(hub, cache):
    hub.add_token("tok-alice", "alice")
    repo_id = hub.unique_repo("alice/private")
    hub.add_repo(repo_id, _files(), private=True)
    result = _pull(hub, cache, repo_id, token="tok-alice")
    assert result.files == 4
    cdn = [r for r in hub.requests if r.origin == "cdn"]
    assert cdn and all(r.token is None for r in cdn)
    assert all(r.token == "tok-alice" for r in hub.requests if r.origin == "hub")


@pytest.mark.parametrize("case, error, words", [
    ("missing", errors.RepoNotFound, ["was not found", "HF_TOKEN", "hf auth login"]),
    ("private", errors.RepoNotFound, ["was not found", "private", "HF_TOKEN"]),
    ("gated-anonymous", errors.GatedRepo, ["gated", "request access at http://", "HF_TOKEN"]),
    ("gated-not-approved", errors.GatedRepo, ["gated", "not been granted", "request access at http://"]),
    ("bad-token", errors.AuthError, ["rejected your token", "HF_TOKEN", "hf auth login"]),
    ("unknown-revision", errors.RevisionNotFound, ["revision 'nope' does not exist"]),
])
def test_preflight_errors_are_typed_and_write_nothing(hub, cache, case, error, words):
    hub.add_token("tok-bob", "bob")
    repo_id = hub.unique_repo("org/secret")
    kw = {}
    if case == "private":
        hub.add_repo(repo_id, _files(), private=True)
    elif case.startswith("gated"):
        hub.add_repo(repo_id, _files(), gated="manual")
        kw["token"] = "tok-bob" if case == "gated-not-approved" else None
    elif case == "bad-token":
        hub.add_repo(repo_id, _files())
        kw["token"] = "not-a-real-token"
    elif case == "unknown-revision":
        hub.add_repo(repo_id, _files())
        kw["revision"] = "nope"
    with pytest.raises(error) as raised:
        _pull(hub, cache, repo_id, **kw)
    for word in words:
        assert word in raised.value.message
    assert not cache.exists() or not any(cache.rglob("*")), list(cache.rglob("*"))


def test_gated_repo_with_access_pulls(hub, cache):
    hub.add_token("tok-carol", "carol", gated_access=[])
    repo_id = hub.unique_repo("org/gated")
    hub.add_token("tok-carol", "carol", gated_access=[repo_id])
    hub.add_repo(repo_id, _files(), gated="auto")
    assert _pull(hub, cache, repo_id, token="tok-carol").files == 4


def test_revisions_branch_tag_and_sha(hub, cache):
    repo_id = hub.unique_repo("org/revs")
    main_sha = hub.add_repo(repo_id, _files(seed=b"main"))
    dev_sha = hub.add_repo(repo_id, _files(seed=b"dev"), branch="dev")
    dev = _pull(hub, cache, repo_id, revision="dev")
    assert (dev.revision, dev.ref) == (dev_sha, "dev")
    assert (_repo_path(cache, repo_id) / "refs" / "dev").read_text() == dev_sha
    pinned = _pull(hub, cache, repo_id, revision=main_sha)
    assert (pinned.revision, pinned.ref) == (main_sha, main_sha)
    assert not (_repo_path(cache, repo_id) / "refs" / "main").exists()   # a sha pull pins no branch
    assert _snapshot_bytes(pinned)["model.safetensors"] == _files(seed=b"main")["model.safetensors"]


def test_include_and_exclude_patterns(hub, cache):
    repo_id = hub.unique_repo("org/filters")
    hub.add_repo(repo_id, _files())
    only_json = _pull(hub, cache, repo_id, include=["*.json"])
    assert sorted(_snapshot_bytes(only_json)) == ["config.json", "tokenizer.json"]
    assert not (_repo_path(cache, repo_id) / "trees").exists()   # a partial listing must not claim completeness
    rest = _pull(hub, cache, repo_id, exclude=["*.safetensors", "sub/"])
    assert sorted(_snapshot_bytes(rest)) == ["config.json", "tokenizer.json"]
    with pytest.raises(errors.HubError, match="no file"):
        _pull(hub, cache, repo_id, include="*.gguf")


def test_stale_repo_fetches_only_the_changed_file(hub, cache):
    repo_id = hub.unique_repo("org/stale")
    first = _files()
    hub.add_repo(repo_id, first)
    _pull(hub, cache, repo_id)
    new_sha = hub.add_repo(repo_id, {"config.json": b'{"model_type": "llama", "v": 2}'}, keep_existing=True)
    hub.clear_requests()
    result = _pull(hub, cache, repo_id)
    assert not result.up_to_date and result.revision == new_sha
    fetched = [r.path for r in hub.requests if "/resolve/" in r.path or r.origin == "cdn"]
    assert fetched == [f"/{repo_id}/resolve/{new_sha}/config.json"]
    assert result.bytes_downloaded == len(b'{"model_type": "llama", "v": 2}')
    assert (_repo_path(cache, repo_id) / "refs" / "main").read_text() == new_sha
    assert _snapshot_bytes(result)["model.safetensors"] == first["model.safetensors"]


def test_dropped_connection_resumes_within_the_call_with_range(hub, cache):
    repo_id = hub.unique_repo("org/drop")
    files = _files(weights=2 * MiB)
    hub.add_repo(repo_id, files)
    hub.faults.drop_after_bytes = 700_000
    hub.faults.drop_match = "/_cdn/"
    result = _pull(hub, cache, repo_id)
    assert _snapshot_bytes(result) == files
    cdn = _gets(hub, "/_cdn/")
    assert cdn[0].dropped and cdn[0].range is None
    assert cdn[1].range == f"bytes={cdn[0].bytes_sent}-" and cdn[0].bytes_sent > 0
    assert sum(r.bytes_sent for r in cdn) == len(files["model.safetensors"])


def test_connection_that_keeps_dropping_fails_clearly_and_keeps_the_partial(hub, cache, monkeypatch):
    monkeypatch.setattr(hubmod, "RETRY_BACKOFF_S", (0,))
    repo_id = hub.unique_repo("org/flaky")
    hub.add_repo(repo_id, _files(weights=2 * MiB))
    hub.faults.drop_after_bytes, hub.faults.drop_always, hub.faults.drop_match = 100_000, True, "/_cdn/"
    with pytest.raises(errors.HubError, match="failed 6 times.*the next pull resumes"):
        _pull(hub, cache, repo_id)
    partials = list((_repo_path(cache, repo_id) / "blobs").glob("*.incomplete"))
    assert len(partials) == 1 and partials[0].stat().st_size == 600_000
    assert not (_repo_path(cache, repo_id) / "refs").exists()
    hub.faults.reset()
    hub.clear_requests()
    _pull(hub, cache, repo_id)
    assert _gets(hub, "/_cdn/")[0].range == "bytes=600000-"


def test_wrong_bytes_of_the_right_length_raise_integrity_error_and_leave_no_blob(hub, cache):
    repo_id = hub.unique_repo("org/corrupt")
    files = _files()
    hub.add_repo(repo_id, files)
    hub.faults.corrupt = True
    with pytest.raises(errors.IntegrityError, match="arrived corrupted.*sha256"):
        _pull(hub, cache, repo_id)
    sha256 = hashlib.sha256(files["model.safetensors"]).hexdigest()
    blobs = _repo_path(cache, repo_id) / "blobs"
    assert not (blobs / sha256).exists() and not list(blobs.glob(sha256 + "*"))
    assert not (_repo_path(cache, repo_id) / "refs" / "main").exists()


def test_cancel_keeps_the_partial_and_a_later_pull_resumes(hub, cache):
    repo_id = hub.unique_repo("org/cancel")
    files = _files(weights=4 * MiB)
    hub.add_repo(repo_id, files)
    hub.faults.rate_limit_bps = 2 * MiB
    blobs = _repo_path(cache, repo_id) / "blobs"

    seen = []  # bytes received so far; writes to disk are batched, so the file size lags behind

    def should_stop():
        return bool(seen) and seen[-1] >= 256 * 1024

    with pytest.raises(errors.Cancelled, match="cancelled"):
        _pull(hub, cache, repo_id, should_stop=should_stop, progress=lambda p: seen.append(p.bytes_done))
    (partial,) = blobs.glob("*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < 4 * MiB
    hub.faults.reset()
    _settle(hub)
    hub.clear_requests()
    result = _pull(hub, cache, repo_id)
    assert _gets(hub, "/_cdn/")[0].range == f"bytes={kept}-"
    assert _snapshot_bytes(result) == files


_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from mlxk import hub
    hub.pull(sys.argv[1], cache_dir=Path(sys.argv[2]), endpoint=sys.argv[3])
""")


def test_resume_across_a_killed_process(hub, cache):
    repo_id = hub.unique_repo("org/killed")
    size = 6 * MiB
    files = _files(weights=size)
    hub.add_repo(repo_id, files)
    hub.faults.rate_limit_bps = 3 * MiB
    blobs = _repo_path(cache, repo_id) / "blobs"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, repo_id, str(cache), hub.endpoint], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # A small file's .incomplete is renamed into place between the glob and the stat: skip it.
            sizes = [hubmod._size_or_none(p) or 0 for p in blobs.glob("*.incomplete")] if blobs.exists() else []
            if sizes and max(sizes) >= size // 2:
                break
            assert child.poll() is None, "the child finished before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("the download never reached 50 %")
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    (partial,) = blobs.glob("*.incomplete")
    kept = partial.stat().st_size
    hub.faults.reset()
    _settle(hub)
    first_run = sum(r.bytes_sent for r in _gets(hub, "/_cdn/"))
    hub.clear_requests()

    result = _pull(hub, cache, repo_id)
    (resumed,) = _gets(hub, "/_cdn/")
    assert resumed.range == f"bytes={kept}-" and kept >= size // 2
    resent = first_run + resumed.bytes_sent - size
    assert resent <= size // 10, f"re-sent {resent} bytes"
    assert _snapshot_bytes(result) == files


def test_disk_space_is_checked_before_downloading(hub, cache, monkeypatch):
    """The seam: shutil.disk_usage (what hub._check_disk asks) is patched to report a nearly full disk."""
    import shutil

    repo_id = hub.unique_repo("org/big")
    hub.add_repo(repo_id, _files(weights=2 * MiB))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(errors.DiskFull) as raised:
        _pull(hub, cache, repo_id)
    assert "needs 2.1 MB more, but only 1.0 KB are free" in raised.value.message
    assert raised.value.details["needed_bytes"] == sum(len(b) for b in _files(weights=2 * MiB).values())
    assert not _repo_path(cache, repo_id).exists()


def test_enospc_while_writing_is_disk_full_and_keeps_the_partial(hub, cache, monkeypatch):
    """The seam: hub's `open` returns files whose write fails with ENOSPC after 1 MiB, as a full disk would."""
    repo_id = hub.unique_repo("org/enospc")
    hub.add_repo(repo_id, _files(weights=3 * MiB))

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if self.f.tell() + len(data) > MiB:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(hubmod, "open", lambda path, mode="r": FullDisk(open(path, mode)), raising=False)
    monkeypatch.setattr(hubmod, "CHUNK_SIZE", 256 * 1024)
    with pytest.raises(errors.DiskFull, match="filled up.*kept"):
        _pull(hub, cache, repo_id)
    (partial,) = (_repo_path(cache, repo_id) / "blobs").glob("*.incomplete")
    assert 0 < partial.stat().st_size <= MiB


def test_orphans_are_swept_and_a_huggingface_hub_orphan_is_continued(hub, cache):
    repo_id = hub.unique_repo("org/orphans")
    files = _files(weights=MiB)
    hub.add_repo(repo_id, files)
    blobs = _repo_path(cache, repo_id) / "blobs"
    blobs.mkdir(parents=True)
    sha256 = hashlib.sha256(files["model.safetensors"]).hexdigest()
    # What a killed `hf download` leaves: a unique-named partial of a wanted blob (a true prefix) ...
    (blobs / f"{sha256}.1a2b3c4d.incomplete").write_bytes(files["model.safetensors"][:300_000])
    # ... and leftovers of files no longer wanted, ours and huggingface_hub's.
    (blobs / ("e" * 64 + ".incomplete")).write_bytes(b"x" * 1000)
    (blobs / ("f" * 40 + ".9f8e7d6c.incomplete")).write_bytes(b"y" * 500)

    assert hubmod.sweep_partials(cache, repo_id, keep={"e" * 64}) == 500 + 300_000
    (blobs / f"{sha256}.1a2b3c4d.incomplete").write_bytes(files["model.safetensors"][:300_000])
    result = _pull(hub, cache, repo_id)
    assert _gets(hub, "/_cdn/")[0].range == "bytes=300000-"
    assert _snapshot_bytes(result) == files
    assert not list(blobs.glob("*.incomplete"))


def test_sweep_skips_a_partial_whose_download_is_running(cache):
    from filelock import FileLock

    repo_id = "org/locked"
    blobs = _repo_path(cache, repo_id) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / ("a" * 64 + ".12345678.incomplete")).write_bytes(b"z" * 10)
    lock_path = cache / ".locks" / "models--org--locked" / ("a" * 64 + ".lock")
    lock_path.parent.mkdir(parents=True)
    with FileLock(str(lock_path)):
        code = ("import sys; from pathlib import Path; from mlxk import hub; "
                "print(hub.sweep_partials(Path(sys.argv[1]), 'org/locked'))")
        out = subprocess.run([sys.executable, "-c", code, str(cache)], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    assert out.strip() == "0" and len(list(blobs.glob("*.incomplete"))) == 1
    assert hubmod.sweep_partials(cache, repo_id) == 10


def test_remote_revision(hub):
    repo_id = hub.unique_repo("org/rev")
    sha = hub.add_repo(repo_id, _files())
    assert hubmod.remote_revision(repo_id, endpoint=hub.endpoint) == sha
    with pytest.raises(errors.RepoNotFound):
        hubmod.remote_revision(repo_id + "x", endpoint=hub.endpoint)
