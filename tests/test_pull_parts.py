"""A large file comes over several ranged connections at once (MLXK_PULL_CONNECTIONS), each part resumes exactly
where its bytes end after a kill -9, a server that ignores Range still works, and `max_rate` caps a pull's
bandwidth. Real HTTP against the test Hub on 127.0.0.1, real cache files; PART_SIZE is shrunk so a few MiB
split into parts (the only thing scaled down)."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlxk import errors
from mlxk import hub as hubmod   # `hub` is the test server fixture
from tests.fixtures.pause import wait_paused

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
PART = 1 * MiB


def _blob(size: int, seed: bytes = b"p") -> bytes:
    return (hashlib.sha256(seed).digest() * (size // 32 + 1))[:size]


def _repo(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _cdn(hub) -> list:
    return [r for r in hub.requests if r.method == "GET" and "/_cdn/" in r.path]


def _span(rng: str) -> tuple[int, int]:
    a, b = re.fullmatch(r"bytes=(\d+)-(\d+)", rng).groups()
    return int(a), int(b) + 1


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf" / "hub"


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(hubmod, "PART_SIZE", PART)


def test_a_large_file_comes_over_several_ranged_connections(hub, cache, small_parts):
    repo_id = hub.unique_repo("org/parts")
    weights = _blob(8 * MiB)
    hub.add_repo(repo_id, {"config.json": b"{}", "model.safetensors": weights})
    result = hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=4)
    assert (result.snapshot_path / "model.safetensors").read_bytes() == weights
    spans = sorted(_span(r.range) for r in _cdn(hub) if r.range)
    assert spans == [(i * MiB, (i + 1) * MiB) for i in range(8)]   # parts of PART_SIZE, four connections
    assert sum(r.bytes_sent for r in _cdn(hub)) == 8 * MiB   # each byte once
    assert not list((_repo(cache, repo_id) / "blobs").glob("*.incomplete*"))


def test_one_connection_when_asked(hub, cache, small_parts):
    repo_id = hub.unique_repo("org/single")
    hub.add_repo(repo_id, {"model.safetensors": _blob(4 * MiB)})
    hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=1)
    assert [r.range for r in _cdn(hub)] == [None]


def test_corrupt_parts_fail_the_sha256_check_and_leave_nothing(hub, cache, small_parts):
    repo_id = hub.unique_repo("org/partscorrupt")
    hub.add_repo(repo_id, {"model.safetensors": _blob(4 * MiB)})
    hub.faults.corrupt = True
    with pytest.raises(errors.IntegrityError, match="arrived corrupted.*sha256"):
        hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=4)
    assert not list((_repo(cache, repo_id) / "blobs").iterdir())


def test_a_server_that_ignores_range_still_gets_the_file_over_one_connection(hub, cache, small_parts):
    repo_id = hub.unique_repo("org/norange")
    weights = _blob(4 * MiB)
    hub.add_repo(repo_id, {"model.safetensors": weights})
    hub.faults.ignore_range = True
    result = hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=4)
    assert (result.snapshot_path / "model.safetensors").read_bytes() == weights
    assert not list((_repo(cache, repo_id) / "blobs").glob("*.incomplete*"))


def test_a_dropped_part_resumes_that_part_only(hub, cache, small_parts, monkeypatch):
    monkeypatch.setattr(hubmod, "RETRY_BACKOFF_S", (0,))
    repo_id = hub.unique_repo("org/partdrop")
    weights = _blob(4 * MiB)
    hub.add_repo(repo_id, {"model.safetensors": weights})
    hub.faults.drop_after_bytes, hub.faults.drop_match = 300_000, "/_cdn/"
    result = hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=2)
    assert (result.snapshot_path / "model.safetensors").read_bytes() == weights
    (dropped,) = [r for r in _cdn(hub) if r.dropped]
    start, end = _span(dropped.range)
    retry = [r for r in _cdn(hub) if r.range == f"bytes={start + dropped.bytes_sent}-{end - 1}"]
    assert len(retry) == 1
    assert sum(r.bytes_sent for r in _cdn(hub)) == len(weights)


_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from mlxk import hub
    hub.PART_SIZE = int(sys.argv[4])
    hub.pull(sys.argv[1], cache_dir=Path(sys.argv[2]), endpoint=sys.argv[3], connections=4)
""")


def test_kill_9_mid_part_resumes_every_part_exactly(hub, cache, isolated):
    """Killed at `pull.part` (each of the 4 connections has written the first chunk of its part): the rerun asks
    each part for exactly the bytes its record says are missing, and nothing recorded is fetched again."""
    repo_id = hub.unique_repo("org/partkill")
    size = 8 * MiB
    weights = _blob(size)
    hub.add_repo(repo_id, {"model.safetensors": weights})
    hub.faults.rate_limit_bps = 1 * MiB     # slow enough that every part is mid-way when paused
    env = dict(os.environ, MLXK_TEST_PAUSE_AT="pull.part")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, repo_id, str(cache), hub.endpoint, str(PART)],
                             cwd=ROOT, env=env)
    try:
        assert wait_paused(isolated, "pull.part", timeout_s=60) == child.pid
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    blobs = _repo(cache, repo_id) / "blobs"
    (partial,) = blobs.glob("*.incomplete")
    done = {p.start: p for p in hubmod._read_parts(hubmod._parts_path(partial), size)}
    kept = hubmod.partial_bytes(partial, size)
    assert len(done) == 8 and sum(1 for p in done.values() if 0 < p.done < p.end - p.start) == 4
    assert kept < size
    hub.faults.reset()
    time.sleep(0.5)                          # the server logs the abandoned requests
    hub.clear_requests()

    result = hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=4)
    assert (result.snapshot_path / "model.safetensors").read_bytes() == weights
    asked = sorted(_span(r.range) for r in _cdn(hub))
    assert asked == sorted((p.pos, p.end) for p in done.values() if p.pos < p.end)
    assert sum(r.bytes_sent for r in _cdn(hub)) == size - kept   # not one byte fetched twice
    assert result.bytes_downloaded == size - kept
    assert not list(blobs.glob("*.incomplete*"))


def test_a_torn_parts_record_is_ignored_and_the_prefix_kept(hub, cache, small_parts):
    repo_id = hub.unique_repo("org/torn")
    weights = _blob(4 * MiB)
    hub.add_repo(repo_id, {"model.safetensors": weights})
    sha256 = hashlib.sha256(weights).hexdigest()
    blobs = _repo(cache, repo_id) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha256}.incomplete").write_bytes(weights[:MiB // 2])
    (blobs / f"{sha256}.incomplete.parts").write_bytes(b"MLXKPRT1 torn")
    result = hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=1)
    assert (result.snapshot_path / "model.safetensors").read_bytes() == weights
    assert [r.range for r in _cdn(hub)] == [f"bytes={MiB // 2}-"]


@pytest.mark.parametrize("connections", [1, 4])
def test_max_rate_caps_the_whole_pull(hub, cache, small_parts, connections):
    repo_id = hub.unique_repo("org/capped")
    size = 4 * MiB
    hub.add_repo(repo_id, {"model.safetensors": _blob(size)})
    rate = 4 * MiB                      # 1 s of data at the cap; the 0.25 s burst allowance is the slack
    start = time.monotonic()
    hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=connections, max_rate=rate)
    took = time.monotonic() - start
    assert 0.7 <= took <= 3.0, took


@pytest.mark.parametrize("text, rate", [("20M", 20e6), ("20MB/s", 20e6), ("500k", 500e3), ("8MiB", 8 * MiB),
                                        ("1.5G", 1.5e9), ("0", 0.0), ("1000", 1000.0)])
def test_rates_parse(text, rate):
    from mlxk.config import parse_rate

    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "20X", "-5M", ""])
def test_bad_rates_name_the_accepted_forms(text):
    from mlxk.config import parse_rate

    with pytest.raises(ValueError, match="20M, 20MB/s, 500k or 8MiB"):
        parse_rate(text)


def test_cancel_during_parts_keeps_every_part_for_the_next_pull(hub, cache, small_parts):
    repo_id = hub.unique_repo("org/partcancel")
    weights = _blob(8 * MiB)
    hub.add_repo(repo_id, {"model.safetensors": weights})
    hub.faults.rate_limit_bps = 1 * MiB
    seen = []

    def should_stop():
        return bool(seen) and seen[-1] >= MiB

    with pytest.raises(errors.Cancelled, match="cancelled"):
        hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=4, should_stop=should_stop,
                    progress=lambda p: seen.append(p.bytes_done))
    (partial,) = (_repo(cache, repo_id) / "blobs").glob("*.incomplete")
    kept = hubmod.partial_bytes(partial, len(weights))
    assert 0 < kept < len(weights)
    hub.faults.reset()
    time.sleep(0.5)
    hub.clear_requests()
    result = hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=4)
    assert (result.snapshot_path / "model.safetensors").read_bytes() == weights
    assert sum(r.bytes_sent for r in _cdn(hub)) == len(weights) - kept


def test_a_full_disk_while_writing_a_part_is_disk_full_and_keeps_the_parts(hub, cache, small_parts, monkeypatch):
    import errno as errno_mod

    repo_id = hub.unique_repo("org/partfull")
    hub.add_repo(repo_id, {"model.safetensors": _blob(4 * MiB)})
    real_pwrite = os.pwrite
    writes = []

    def pwrite(fd, data, offset):
        if len(data) > 8:               # data, not the 8-byte records
            writes.append(offset)
            if len(writes) > 3:
                raise OSError(errno_mod.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(hubmod.os, "pwrite", pwrite)
    with pytest.raises(errors.DiskFull, match="filled up.*pull again"):
        hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=2)
    blobs = _repo(cache, repo_id) / "blobs"
    assert len(list(blobs.glob("*.incomplete"))) == 1 and len(list(blobs.glob("*.incomplete.parts"))) == 1


def test_the_last_parts_are_small_so_no_connection_finishes_alone():
    """Parts are taken in order: the file's last connections x PART_SIZE bytes come in TAIL_PART pieces, so the
    final round keeps every connection busy instead of one 16 MiB part running alone at one connection's rate."""
    size = 1024 * MiB
    parts = hubmod._plan_parts(size, 0, 8)
    assert parts[0].start == 0 and parts[-1].end == size
    assert all(a.end == b.start for a, b in zip(parts, parts[1:]))
    tail = [p for p in parts if p.start >= size - 8 * hubmod.PART_SIZE]
    assert {p.end - p.start for p in tail} == {hubmod.TAIL_PART}
    assert {p.end - p.start for p in parts[:-len(tail)]} == {hubmod.PART_SIZE}
    assert [p.index for p in parts] == list(range(len(parts)))
    one = hubmod._plan_parts(size, 0, 1)           # one connection has no tail to balance
    assert {p.end - p.start for p in one} == {hubmod.PART_SIZE}
    resumed = hubmod._plan_parts(size, 100 * MiB + 3, 8)   # a resumed prefix is one finished part
    assert resumed[0].end == resumed[0].done == 100 * MiB + 3 and resumed[-1].end == size
