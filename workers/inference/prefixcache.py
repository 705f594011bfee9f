"""The prompt-prefix KV cache on disk: long prompt prefixes survive worker restarts, model reloads and evictions.

Why: coding agents send the same 5-30k-token system prompt and tool list with every request. The memory tier
(mlx-lm's LRUPromptCache, one per loaded model, in engine.py) is lost whenever the worker restarts or the model is
unloaded, and prefilling such a prefix again takes seconds to minutes on a laptop. This tier keeps the keys and
values of those prefixes in files under `$MLXK_HOME/prefix-cache/` and gives them back to the engine, which serves
every API dialect, so every dialect shares it.

Layout and rules (the source of each rule in brackets):
- A prefix is cut into blocks of `block_tokens` tokens. Block i's file holds the keys and values of tokens
  [i*B, (i+1)*B) of every layer, in mlx-lm's prompt-cache file format (`save_prompt_cache`, read back with
  `load_prompt_cache`). Files are named by a hash chain: h(-1) = blake2b(model key), h(i) = blake2b(h(i-1) +
  block i's token ids), so a file names its whole prefix and two prompts whose first k blocks agree (same system
  prompt and tools, another user turn) share k files [oMLX keeps its SSD tier as chained KV blocks the same way].
- Path: `<root>/<org--name>/<revision>/d<depth>-<hash>.safetensors`. The model key (`org/name@<revision>`, the
  snapshot hash) seeds the chain, so another revision's blocks never match; the first use of a revision deletes the
  directories of the repo's other revisions (their KV came from other weights).
- Only prompts of at least `min_tokens` tokens (MIN_TOKENS by default) are looked up or stored: below that a
  prefill is cheap and files would only churn. Only plain per-layer `KVCache`s are stored (models with rotating,
  quantized or state-space caches keep the memory tier only).
- Bounded by `max_bytes` over the whole directory, least recently used evicted first. A file's mtime is its last
  use (touched on every hit and store, so the order survives restarts); within one chain every block gets the same
  stamp and the deepest goes first, so a block is never evicted before its descendants.
- Torn writes: a file is written under a temp name in its own directory and renamed into place. Its metadata
  carries the model key, depth, hash and a blake2b checksum over those and every array's dtype, shape and bytes;
  a file that is short, does not parse, or does not match is deleted and counts as a miss [never loaded].
- A home that cannot be written turns the tier off with one log line; generation goes on without it.

Threads: `lookup()` and `store()` run on the MLX thread (they touch MLX arrays). `store()` only slices out the new
blocks and evaluates them there; one writer thread does the file I/O (checksum, write, rename, touch, eviction,
deletes) so decoding never waits on the disk. `stats()` is safe from any thread. `flush()` waits for the writer.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, load_prompt_cache, save_prompt_cache

log = logging.getLogger("mlxk.inference.prefixcache")

BLOCK_TOKENS = 64      # tokens per file: what a hit can lose at the end of a shared prefix (64 tokens ~1.5 s of CPU prefill)
MIN_TOKENS = 256       # shorter prompts are neither looked up nor stored on disk (their prefill is cheap)
WRITE_QUEUE = 16       # store jobs waiting for the writer; more are dropped (counted), never waited for
STALE_TEMP_S = 3600.0  # a temp file this old belongs to a writer that died mid-write
FORMAT = "mlxk-prefix-1"
_FILE = re.compile(r"^d(\d{1,6})-([0-9a-f]{32})\.safetensors$")
_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_TEMP_SUFFIX = ".tmp.safetensors"


@dataclass
class Entry:
    path: Path
    depth: int
    nbytes: int
    used: float


def _component(text: str) -> str:
    """A safe directory name for a repo id or a revision (a hash of it when it is not one)."""
    name = text.replace("/", "--")
    if _SAFE.match(name) and name not in (".", ".."):
        return name
    return "h-" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def model_dir(root: Path, key: str) -> Path:
    """`<root>/<org--name>/<revision>` of a model key `org/name@revision`."""
    repo, _, revision = key.partition("@")
    return root / _component(repo) / _component(revision or "-")


def chain(key: str, tokens: list[int], blocks: int, block_tokens: int) -> list[str]:
    """The hashes naming the first `blocks` blocks of tokens (hex, 32 characters each)."""
    out = []
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    for i in range(blocks):
        block = np.asarray(tokens[i * block_tokens:(i + 1) * block_tokens], dtype="<u4")   # little-endian uint32
        digest = hashlib.blake2b(digest + block.tobytes(), digest_size=16).digest()
        out.append(digest.hex())
    return out


WRITER_NICE = 10   # the writer's niceness above the worker's own (Linux): decoding goes first on a busy CPU


def _yield_to_decoding() -> None:
    """Lower the calling thread's CPU priority by WRITER_NICE where the OS keeps one per thread (Linux: setpriority
    on a thread id touches that thread only, man 2 setpriority "BUGS"; elsewhere it would renice the whole worker,
    so nothing is done). The writer's checksums and copies then take the CPU time decoding leaves over."""
    if sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICE)
    except OSError:  # a sandbox that forbids it: the writer still works, only without the lower priority
        log.debug("prompt-prefix cache writer: could not lower its priority", exc_info=True)


def checksum(key: str, depth: int, digest: str, arrays: list) -> str:
    """blake2b over the identity fields and every array's dtype, shape and bytes (arrays must be evaluated)."""
    h = hashlib.blake2b(f"{FORMAT}\n{key}\n{depth}\n{digest}\n".encode(), digest_size=32)
    for a in arrays:
        h.update(f"{a.dtype}{tuple(a.shape)}".encode())
        h.update(memoryview(a))
    return h.hexdigest()


class PrefixCache:
    """KV blocks of long prompt prefixes on disk. `root` None or `max_bytes` <= 0: off (no file, no directory)."""

    def __init__(self, root: Path | None, max_bytes: int, *, block_tokens: int = BLOCK_TOKENS,
                 min_tokens: int = MIN_TOKENS):
        self.root = Path(root) if root is not None else None
        self.max_bytes = max(0, int(max_bytes))
        self.block_tokens = max(1, int(block_tokens))
        self.min_tokens = max(self.block_tokens, int(min_tokens))
        self.enabled = self.root is not None and self.max_bytes > 0
        self.counters = {"lookups": 0, "hits": 0, "restored_tokens": 0, "writes": 0, "written_bytes": 0,
                         "evictions": 0, "corrupt": 0, "dropped": 0}
        self._lock = threading.Lock()
        self._index: dict[str, Entry] = {}
        self._bytes = 0
        self._pending: set[str] = set()
        self._seen: set[str] = set()
        self._jobs: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self._thread: threading.Thread | None = None
        self.writer_tid: int | None = None   # the writer thread's OS id, once it runs
        if self.enabled:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / f".probe-{uuid.uuid4().hex}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as error:
                self._turn_off(f"cannot write {self.root} ({error.strerror or error})")
                return
            self._scan()
            self._thread = threading.Thread(target=self._writer, name="mlxk-prefix-cache", daemon=True)
            self._thread.start()

    # ---- any thread ---------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """{"enabled", "dir", "max_bytes", "bytes", "entries", "block_tokens", "min_tokens", "hit_ratio" (hits /
        lookups, null before the first lookup), and the counters: "lookups" (prompts the memory tier could not
        serve whole), "hits" (of those, served a longer prefix from disk), "restored_tokens", "writes",
        "written_bytes", "evictions", "corrupt" (files found torn or altered and deleted), "dropped" (stores
        skipped because the writer was behind)}."""
        with self._lock:
            c = dict(self.counters)
            return {"enabled": self.enabled, "dir": str(self.root) if self.root else None,
                    "max_bytes": self.max_bytes, "bytes": self._bytes, "entries": len(self._index),
                    "block_tokens": self.block_tokens, "min_tokens": self.min_tokens,
                    "hit_ratio": round(c["hits"] / c["lookups"], 4) if c["lookups"] else None, **c}

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued write, touch and delete is done; False on timeout (tests, shutdown)."""
        if self._thread is None:
            return True
        done = threading.Event()
        try:
            self._jobs.put(("flush", done), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued writes and end the writer thread."""
        if self._thread is not None:
            self.flush(timeout)
            self._jobs.put(("stop",))
            self._thread.join(timeout)
            self._thread = None

    # ---- the MLX thread -------------------------------------------------------------------------------------------

    def lookup(self, key: str, tokens: list[int], have: int = 0) -> tuple[list, int] | None:
        """The longest stored prefix of `tokens` when it is longer than `have` (what the memory tier gave):
        (a fresh per-layer KVCache list holding its keys and values, its length in tokens), else None. At least one
        token is always left to feed. Torn or altered files on the way are deleted and end the prefix there."""
        if not self.enabled or len(tokens) < self.min_tokens:
            return None
        try:
            return self._lookup(key, tokens, have)
        except Exception:  # the cache is an optimisation: its failure must not fail the request (logged, a miss)
            log.exception("prompt-prefix cache lookup for %s failed; prefilling instead", key)
            return None

    def store(self, key: str, tokens: list[int], cache: list) -> None:
        """Queue the blocks of `cache` (the KV of `tokens`) that are not on disk yet for the writer; returns at once.
        Only the new blocks are sliced and evaluated here; nothing is written on this thread."""
        if not self.enabled or not cache or any(type(c) is not KVCache or c.keys is None for c in cache):
            return
        try:
            self._store(key, tokens, cache)
        except Exception:  # as in lookup: a failed store costs a future hit, never this model's batch
            log.exception("prompt-prefix cache store for %s failed; not cached on disk", key)

    def _lookup(self, key: str, tokens: list[int], have: int) -> tuple[list, int] | None:
        self._see(key)
        limit = (len(tokens) - 1) // self.block_tokens
        if limit * self.block_tokens <= have:
            return None  # the memory tier already serves every whole block
        hashes = chain(key, tokens, limit, self.block_tokens)
        with self._lock:
            self.counters["lookups"] += 1
            entries = []
            for digest in hashes:
                entry = self._index.get(digest)
                if entry is None:
                    break
                entries.append((digest, entry))
        if len(entries) * self.block_tokens <= have:
            return None
        blocks = []
        for depth, (digest, entry) in enumerate(entries):
            layers = self._read(key, depth, digest, entry)
            if layers is None:
                break
            blocks.append(layers)
        n = len(blocks) * self.block_tokens
        if n <= have:
            return None
        cache = []
        for layer in range(len(blocks[0])):
            c = KVCache()
            c.keys = mx.concatenate([b[layer].keys for b in blocks], axis=2)
            c.values = mx.concatenate([b[layer].values for b in blocks], axis=2)
            c.offset = n
            cache.append(c)
        self._touch([digest for digest, _ in entries[:len(blocks)]])
        with self._lock:
            self.counters["hits"] += 1
            self.counters["restored_tokens"] += n
        return cache, n

    def _store(self, key: str, tokens: list[int], cache: list) -> None:
        n = min(min(c.offset for c in cache), len(tokens))
        if n < self.min_tokens:
            return
        self._see(key)
        hashes = chain(key, tokens, n // self.block_tokens, self.block_tokens)
        stamp = time.time()
        with self._lock:
            new = [d for d, h in enumerate(hashes) if h not in self._index and h not in self._pending]
            old = [h for h in hashes if h in self._index]
        if old:
            self._touch(old, stamp)
        if not new:
            return
        B = self.block_tokens
        blocks = []
        for depth in new:
            layers = [(mx.contiguous(c.keys[..., depth * B:(depth + 1) * B, :]),
                       mx.contiguous(c.values[..., depth * B:(depth + 1) * B, :])) for c in cache]
            blocks.append((depth, hashes[depth], layers))
        mx.eval([a for _, _, layers in blocks for pair in layers for a in pair])
        with self._lock:
            self._pending.update(h for _, h, _ in blocks)
        try:
            self._jobs.put_nowait(("write", key, blocks, stamp))
        except queue.Full:
            with self._lock:
                self._pending.difference_update(h for _, h, _ in blocks)
                self.counters["dropped"] += 1

    # ---- internals --------------------------------------------------------------------------------------------------

    def _turn_off(self, why: str) -> None:
        self.enabled = False
        log.warning("prompt-prefix cache on disk is off: %s; generation goes on with the memory cache only", why)

    def _see(self, key: str) -> None:
        """First use of a model key in this process: the repo's other revisions' blocks go (on the writer)."""
        if key in self._seen:
            return
        self._seen.add(key)
        mine = model_dir(self.root, key)
        with self._lock:
            stale = [h for h, e in self._index.items() if e.path.parent.parent == mine.parent
                     and e.path.parent != mine]
            for digest in stale:
                self._bytes -= self._index.pop(digest).nbytes
        self._post(("drop_others", mine))

    def _touch(self, hashes: list[str], stamp: float | None = None) -> None:
        stamp = stamp if stamp is not None else time.time()
        with self._lock:
            paths = []
            for digest in hashes:
                entry = self._index.get(digest)
                if entry is not None:
                    entry.used = stamp
                    paths.append(entry.path)
        if paths:
            self._post(("touch", paths, stamp))

    def _post(self, job: tuple) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:  # a touch or a cleanup can wait for the next one
            pass

    def _read(self, key: str, depth: int, digest: str, entry: Entry) -> list | None:
        """Block `depth` as a per-layer KVCache list, or None (the file is deleted when it is not intact)."""
        try:
            layers, meta = load_prompt_cache(str(entry.path), return_metadata=True)
            arrays = [a for c in layers for a in (c.keys, c.values)]
            # The checksum covers the format, model key, depth and hash as well as every array: one comparison.
            ok = (all(type(c) is KVCache for c in layers)
                  and all(c.offset == c.keys.shape[2] == c.values.shape[2] == self.block_tokens for c in layers)
                  and meta.get("checksum") == checksum(key, depth, digest, arrays))
            if ok:
                return layers
            why = "its checksum or identity does not match"
        except Exception as error:  # noqa: BLE001 - any parse failure of a torn file means the same: not usable
            if not entry.path.exists():  # deleted behind our back (a user clearing the cache): a plain miss
                self._forget(digest)
                return None
            why = f"it does not load ({type(error).__name__}: {str(error)[:120]})"
        log.warning("deleting prompt-cache block %s: %s", entry.path, why)
        self._forget(digest)
        with self._lock:
            self.counters["corrupt"] += 1
        _unlink(entry.path)
        return None

    def _forget(self, digest: str) -> None:
        with self._lock:
            entry = self._index.pop(digest, None)
            if entry is not None:
                self._bytes -= entry.nbytes

    def _scan(self) -> None:
        """Index what earlier processes left: blocks by name, last use from mtime; stale temp files go."""
        now = time.time()
        for path in self.root.glob("*/*/*"):
            try:
                st = path.stat()
            except OSError:
                continue
            if path.name.endswith(_TEMP_SUFFIX):
                if now - st.st_mtime > STALE_TEMP_S:
                    _unlink(path)
                continue
            match = _FILE.match(path.name)
            if match is None:
                continue
            self._index[match.group(2)] = Entry(path, int(match.group(1)), st.st_size, st.st_mtime)
            self._bytes += st.st_size

    # ---- the writer thread ------------------------------------------------------------------------------------------

    def _writer(self) -> None:
        self.writer_tid = threading.get_native_id()
        _yield_to_decoding()
        while True:
            job = self._jobs.get()
            try:
                if job[0] == "stop":
                    return
                if job[0] == "flush":
                    job[1].set()
                elif job[0] == "write":
                    self._write(*job[1:])
                elif job[0] == "touch":
                    for path in job[1]:
                        try:
                            os.utime(path, (job[2], job[2]))
                        except OSError:
                            pass
                elif job[0] == "drop_others":
                    self._drop_others(job[1])
            except Exception:  # the writer's supervisor: one failed job must not end the tier
                log.exception("prompt-prefix cache writer: %s failed", job[0])

    def _write(self, key: str, blocks: list, stamp: float) -> None:
        directory = model_dir(self.root, key)
        try:
            for depth, digest, layers in blocks:
                if not self.enabled:
                    return
                self._write_block(directory, key, depth, digest, layers, stamp)
        except OSError as error:  # a full disk, a home made read-only: stop writing, keep serving
            self._turn_off(f"writing to {directory} failed ({error.strerror or error})")
        finally:
            with self._lock:
                self._pending.difference_update(h for _, h, _ in blocks)

    def _write_block(self, directory: Path, key: str, depth: int, digest: str, layers: list, stamp: float) -> None:
        arrays = [a for pair in layers for a in pair]
        nbytes = sum(a.nbytes for a in arrays)
        if nbytes > self.max_bytes:
            return
        meta = {"format": FORMAT, "model": key, "depth": str(depth), "hash": digest,
                "checksum": checksum(key, depth, digest, arrays)}
        caches = []
        for k, v in layers:
            c = KVCache()
            c.keys, c.values, c.offset = k, v, k.shape[2]
            caches.append(c)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"d{depth}-{digest}.safetensors"
        temp = directory / f".{digest}.{uuid.uuid4().hex[:8]}{_TEMP_SUFFIX}"
        try:
            save_prompt_cache(str(temp), caches, meta)
            os.utime(temp, (stamp, stamp))
            os.replace(temp, final)
        except BaseException:
            _unlink(temp)
            raise
        size = final.stat().st_size
        with self._lock:
            previous = self._index.get(digest)
            if previous is not None:
                self._bytes -= previous.nbytes
            self._index[digest] = Entry(final, depth, size, stamp)
            self._bytes += size
            self.counters["writes"] += 1
            self.counters["written_bytes"] += size
        self._evict()

    def _evict(self) -> None:
        """Least recently used first (deepest first within one stamp) until the directory fits max_bytes."""
        with self._lock:
            if self._bytes <= self.max_bytes:
                return
            order = sorted(self._index.items(), key=lambda item: (item[1].used, -item[1].depth))
            victims = []
            for digest, entry in order:
                if self._bytes <= self.max_bytes:
                    break
                del self._index[digest]
                self._bytes -= entry.nbytes
                self.counters["evictions"] += 1
                victims.append(entry.path)
        for path in victims:
            _unlink(path)

    def _drop_others(self, mine: Path) -> None:
        try:
            siblings = [p for p in mine.parent.iterdir() if p.is_dir() and p != mine]
        except OSError:
            return
        for path in siblings:
            log.info("deleting prompt-cache blocks of %s: another revision of the model is in use now", path)
            shutil.rmtree(path, ignore_errors=True)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
