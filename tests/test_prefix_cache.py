"""The prompt-prefix KV cache on disk (workers/inference/prefixcache.py): the store itself, then the engine on it."""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlxk.workers.inference.engine import Engine
from mlxk.workers.inference.prefixcache import PrefixCache, chain, model_dir
from mlxk.workers.inference.protocol import GenerateRequest, ModelRef, Params
from tests import factory

B = 4          # tokens per block in these tests
KEY = "org/model@" + "a" * 40
OTHER_REVISION = "org/model@" + "b" * 40


@pytest.fixture(scope="module", autouse=True)
def no_compile_off_main_thread():
    """As in test_inference_engine: the engine thread is not the main thread (ml-explore/mlx#3126)."""
    mx.disable_compile()
    yield
    mx.enable_compile()


def kv(n: int, *, layers: int = 2, seed: int = 0, dtype=mx.float16) -> list:
    """A per-layer KVCache list holding n tokens of made-up keys and values (batch 1, 2 heads, dim 8)."""
    mx.random.seed(seed)
    out = []
    for _ in range(layers):
        c = KVCache()
        c.update_and_fetch(mx.random.normal((1, 2, n, 8)).astype(dtype), mx.random.normal((1, 2, n, 8)).astype(dtype))
        out.append(c)
    return out


def make(root: Path, max_bytes: int = 1 << 30, **kwargs) -> PrefixCache:
    return PrefixCache(root, max_bytes, block_tokens=B, min_tokens=kwargs.pop("min_tokens", 2 * B), **kwargs)


def blocks(root: Path) -> list[Path]:
    return sorted(root.rglob("d*-*.safetensors"))


def stored(root: Path, tokens: list[int], cache: list, key: str = KEY, **kwargs) -> PrefixCache:
    store = make(root, **kwargs)
    store.store(key, tokens, cache)
    assert store.flush()
    store.close()
    return store


def same(a: list, b: list, n: int) -> bool:
    return all(mx.array_equal(x.keys[..., :n, :], y.keys[..., :n, :]).item()
               and mx.array_equal(x.values[..., :n, :], y.values[..., :n, :]).item() for x, y in zip(a, b))


# ---- the store -----------------------------------------------------------------------------------------------


def test_a_new_process_restores_the_longest_stored_prefix(tmp_path):
    tokens, cache = list(range(100, 114)), kv(14)
    stored(tmp_path, tokens, cache)
    assert len(blocks(tmp_path)) == 3                       # 14 tokens: three whole blocks of 4
    assert all(p.parent == model_dir(tmp_path, KEY) for p in blocks(tmp_path))
    fresh = make(tmp_path)                                  # a restart: only the files remain
    restored, n = fresh.lookup(KEY, tokens + [1, 2, 3])
    assert n == 12 and len(restored) == 2 and all(type(c) is KVCache and c.offset == 12 for c in restored)
    assert all(c.keys.shape == c.values.shape == (1, 2, 12, 8) for c in restored)
    assert same(restored, cache, 12)
    s = fresh.stats()
    assert (s["lookups"], s["hits"], s["restored_tokens"], s["entries"], s["hit_ratio"]) == (1, 1, 12, 3, 1.0)


def test_a_prompt_sharing_the_first_blocks_gets_those_and_another_model_gets_nothing(tmp_path):
    tokens = list(range(100, 116))
    stored(tmp_path, tokens, kv(16))
    fresh = make(tmp_path)
    other_turn = tokens[:9] + [7, 7, 7, 7, 7, 7, 7]         # same first 9 tokens, another "user turn"
    assert fresh.lookup(KEY, other_turn)[1] == 8
    assert fresh.lookup("org/another@" + "a" * 40, tokens) is None
    assert fresh.lookup(KEY, [1] + tokens[1:]) is None       # the chain breaks at the first block


def test_at_least_one_token_is_left_to_feed_and_memory_hits_skip_the_disk(tmp_path):
    tokens = list(range(100, 116))
    stored(tmp_path, tokens, kv(16))
    fresh = make(tmp_path)
    assert fresh.lookup(KEY, tokens)[1] == 12               # exactly 16 stored, 15 may be restored: 3 whole blocks
    assert fresh.lookup(KEY, tokens + [5], have=16) is None  # the memory tier already gave more
    assert fresh.stats()["lookups"] == 1                    # ...and the disk was not even consulted


def test_short_prompts_are_neither_stored_nor_looked_up(tmp_path):
    store = stored(tmp_path, list(range(7)), kv(7))          # min_tokens 8
    assert blocks(tmp_path) == []
    assert store.lookup(KEY, list(range(7))) is None and store.stats()["lookups"] == 0


def test_blocks_already_on_disk_are_not_written_again(tmp_path):
    tokens = list(range(100, 116))
    stored(tmp_path, tokens[:12], kv(12))
    store = stored(tmp_path, tokens, kv(16))
    assert store.stats()["writes"] == 1 and len(blocks(tmp_path)) == 4


def test_other_revisions_of_the_repo_are_deleted_and_never_matched(tmp_path):
    tokens = list(range(100, 116))
    stored(tmp_path, tokens, kv(16), key=OTHER_REVISION)
    stored(tmp_path, tokens, kv(16), key="org/keep@" + "c" * 40)
    old_dir = model_dir(tmp_path, OTHER_REVISION)
    assert old_dir.is_dir()
    fresh = make(tmp_path)
    assert fresh.lookup(KEY, tokens) is None
    assert fresh.flush()
    assert not old_dir.exists()                             # the new revision of org/model dropped the old one
    assert model_dir(tmp_path, "org/keep@" + "c" * 40).is_dir()   # other repos are left alone
    assert fresh.stats()["entries"] == 4


def test_the_byte_bound_evicts_the_least_recently_used_chain(tmp_path):
    a, b, c = ([seed] * 8 for seed in (1, 2, 3))
    one_block = None
    store = make(tmp_path)
    store.store(KEY, a, kv(8, seed=1))
    store.flush()
    one_block = store.stats()["bytes"] // 2
    store.close()
    store = make(tmp_path, max_bytes=4 * one_block + one_block // 2)   # room for two chains of two blocks
    store.store(KEY, b, kv(8, seed=2))
    store.flush()
    assert store.lookup(KEY, a + [0]) is not None            # a used again: b is now the least recent
    store.store(KEY, c, kv(8, seed=3))
    store.flush()
    s = store.stats()
    assert s["evictions"] == 2 and s["bytes"] <= s["max_bytes"] and s["entries"] == 4
    fresh = make(tmp_path, max_bytes=4 * one_block + one_block // 2)   # the order survives a restart (mtimes)
    assert fresh.lookup(KEY, b + [0]) is None
    assert fresh.lookup(KEY, a + [0])[1] == 8 and fresh.lookup(KEY, c + [0])[1] == 8


def test_eviction_takes_a_chains_deepest_block_first(tmp_path):
    store = stored(tmp_path, list(range(12)), kv(12))
    one = store.stats()["bytes"] // 3
    fresh = make(tmp_path, max_bytes=2 * one + one // 2)
    fresh.store(KEY, [9] * 8, kv(8, seed=4))                 # a newer chain pushes the old one out, deepest first
    fresh.flush()
    depths = sorted(p.name.split("-")[0] for p in model_dir(tmp_path, KEY).glob("d*"))
    assert fresh.stats()["bytes"] <= fresh.max_bytes
    assert fresh.lookup(KEY, [9] * 8 + [0])[1] == 8 and depths == ["d0", "d1"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])


def _flip_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_header_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(b"checksum") + 20
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_data_byte, _flip_header_byte])
def test_a_torn_or_altered_block_is_skipped_and_deleted(tmp_path, damage, caplog):
    tokens = list(range(100, 116))
    stored(tmp_path, tokens, kv(16))
    second = next(p for p in blocks(tmp_path) if p.name.startswith("d1-"))
    damage(second)
    fresh = make(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mlxk.inference.prefixcache"):
        restored, n = fresh.lookup(KEY, tokens)
    assert n == 4                                           # the first block only: the chain ends at the damage
    assert not second.exists() and fresh.stats()["corrupt"] == 1
    assert "deleting prompt-cache block" in caplog.text
    assert fresh.lookup(KEY, tokens)[1] == 4 and fresh.stats()["corrupt"] == 1   # gone from the index too


def test_a_block_deleted_behind_its_back_is_a_miss(tmp_path):
    tokens = list(range(100, 116))
    stored(tmp_path, tokens, kv(16))
    fresh = make(tmp_path)
    shutil.rmtree(tmp_path / "org--model")
    assert fresh.lookup(KEY, tokens) is None
    assert fresh.stats()["corrupt"] == 0 and fresh.stats()["entries"] == 3   # the chain's head left the index


def test_zero_bytes_writes_nothing(tmp_path):
    root = tmp_path / "prefix-cache"
    store = PrefixCache(root, 0, block_tokens=B, min_tokens=B)
    store.store(KEY, list(range(16)), kv(16))
    assert store.lookup(KEY, list(range(17))) is None
    assert not root.exists() and store.stats()["enabled"] is False


def test_an_unwritable_home_turns_the_tier_off_with_a_log_line(tmp_path, caplog):
    (tmp_path / "home").write_text("a file where the directory should be")
    with caplog.at_level(logging.WARNING, logger="mlxk.inference.prefixcache"):
        store = make(tmp_path / "home" / "prefix-cache")
    assert store.stats()["enabled"] is False
    assert "prompt-prefix cache on disk is off: cannot write" in caplog.text
    store.store(KEY, list(range(16)), kv(16))
    assert store.lookup(KEY, list(range(17))) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_home_turns_the_tier_off(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o555)
    try:
        assert make(home / "prefix-cache").stats()["enabled"] is False
    finally:
        home.chmod(0o755)


def test_a_write_failing_later_turns_writing_off(tmp_path, caplog):
    root = tmp_path / "prefix-cache"
    store = make(root)
    shutil.rmtree(root)
    root.write_text("not a directory any more")
    with caplog.at_level(logging.WARNING, logger="mlxk.inference.prefixcache"):
        store.store(KEY, list(range(16)), kv(16))
        assert store.flush()
    assert store.stats()["enabled"] is False and "writing to" in caplog.text
    store.close()


def test_stale_temp_files_go_and_foreign_files_stay(tmp_path):
    stored(tmp_path, list(range(16)), kv(16))
    directory = model_dir(tmp_path, KEY)
    stale, fresh_temp, foreign = (directory / ".x.1.tmp.safetensors", directory / ".x.2.tmp.safetensors",
                                  directory / "notes.txt")
    for path in (stale, fresh_temp, foreign):
        path.write_text("x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    store = make(tmp_path)
    assert not stale.exists() and fresh_temp.exists() and foreign.exists()
    assert store.stats()["entries"] == 4


def test_chain_hashes_depend_on_every_token_before_them():
    a = chain(KEY, [1, 2, 3, 4, 5, 6, 7, 8], 2, 4)
    b = chain(KEY, [1, 2, 3, 4, 5, 6, 7, 9], 2, 4)
    c = chain(KEY, [0, 2, 3, 4, 5, 6, 7, 8], 2, 4)
    assert a[0] == b[0] and a[1] != b[1] and c[0] != a[0] and c[1] != a[1]
    assert chain(OTHER_REVISION, [1, 2, 3, 4], 1, 4) != chain(KEY, [1, 2, 3, 4], 1, 4)
    assert chain(KEY, [1, 2, 3, 4, 5, 6, 7, 8], 2, 4) == a and all(len(h) == 32 for h in a)


def test_model_dir_keeps_odd_names_inside_the_root(tmp_path):
    for key in ("../../etc@x", "org/name@../..", "a/b@" + "f" * 40):
        assert tmp_path in model_dir(tmp_path, key).parents


# ---- the engine on it --------------------------------------------------------------------------------------------

SYSTEM = " ".join(f"rule {i}: answer briefly and politely." for i in range(12))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ModelRef:
    repo = factory.write_repo(tmp_path_factory.mktemp("hub"), "mlx-community/tiny-chat", factory.tiny_model_files())
    return ModelRef(f"{repo.repo_id}@{repo.revision}", str(repo.snapshot_dir))


def ask(engine: Engine, ref: ModelRef, user: str) -> list[dict]:
    request = GenerateRequest(id="t", model=ref, kind="chat", params=Params(max_tokens=12, temperature=0),
                              messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
    ticket = engine.submit(request)
    events = []
    while not events or events[-1]["event"] not in ("done", "error"):
        events.append(ticket.events.get(timeout=60))
    return events


def text(events: list[dict]) -> str:
    return "".join(e.get("content", "") for e in events if e["event"] == "delta")


def test_a_fresh_engine_restores_the_prefix_from_disk_and_answers_the_same(tmp_path, tiny):
    root = tmp_path / "prefix-cache"
    first = Engine(prefix_cache=PrefixCache(root, 1 << 30, block_tokens=16, min_tokens=32)).start()
    try:
        cold = ask(first, tiny, "hello")
        assert cold[0]["event"] == "accepted" and cold[0]["cached_tokens"] == 0 and cold[0]["prompt_tokens"] > 64
        first.prefix_cache.flush()
    finally:
        first.stop()
    assert blocks(root)
    second = Engine(prefix_cache=PrefixCache(root, 1 << 30, block_tokens=16, min_tokens=32)).start()
    try:
        warm = ask(second, tiny, "hello")
        assert warm[0]["cached_tokens"] >= 48
        assert text(warm) == text(cold)
        other = ask(second, tiny, "something else entirely")      # same system prompt, another user turn
        assert other[0]["cached_tokens"] >= 48
        status = second.status()["prefix_cache"]
        assert status["hits"] >= 1 and status["bytes"] > 0 and status["enabled"] is True
    finally:
        second.stop()


def test_an_engine_without_a_disk_tier_reports_none(tiny):
    e = Engine().start()
    try:
        assert "prefix_cache" not in e.status()
    finally:
        e.stop()


# ---- the setting ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [("0", 0), ("10G", 10 * 10**9), ("500MB", 500 * 10**6),
                                           ("8GiB", 8 * 2**30), ("123456", 123456), (" 1.5g ", 1_500_000_000)])
def test_the_size_setting(monkeypatch, raw, expected):
    from mlxk.config import settings

    monkeypatch.setenv("MLXK_PREFIX_CACHE_BYTES", raw)
    assert settings().prefix_cache_bytes == expected
    monkeypatch.delenv("MLXK_PREFIX_CACHE_BYTES")
    assert settings().prefix_cache_bytes == 10 * 10**9
    assert settings().prefix_cache_dir == settings().home / "prefix-cache"


@pytest.mark.parametrize("raw", ["lots", "10G/s", "-1", "1e9"])
def test_a_bad_size_setting_names_the_variable_and_the_forms(monkeypatch, raw):
    from mlxk.config import settings
    from mlxk.errors import ConfigError

    monkeypatch.setenv("MLXK_PREFIX_CACHE_BYTES", raw)
    with pytest.raises(ConfigError, match=r"MLXK_PREFIX_CACHE_BYTES: .* is not a size: give bytes like 10G"):
        settings()


# ---- the writer thread ------------------------------------------------------------------------------------------


def test_files_are_written_on_the_writer_thread_not_the_caller(tmp_path, monkeypatch):
    import threading

    from mlxk.workers.inference import prefixcache

    writers = []
    real = prefixcache.save_prompt_cache
    monkeypatch.setattr(prefixcache, "save_prompt_cache",
                        lambda *a, **k: (writers.append(threading.current_thread().name), real(*a, **k)))
    store = make(tmp_path)
    store.store(KEY, list(range(16)), kv(16))
    store.flush()
    assert writers == ["mlxk-prefix-cache"] * 4
    store.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="per-thread nice values are read from Linux's /proc")
def test_the_writer_runs_at_a_lower_priority_than_decoding_and_the_caller_keeps_its_own(tmp_path):
    """Linux keeps a nice value per thread: the writer's is raised by WRITER_NICE, the MLX thread's is untouched."""
    from mlxk.workers.inference import prefixcache

    def nice(tid: int) -> int:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[16])   # field 19 of proc(5), counted after the command name

    import threading

    mine = nice(threading.get_native_id())
    store = make(tmp_path)
    store.store(KEY, list(range(16)), kv(16))
    store.flush()
    try:
        assert store.writer_tid is not None
        assert nice(store.writer_tid) == min(19, mine + prefixcache.WRITER_NICE)
        assert nice(threading.get_native_id()) == mine
    finally:
        store.close()


def test_a_writer_that_is_behind_drops_stores_instead_of_blocking(tmp_path, monkeypatch):
    import threading

    from mlxk.workers.inference import prefixcache

    release = threading.Event()
    real = prefixcache.save_prompt_cache
    monkeypatch.setattr(prefixcache, "save_prompt_cache", lambda *a, **k: (release.wait(30), real(*a, **k)))
    store = make(tmp_path)
    for seed in range(prefixcache.WRITE_QUEUE + 3):     # the first is being written, the queue holds WRITE_QUEUE
        store.store(KEY, [seed + 1000] * 8, kv(8, seed=seed))
    assert store.stats()["dropped"] >= 2
    release.set()
    assert store.flush()
    s = store.stats()
    assert s["writes"] == 2 * (prefixcache.WRITE_QUEUE + 3 - s["dropped"])
    dropped_seed = prefixcache.WRITE_QUEUE + 2
    store.store(KEY, [dropped_seed + 1000] * 8, kv(8, seed=dropped_seed))   # a dropped prefix can be stored later
    assert store.flush() and store.lookup(KEY, [dropped_seed + 1000] * 8 + [0])[1] == 8
    store.close()


def test_a_failing_lookup_or_store_is_logged_and_costs_only_the_hit(tmp_path, monkeypatch, caplog):
    from mlxk.workers.inference import prefixcache

    store = stored(tmp_path, list(range(16)), kv(16))
    fresh = make(tmp_path)

    def boom(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(prefixcache, "chain", boom)
    with caplog.at_level(logging.ERROR, logger="mlxk.inference.prefixcache"):
        assert fresh.lookup(KEY, list(range(17))) is None
        fresh.store(KEY, list(range(16)), kv(16))
    assert "lookup for org/model@" in caplog.text and "store for org/model@" in caplog.text
    assert store.stats()["writes"] == 4 and fresh.stats()["writes"] == 0
    fresh.close()


# ---- pinned facts (mutation testing found these unasserted) --------------------------------------------------------


def test_block_names_are_stable_across_versions_and_machines():
    """The file names are the cache's on-disk format: a change would orphan every block users have on disk."""
    assert chain("org/model@" + "a" * 40, [1, 2, 3, 4, 70000, 6, 7, 8], 2, 4) == [
        "0db7bd2b06edef1ff2d6eb89ef2ab59f", "8f10b41468edc048de1ae4f6385465a6"]


def test_a_hit_touches_its_files_so_the_lru_order_survives_a_restart(tmp_path):
    tokens = list(range(100, 116))
    stored(tmp_path, tokens, kv(16))
    for path in blocks(tmp_path):
        os.utime(path, (1000, 1000))
    store = make(tmp_path)
    assert store.lookup(KEY, tokens)[1] == 12
    assert store.flush()
    touched = {p.name.split("-")[0]: p.stat().st_mtime for p in blocks(tmp_path)}
    assert touched["d3"] == 1000 and all(touched[d] > 1000 for d in ("d0", "d1", "d2"))
    store.close()


def test_close_ends_the_writer_thread(tmp_path):
    store = make(tmp_path)
    thread = store._thread
    assert thread.is_alive()
    store.close()
    assert not thread.is_alive() and store._thread is None
    assert store.flush()                                   # nothing left to wait for


def test_a_prompt_of_exactly_min_tokens_is_looked_up(tmp_path):
    tokens = list(range(100, 116))
    stored(tmp_path, tokens, kv(16))
    assert make(tmp_path).lookup(KEY, tokens[:8])[1] == 4        # min_tokens 8: 8 tokens count, 7 do not


def test_a_directory_exactly_at_the_bound_keeps_everything(tmp_path):
    store = stored(tmp_path, list(range(8)), kv(8))
    exact = make(tmp_path, max_bytes=store.stats()["bytes"])
    exact.store(KEY, list(range(8)), kv(8))                       # nothing new, nothing evicted
    exact.store(KEY, list(range(7)) + [99], kv(8, seed=5))        # a new block of the same size goes past the bound
    assert exact.flush()
    assert exact.stats()["evictions"] == 1 and exact.stats()["bytes"] == exact.max_bytes
    exact.close()


def test_the_older_chain_loses_its_deepest_block_first(tmp_path):
    probe = stored(tmp_path / "probe", list(range(8)), kv(8))
    one = probe.stats()["bytes"] // 2
    store = make(tmp_path / "c", max_bytes=4 * one + one // 2)
    store.store(KEY, [1] * 12, kv(12, seed=1))
    assert store.flush()
    store.store(KEY, [2] * 8, kv(8, seed=2))                      # newer: the older chain gives up one block
    assert store.flush()
    assert store.stats()["evictions"] == 1
    assert store.lookup(KEY, [1] * 12 + [0])[1] == 8 and store.lookup(KEY, [2] * 8 + [0])[1] == 8
    store.close()


@pytest.mark.parametrize("cache", [
    lambda: [RotatingKVCache(max_size=32)] * 2,
    lambda: [KVCache(), KVCache()],
    lambda: kv(16)[:1] + [RotatingKVCache(max_size=32)],
])
def test_caches_other_than_filled_plain_kv_stay_in_memory_only(tmp_path, cache):
    made = cache()
    for c in made:
        if isinstance(c, RotatingKVCache):
            c.update_and_fetch(mx.zeros((1, 2, 16, 8)), mx.zeros((1, 2, 16, 8)))
    store = stored(tmp_path, list(range(16)), made)
    assert blocks(tmp_path) == [] and store.stats()["writes"] == 0


def test_a_cache_root_whose_parents_do_not_exist_yet_is_made(tmp_path):
    store = make(tmp_path / "new-home" / "prefix-cache")
    assert store.stats()["enabled"] and (tmp_path / "new-home" / "prefix-cache").is_dir()
    store.close()


def test_names_and_checksums_have_fixed_lengths(tmp_path):
    from mlx_lm.models.cache import load_prompt_cache

    assert len(model_dir(tmp_path, "..@..").name) == 2 + 32 and model_dir(tmp_path, "..@..").parent.name.startswith("h-")
    stored(tmp_path, list(range(8)), kv(8))
    _, meta = load_prompt_cache(str(blocks(tmp_path)[0]), return_metadata=True)
    assert len(meta["checksum"]) == 64 and meta["format"] == "mlxk-prefix-1"


def test_the_hit_ratio_counts_disk_lookups(tmp_path):
    tokens = list(range(100, 116))
    stored(tmp_path, tokens, kv(16))
    store = make(tmp_path, max_bytes=1)                           # one byte is a bound, not "off"
    assert store.enabled
    assert store.lookup(KEY, tokens)[1] == 12
    assert store.lookup(KEY, [5] * 12) is None and store.lookup(KEY, [6] * 12) is None
    assert store.stats()["hit_ratio"] == 0.3333


def test_a_disk_prefix_longer_than_memorys_wins_and_a_shorter_one_does_not(tmp_path):
    tokens = list(range(100, 116))
    stored(tmp_path, tokens, kv(16))
    store = make(tmp_path)
    assert store.lookup(KEY, tokens + [5], have=8)[1] == 16
    second = next(p for p in blocks(tmp_path) if p.name.startswith("d1-"))
    _truncate(second)
    assert store.lookup(KEY, tokens + [5], have=6) is None      # only 4 tokens survive: less than memory's 6


def test_a_write_that_fails_midway_leaves_no_temp_file(tmp_path, monkeypatch):
    from mlxk.workers.inference import prefixcache

    def torn(name, cache, meta):
        Path(name).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prefixcache, "save_prompt_cache", torn)
    store = make(tmp_path)
    store.store(KEY, list(range(8)), kv(8))
    assert store.flush()
    assert list(tmp_path.rglob("*.safetensors")) == [] and store.stats()["enabled"] is False
    store.close()


def test_bytes_on_disk_are_the_files_sizes(tmp_path):
    assert make(tmp_path / "empty").stats()["bytes"] == 0
    store = stored(tmp_path, list(range(16)), kv(16))
    on_disk = sum(p.stat().st_size for p in blocks(tmp_path))
    s = store.stats()
    assert s["bytes"] == s["written_bytes"] == on_disk and make(tmp_path).stats()["bytes"] == on_disk
