"""Health of a cached model: integrity rules (is the snapshot whole?) then runtime rules (can mlx-lm run it?).

Why this shape: `mlxk list` checks every new or changed repo synchronously, and the first index of a 1,000-model
cache must take well under a second. So a repo is read ONCE into a `RepoView` (small JSON files parsed once,
safetensors *headers* read lazily and memoized, never the weights, no hashing), and every rule is a small pure
function over that view returning `Finding`s. Integrity imports nothing heavy; only `check_runtime` imports
mlx-lm (to ask whether it can build the model type), and it caches that verdict per type for the process.

Rule ids are stable strings (stored in state.db, matched by scripts); `findings[0].message` is the `reason`.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from mlxk import cache
from mlxk.registry import ENCODER_MODEL_TYPES, unsupported_reason
from mlxk.units import human_size

if TYPE_CHECKING:
    from mlxk.detect import Detection

log = logging.getLogger("mlxk.health")

# The safetensors format caps its JSON header at 100 MB; anything larger is corruption, not a model.
SAFETENSORS_MAX_HEADER = 100_000_000
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
LFS_POINTER_MAX = 1024          # a pointer is ~130 bytes; weights are never this small
PARTIAL_SUFFIXES = (".incomplete", ".part", ".partial", ".tmp", ".download")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".npz", ".pth", ".pt")
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.(?P<ext>safetensors|bin)$")
LEGACY_WEIGHTS = re.compile(r"^(weights\.\d+\.safetensors|weights\.npz|pytorch_model-.*\.safetensors)$")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")   # a chat template outside tokenizer_config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tiktoken.model")
README_HEAD_BYTES = 16 * 1024   # front matter lives at the top; never read a whole model card
TOKENIZER_HEAD_BYTES = 256 * 1024  # added_tokens come before the vocab in tokenizer.json
FLAT_SKIP_DIRS = {".git", ".cache", ".huggingface", "__pycache__"}


@dataclass(frozen=True)
class Finding:
    rule: str        # stable id, e.g. "index_shard_missing"
    message: str     # one line for humans that names the file


@dataclass
class SafetensorsHeader:
    """What a safetensors header says, or why it could not be read (`error` set, `rule` says which)."""
    header_len: int = 0
    data_len: int = 0                  # bytes of tensor data the header declares
    metadata: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)   # name -> (dtype, shape): what config rules compare
    error: str | None = None
    rule: str | None = None            # "safetensors_bad_header" | "file_unreadable" when error is set


@dataclass
class RepoView:
    """Everything the rules look at, read once per repo (small files eagerly, headers lazily)."""
    repo_id: str
    path: Path                          # the repo folder (models--org--name) or the flat workspace
    revision: str | None
    snapshot: Path | None
    files: list[cache.SnapshotFile]
    incomplete: list[Path]              # partial downloads: blobs/*.incomplete and partial/tmp files
    config: dict | None
    config_error: str | None            # why config is None: "missing" | "dangling" | "invalid_json: ..." | ...
    tokenizer_config: dict | None = None
    tokenizer_config_error: str | None = None   # why tokenizer_config.json could not be parsed (None: fine or absent)
    revisions: list[str] = field(default_factory=list)
    flat: bool = False                  # a workspace folder, not a cache repo (no refs/blobs/trees)
    incomplete_bytes: int = 0           # reclaimable when the snapshot is complete: bytes on disk (cache.allocated_bytes)
    incomplete_size: int = 0            # the partial files' apparent size (preallocated to the full file)
    _headers: dict[str, SafetensorsHeader] = field(default_factory=dict, repr=False, compare=False)

    @cached_property
    def by_name(self) -> dict[str, cache.SnapshotFile]:
        return {f.name: f for f in self.files}

    @cached_property
    def root_names(self) -> set[str]:
        return {f.name for f in self.files if "/" not in f.name}

    def has(self, name: str) -> bool:
        return name in self.by_name

    def read_json(self, name: str) -> tuple[object | None, str | None]:
        """(parsed, None) or (None, why); why is "missing" | "dangling" | "unreadable: ..." | "invalid_json: ..."."""
        entry = self.by_name.get(name)
        if entry is None:
            return None, "missing"
        if entry.size is None:
            return None, "dangling"
        return _load_json(entry.path)

    @cached_property
    def readme(self) -> dict:
        """README.md front matter: only `library_name`, `pipeline_tag`, `tags`, `base_model` are kept."""
        entry = self.by_name.get("README.md")
        if entry is None or entry.size is None:
            return {}
        try:
            with open(entry.path, "rb") as fh:
                head = fh.read(README_HEAD_BYTES)
        except OSError:
            return {}
        return parse_front_matter(head.decode("utf-8", "replace"))

    @cached_property
    def trees(self) -> dict | None:
        """trees/<revision>.json as huggingface_hub 2.4 writes it ({"format_version": 1, "files": {...}})."""
        if self.flat or not self.revision:
            return None
        data, _error = _load_json(self.path / "trees" / f"{self.revision}.json")
        if not isinstance(data, dict) or data.get("format_version") != 1 or not isinstance(data.get("files"), dict):
            return None  # huggingface_hub ignores an unknown or corrupt listing too, and re-fetches it
        return data["files"]

    @cached_property
    def tokenizer_head(self) -> bytes:
        """The first part of tokenizer.json (its added tokens), for think-token detection without a 10 MB read."""
        entry = self.by_name.get("tokenizer.json")
        if entry is None or entry.size is None:
            return b""
        try:
            with open(entry.path, "rb") as fh:
                return fh.read(TOKENIZER_HEAD_BYTES)
        except OSError:
            return b""

    def safetensors_header(self, name: str) -> SafetensorsHeader:
        """The parsed header of one .safetensors file of the snapshot, read at most once per view."""
        if name not in self._headers:
            entry = self.by_name[name]
            self._headers[name] = read_safetensors_header(entry.path, entry.size or 0)
        return self._headers[name]

    @cached_property
    def weight_files(self) -> list[cache.SnapshotFile]:
        return [f for f in self.files if is_weight_file(f.name)]

    @cached_property
    def tensors(self) -> dict[str, tuple[str, list[int]]]:
        """Every tensor of every readable safetensors weight file: name -> (dtype, shape), from the headers."""
        found: dict = {}
        for entry in self.weight_files:
            if entry.name.endswith(".safetensors") and entry.size and not is_lfs_pointer(entry):
                header = self.safetensors_header(entry.name)
                if header.error is None:
                    found.update(header.tensors)
        return found

    @cached_property
    def index_files(self) -> list[cache.SnapshotFile]:
        return [f for f in self.files if f.name.endswith(INDEX_SUFFIXES)]


# ---------------------------------------------------------------------------------------------------------------
# Reading a repo


def inspect_repo(repo_id: str, path: Path, *, revisions: list[str] | None = None,
                 revision: str | None = None) -> RepoView:
    """Read a cache repo (models--org--name) once: its current snapshot, partial downloads and small JSON files.

    A caller that already listed the snapshots passes them with the current one (`revisions`, `revision`)."""
    path = Path(path)
    if revisions is None:
        revisions = cache.list_revisions(path)
        revision = cache.current_revision(path, revisions)
    snapshot = path / "snapshots" / revision if revision else None
    files = list_files(snapshot) if snapshot else []
    partial = [f.path for f in files if f.name.endswith(PARTIAL_SUFFIXES)]
    incomplete = cache.incomplete_blobs(path) + partial
    return _finish_view(RepoView(repo_id=repo_id, path=path, revision=revision, snapshot=snapshot,
                                 files=[f for f in files if not f.name.endswith(PARTIAL_SUFFIXES)],
                                 incomplete=incomplete, config=None, config_error=None, revisions=revisions))


def inspect_dir(path: Path, name: str) -> RepoView:
    """Read a flat model folder (a `mlxk clone` workspace, a folder about to be pushed) like a snapshot."""
    path = Path(path)
    files, partial = _walk_flat(path)
    return _finish_view(RepoView(repo_id=name, path=path, revision=None, snapshot=path if path.is_dir() else None,
                                 files=files, incomplete=partial, config=None, config_error=None, flat=True))


def _finish_view(view: RepoView) -> RepoView:
    config, error = view.read_json("config.json") if view.snapshot else (None, "missing")
    if error is None and not isinstance(config, dict):
        config, error = None, "not_object"
    view.config, view.config_error = config, error
    tok, tok_error = view.read_json("tokenizer_config.json")
    view.tokenizer_config = tok if isinstance(tok, dict) else None
    if tok_error is None and tok is not None and not isinstance(tok, dict):
        tok_error = "not_object"
    view.tokenizer_config_error = tok_error if tok_error not in (None, "missing", "dangling") else None
    view.incomplete_bytes = sum(_lsize(p, allocated=True) for p in view.incomplete)
    view.incomplete_size = sum(_lsize(p) for p in view.incomplete)
    return view


def list_files(root: Path, *, skip_dirs: frozenset | set = frozenset()) -> list[cache.SnapshotFile]:
    """Every file under `root` as a SnapshotFile, like cache.snapshot_files but with string paths and readlink
    instead of Path.resolve (which lstats every path component): 1,000 repos list in a fraction of the time."""
    files: list[cache.SnapshotFile] = []
    stack = [("", os.fspath(root), Path(root))]
    while stack:
        prefix, folder, base = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            name = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                if not (prefix == "" and entry.name in skip_dirs):
                    stack.append((name + "/", entry.path, base / entry.name))
                continue
            link = entry.is_symlink()
            path = base / entry.name  # joining one part is far cheaper than parsing the whole path again
            try:
                size = entry.stat().st_size  # follows the link: None below means it dangles
            except OSError:
                files.append(cache.SnapshotFile(name, path, link, None, None))
                continue
            if link:
                target = os.path.normpath(os.path.join(folder, os.readlink(entry.path)))
                files.append(cache.SnapshotFile(name, path, True, Path(target), size))
            else:
                files.append(cache.SnapshotFile(name, path, False, path, size))
    files.sort(key=lambda f: f.name)
    return files


def _walk_flat(root: Path) -> tuple[list[cache.SnapshotFile], list[Path]]:
    listed = list_files(root, skip_dirs=FLAT_SKIP_DIRS)
    files = [f for f in listed if not f.name.endswith(PARTIAL_SUFFIXES)]
    partial = [f.path for f in listed if f.name.endswith(PARTIAL_SUFFIXES)]
    # huggingface_hub's local_dir downloads keep their partial files here
    download = root / ".cache" / "huggingface" / "download"
    if download.is_dir():
        partial += [p for p in download.rglob("*") if p.name.endswith(PARTIAL_SUFFIXES)]
    return files, sorted(partial)


def _load_json(path: Path) -> tuple[object | None, str | None]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as error:
        return None, f"unreadable: {error.strerror or error}"
    try:
        return json.loads(raw), None
    except (ValueError, UnicodeDecodeError) as error:
        return None, f"invalid_json: {error}"


def _lsize(path: Path, *, allocated: bool = False) -> int:
    try:
        st = os.lstat(path)
        return cache.allocated_bytes(st) if allocated else st.st_size
    except OSError:
        return 0


def read_safetensors_header(path: Path, size: int) -> SafetensorsHeader:
    """Parse only the header (8-byte little-endian length + JSON); the weights are never read."""
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                return _bad(f"is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > SAFETENSORS_MAX_HEADER or 8 + n > size:
                return _bad(f"declares a {n}-byte header but the file is {size} bytes")
            raw = fh.read(n)
    except OSError as error:
        return SafetensorsHeader(error=f"cannot be read: {error.strerror or error}", rule="file_unreadable")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _bad("has a header that is not valid JSON")
    if not isinstance(header, dict):
        return _bad("has a header that is not a JSON object")
    data_len = 0
    tensors = {}
    for key, tensor in header.items():
        if key == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return _bad(f"has no valid data_offsets for tensor {key!r}")
        data_len = max(data_len, offsets[1])
        shape = tensor.get("shape")
        if isinstance(tensor.get("dtype"), str) and isinstance(shape, list) and all(isinstance(d, int) for d in shape):
            tensors[key] = (tensor["dtype"], shape)
    metadata = header.get("__metadata__")
    return SafetensorsHeader(header_len=n, data_len=data_len, metadata=metadata if isinstance(metadata, dict) else {},
                             tensors=tensors)


def _bad(why: str) -> SafetensorsHeader:
    return SafetensorsHeader(error=why, rule="safetensors_bad_header")


def parse_front_matter(text: str) -> dict:
    """The few README front-matter keys mlxk needs, without a YAML dependency on the `list` path.

    Handles `key: value`, `key: [a, b]` and block lists (`key:` then `- item` lines); nested maps are skipped.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    found: dict = {}
    key = None
    for line in lines[1:]:
        if line.strip() in ("---", "..."):
            break
        stripped = line.strip()
        if key and stripped.startswith("- ") and isinstance(found.get(key), list):
            found[key].append(_unquote(stripped[2:]))
            continue
        match = re.match(r"^([A-Za-z_][\w-]*)\s*:\s*(.*)$", line)
        if not match:
            continue
        key, value = match.group(1), match.group(2).strip()
        if not value:
            found[key] = []
        elif value.startswith("[") and value.endswith("]"):
            found[key] = [_unquote(v) for v in value[1:-1].split(",") if v.strip()]
        else:
            found[key] = _unquote(value)
    return found


def _unquote(value: str) -> str:
    value = value.split(" #", 1)[0].strip()
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value


def is_weight_file(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    if base.endswith(WEIGHT_SUFFIXES):
        return True
    # pytorch_model.bin, model-00001-of-00002.bin; not training_args.bin or optimizer states
    return base.endswith(".bin") and "model" in base


def is_lfs_pointer(entry: cache.SnapshotFile) -> bool:
    if entry.size is None or entry.size > LFS_POINTER_MAX:
        return False
    try:
        with open(entry.path, "rb") as fh:
            return fh.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Integrity rules: each a small function over the view, in the order their findings are reported


def check_snapshot(view: RepoView) -> list[Finding]:
    if view.snapshot is not None:
        return []
    return [Finding("no_snapshot", f"{view.repo_id} has no snapshot (no files were ever completely downloaded); "
                                   "pull it again")]


def check_config(view: RepoView) -> list[Finding]:
    error = view.config_error
    if error is None:
        if not view.config:
            return [Finding("config_not_object", "config.json is empty or invalid: an empty object")]
        return []
    if error == "missing":
        if gguf_only(view):
            return []  # GGUF files carry their config inside; runtime rules say what to do with them
        return [Finding("config_missing", "config.json missing")]
    if error == "dangling":
        return [Finding("config_missing", "config.json links to a blob that is gone")]
    if error.startswith("unreadable"):
        return [Finding("file_unreadable", f"config.json cannot be read: {error.split(': ', 1)[1]}")]
    if error.startswith("invalid_json"):
        return [Finding("config_invalid_json", f"config.json contains invalid JSON ({error.split(': ', 1)[1]})")]
    return [Finding("config_not_object", "config.json is empty or invalid: not a JSON object")]


def check_weights_present(view: RepoView) -> list[Finding]:
    if view.weight_files or view.index_files:
        return []
    return [Finding("no_weights", "No model weights found: no weight files (*.safetensors, *.gguf, *.bin) in "
                                  "the snapshot")]


def check_index_shards(view: RepoView) -> list[Finding]:
    """Every file an index's weight_map names is in the snapshot."""
    findings = []
    for index in view.index_files:
        data, error = view.read_json(index.name)
        if error == "dangling":
            continue  # check_symlinks names it
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            why = error.split(": ", 1)[-1] if error else "it has no weight_map object"
            findings.append(Finding("index_invalid", f"{index.name} cannot be used: {why}"))
            continue
        folder = index.name.rpartition("/")[0]
        for shard in sorted(set(map(str, weight_map.values()))):
            name = f"{folder}/{shard}" if folder else shard
            if not view.has(name):
                findings.append(Finding("index_shard_missing",
                                        f"Index/shard mismatch: {name} (listed in {index.name}) is missing"))
    return findings


def check_shard_contents(view: RepoView) -> list[Finding]:
    """Weight files that are empty or a Git LFS pointer text (cloned without git-lfs)."""
    findings = []
    for entry in view.weight_files:
        if entry.size == 0:
            findings.append(Finding("shard_empty", f"Empty weight shards: {entry.name} is empty (0 bytes)"))
        elif is_lfs_pointer(entry):
            findings.append(Finding("shard_lfs_pointer", f"LFS pointers instead of files: {entry.name} is a Git LFS "
                                                         "pointer, not the weights (fetch it with git lfs pull or "
                                                         "pull the model again)"))
    return findings


def check_shards_without_index(view: RepoView) -> list[Finding]:
    findings, seen = [], set()
    for entry in view.files:
        folder, _, base = entry.name.rpartition("/")
        match = SHARD_NAME.match(base)
        if not match or int(match["n"]) < 2:
            continue
        index = f"{match['stem']}.{match['ext']}.index.json"
        index = f"{folder}/{index}" if folder else index
        if index not in seen and not view.has(index):
            seen.add(index)
            findings.append(Finding("shards_without_index",
                                    f"Safetensors index missing for sharded model: {entry.name} is one of "
                                    f"{int(match['n'])} shards but {index} is missing"))
    return findings


def check_symlinks(view: RepoView) -> list[Finding]:
    if view.flat:
        return []
    return [Finding("dangling_symlink", f"{f.name} links to a blob that is gone")
            for f in view.files if f.is_symlink and f.size is None]


def check_tree(view: RepoView) -> list[Finding]:
    """huggingface_hub's trees/<sha>.json: every listed file is in the snapshot, with the listed size."""
    listing = view.trees
    if not listing:
        return []
    source = f"trees/{view.revision}.json"
    findings = []
    for name, info in sorted(listing.items()):
        entry = view.by_name.get(name)
        expected = info.get("size") if isinstance(info, dict) else None
        if entry is None:
            findings.append(Finding("tree_mismatch", f"{name} (listed in {source}) is missing from the snapshot"))
        elif entry.size is not None and isinstance(expected, int) and entry.size != expected:
            findings.append(Finding("tree_mismatch", f"{name} is {entry.size} bytes but {source} says {expected}"))
    return findings


def check_safetensors(view: RepoView) -> list[Finding]:
    """Each header parses and declares exactly as many data bytes as the file holds (header only, no weights)."""
    findings = []
    for entry in view.weight_files:
        if not entry.name.endswith(".safetensors") or not entry.size or is_lfs_pointer(entry):
            continue  # missing, empty and pointer files already have their own finding
        header = view.safetensors_header(entry.name)
        if header.error:
            findings.append(Finding(header.rule, f"{entry.name} {header.error}"))
            continue
        expected = 8 + header.header_len + header.data_len
        if expected != entry.size:
            missing = expected - entry.size
            why = f"is {missing} bytes short" if missing > 0 else f"has {-missing} bytes more than its header declares"
            findings.append(Finding("safetensors_truncated", f"{entry.name} {why} (header declares {expected} bytes, "
                                                             f"file is {entry.size})"))
    return findings


def check_tokenizer(view: RepoView) -> list[Finding]:
    """A tokenizer config, a chat template or a vocabulary in config.json (`vocab_size`) says the model reads
    tokens: then a tokenizer file must be there too (mlx-lm's load builds the tokenizer from it and fails without
    one). A pull killed while linking, or an rm killed half-way, leaves exactly such a snapshot."""
    names = view.root_names
    if any(n in names for n in TOKENIZER_FILES) or any(n.endswith((".tiktoken", ".model")) for n in names):
        return []
    wants = [n for n in ("tokenizer_config.json", *CHAT_TEMPLATE_FILES) if view.has(n)]
    if wants:
        why = f"{wants[0]} present"
    elif (dims := _vocab_and_hidden(view.config or {})) is not None and view.weight_files and not gguf_only(view):
        why = f"config.json declares a vocabulary of {dims[0]} tokens"
    else:
        return []
    return [Finding("tokenizer_missing", f"{why} but tokenizer.json missing (nor is there a tokenizer.model or "
                                         f"vocab.json); pull {view.repo_id} again")]


def check_tokenizer_json(view: RepoView) -> list[Finding]:
    """tokenizer_config.json must parse (transformers json.loads it whole, so one stray byte fails every load).

    tokenizer.json is often 10-30 MB, too much to parse on the `list` path: it must start with `{` and end with `}`,
    which catches the truncated or appended-to file; a corruption inside it is left to the loader."""
    findings = []
    error = view.tokenizer_config_error
    if error is not None:
        why = "it is not a JSON object" if error == "not_object" else error.split(": ", 1)[-1]
        findings.append(Finding("tokenizer_invalid_json", f"tokenizer_config.json is not valid JSON ({why}); "
                                                          "pull the model again"))
    entry = view.by_name.get("tokenizer.json")
    if entry is not None and entry.size is not None:
        why = _json_object_ends(entry.path, entry.size)
        if why:
            findings.append(Finding("tokenizer_invalid_json", f"tokenizer.json is not valid JSON ({why}); "
                                                              "pull the model again"))
    return findings


def _json_object_ends(path: Path, size: int) -> str | None:
    """None when the file's first and last non-blank bytes are `{` and `}`; else what is wrong."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
            fh.seek(max(0, size - 64))
            tail = fh.read().rstrip()
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"
    if not head.startswith(b"{"):
        return "it does not start with '{'"
    if not tail.endswith(b"}"):
        return f"it ends in {tail[-8:]!r}, not '}}': truncated, or bytes after the JSON"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Weights against config: what the safetensors headers alone can tell about a conversion (dtypes and shapes)

INTEGER_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")


def _quantization(config: dict) -> dict | None:
    """mlx-lm's `quantization` block (bits, group_size, per-module overrides), or None for an unquantized config."""
    for source in (config, config.get("text_config")):
        if isinstance(source, dict) and isinstance(source.get("quantization"), dict):
            return source["quantization"]
    return None


def _quantized_by_other_means(config: dict) -> bool:
    """HF's quantization_config (GPTQ, AWQ, bitsandbytes, mxfp4...): integer-packed weights are expected."""
    return any(isinstance(source, dict) and source.get("quantization_config")
               for source in (config, config.get("text_config")))


def _module_quant(quant: dict, module: str) -> tuple[int, int] | None:
    """(bits, group_size) mlx-lm uses for `module`, honouring per-module overrides; None when it is not quantized."""
    override = quant.get(module)
    if override is False:
        return None
    source = override if isinstance(override, dict) else quant
    bits, group = source.get("bits"), source.get("group_size")
    if isinstance(bits, int) and isinstance(group, int) and bits > 0 and group > 0:
        return bits, group
    return None


def check_weight_dtypes(view: RepoView) -> list[Finding]:
    """An unquantized config means float weights: a `.weight`/`.bias` stored as integers cannot compute (mlx-lm loads
    it, then the first forward pass fails)."""
    config = view.config or {}
    if _quantization(config) is not None or _quantized_by_other_means(config):
        return []
    for name, (dtype, _shape) in sorted(view.tensors.items()):
        if dtype in INTEGER_DTYPES and name.endswith((".weight", ".bias")):
            return [Finding("weights_dtype_mismatch", f"tensor {name} is {dtype}, but config.json declares no "
                                                      "quantization, so its weights must be floating point; "
                                                      "re-convert the model")]
    return []


def check_quantized_shapes(view: RepoView) -> list[Finding]:
    """mlx-lm's quantized layers pack `bits`-bit values into uint32 `.weight` beside float `.scales` (one per
    `group_size` inputs): both must agree with config.json's `quantization` (mlx.nn.QuantizedLinear's layout)."""
    quant = _quantization(view.config or {})
    if quant is None:
        return []
    tensors = view.tensors
    for name, (dtype, _shape) in sorted(tensors.items()):
        if name.endswith((".scales", ".biases")) and dtype in INTEGER_DTYPES:
            return [Finding("quantization_mismatch", f"tensor {name} is {dtype}, but a quantized layer's scales and "
                                                     "biases must be floating point (mlx.core.dequantize refuses "
                                                     "others); re-convert the model")]
    for name, (_dtype, scales) in sorted(tensors.items()):
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        weight = tensors.get(f"{module}.weight")
        setting = _module_quant(quant, module)
        if weight is None or setting is None or not scales:
            continue
        bits, group = setting
        dtype, shape = weight
        inputs = scales[-1] * group
        expected = inputs * bits // 32
        if dtype != "U32" or not shape or shape[-1] != expected:
            return [Finding("quantization_mismatch", f"tensor {module}.weight is {dtype} {shape}, but config.json's "
                                                     f"quantization ({bits} bits, group size {group}) and its scales "
                                                     f"{scales} mean U32 [..., {expected}]; re-convert the model")]
    return []


def check_embedding_shapes(view: RepoView) -> list[Finding]:
    """embed_tokens and lm_head are vocab_size x hidden_size (from config.json, or its text_config); a quantized
    one is compared by the size its scales give, since its packed width is hidden_size * bits / 32."""
    config = view.config or {}
    dims = _vocab_and_hidden(config)
    if dims is None:
        return []
    vocab, hidden = dims
    quant = _quantization(config)
    tensors = view.tensors
    for name, (_dtype, shape) in sorted(tensors.items()):
        if not name.endswith(EMBEDDING_SUFFIXES) or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        rows, cols = shape
        scales = tensors.get(f"{module}.scales")
        setting = _module_quant(quant, module) if quant is not None and scales is not None else None
        if setting is not None and scales[1]:
            cols = scales[1][-1] * setting[1]
        if [rows, cols] != [vocab, hidden]:
            return [Finding("embedding_shape_mismatch", f"tensor {name} is {rows} x {cols}, but config.json says "
                                                        f"vocab_size x hidden_size = {vocab} x {hidden}; the weights "
                                                        "and config.json belong to different models")]
    return []


def _vocab_and_hidden(config: dict) -> tuple[int, int] | None:
    for source in (config, config.get("text_config")):
        if not isinstance(source, dict):
            continue
        vocab, hidden = source.get("vocab_size"), source.get("hidden_size")
        if isinstance(vocab, int) and isinstance(hidden, int) and not isinstance(vocab, bool) and vocab > 0 \
                and hidden > 0:
            return vocab, hidden
    return None


# What an interrupted download leaves behind: files that are not there yet. A malformed file is not explained by
# a partial download (huggingface_hub renames a blob into place only once it is complete).
MISSING_RULES = {"no_snapshot", "config_missing", "no_weights", "index_shard_missing", "shards_without_index",
                 "tree_mismatch", "tokenizer_missing"}


def check_incomplete(view: RepoView, findings: list[Finding]) -> list[Finding]:
    """Partial files mean an unfinished download only when the snapshot lacks files; else they are leftovers."""
    if not view.incomplete or not any(f.rule in MISSING_RULES for f in findings):
        return []
    first = view.incomplete[0]
    where = first.relative_to(view.path).as_posix() if first.is_relative_to(view.path) else first.name
    more = f" and {len(view.incomplete) - 1} more" if len(view.incomplete) > 1 else ""
    held = human_size(view.incomplete_bytes)
    if view.incomplete_bytes < view.incomplete_size:   # preallocated (sparse): say how far it got
        held = f"{held} of {human_size(view.incomplete_size)}"
    return [Finding("incomplete_download", f"download did not finish: {where}{more} is partial "
                                           f"({held}); pull {view.repo_id} again to resume")]


INTEGRITY_RULES = (check_snapshot, check_config, check_weights_present, check_index_shards, check_shard_contents,
                   check_shards_without_index, check_symlinks, check_tree, check_safetensors, check_tokenizer,
                   check_tokenizer_json, check_weight_dtypes, check_quantized_shapes, check_embedding_shapes)


def check_integrity(view: RepoView) -> list[Finding]:
    """All integrity findings, most telling first; [] means healthy."""
    findings: list[Finding] = []
    for rule in INTEGRITY_RULES:
        findings += rule(view)
        if rule is check_snapshot and findings:
            break  # nothing else can be judged without a snapshot
    return check_incomplete(view, findings) + findings


def gguf_only(view: RepoView) -> bool:
    weights = view.weight_files
    return bool(weights) and all(f.name.endswith(".gguf") for f in weights)


# ---------------------------------------------------------------------------------------------------------------
# Runtime rules (only after integrity passed): framework, weight naming, and mlx-lm's model registry


@lru_cache(maxsize=1)
def mlx_lm_signature() -> str:
    """The installed mlx-lm, e.g. "mlx-lm 0.32.2": a runtime verdict is only valid for this version."""
    try:
        return f"mlx-lm {importlib.metadata.version('mlx-lm')}"
    except importlib.metadata.PackageNotFoundError:
        return "mlx-lm not installed"


def check_runtime(view: RepoView, detection: "Detection") -> Finding | None:
    """None when mlx-lm can run the model; else the first reason it cannot, with the fix."""
    for rule in (check_framework, check_legacy_weights, check_model_type, check_tokenizer_files_load,
                 check_weights_fit_model):
        finding = rule(view, detection)
        if finding:
            return finding
    return None


def _mlx_name(view: RepoView) -> str:
    name = view.repo_id.rsplit("/", 1)[-1]
    return re.sub(r"[-_.]?gguf$", "", name, flags=re.IGNORECASE) or name


def check_framework(view: RepoView, detection: "Detection") -> Finding | None:
    if detection.framework == "gguf":
        gguf = next((f.name for f in view.weight_files if f.name.endswith(".gguf")), "a .gguf file")
        return Finding("framework_gguf", f"Incompatible framework: GGUF ({gguf}): mlx-lm cannot run GGUF weights; "
                                         f"use an MLX conversion such as mlx-community/{_mlx_name(view)}")
    if detection.framework == "pytorch":
        return Finding("framework_pytorch", "Incompatible framework: PyTorch (Transformers weights without MLX "
                                            "markers): mlx-lm cannot run "
                                            f"them as they are; convert with `mlx_lm.convert --hf-path {view.repo_id}`"
                                            f" or use an MLX conversion such as mlx-community/{_mlx_name(view)}")
    if detection.framework != "mlx":
        return Finding("framework_unknown", "no recognisable weights: mlx-lm cannot run this repo")
    return None


def check_legacy_weights(view: RepoView, detection: "Detection") -> Finding | None:
    """Old mlx-examples names mlx-lm no longer loads (it globs model*.safetensors)."""
    legacy = [f.name for f in view.files if "/" not in f.name and LEGACY_WEIGHTS.match(f.name)]
    modern = [n for n in view.root_names if n.startswith("model") and n.endswith(".safetensors")]
    if legacy and not modern:
        return Finding("legacy_weights", f"Legacy format not supported by mlx-lm: {legacy[0]} is a legacy weight "
                                         "file name (mlx-lm loads model*.safetensors); re-convert it with a current "
                                         "mlx_lm.convert")
    return None


_TYPE_VERDICTS: dict[str, bool] = {}


def check_model_type(view: RepoView, detection: "Detection") -> Finding | None:
    config = view.config or {}
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return Finding("unsupported_model_type", f"config.json has no model_type, so {mlx_lm_signature()} cannot "
                                                 "pick an architecture")
    if model_type in ENCODER_MODEL_TYPES:
        return None  # the inference worker's own encoder runs it (workers/inference/encoder.py)
    if not model_type_supported(model_type, config.get("architectures")):
        return Finding("unsupported_model_type", unsupported_reason(model_type, mlx_lm_signature(), config))
    return None


def model_type_supported(model_type: str, architectures=None) -> bool:
    """Whether the installed mlx-lm can build `model_type` (after its remapping); cached per type per process."""
    resolved = resolve_model_type(model_type, architectures)
    if resolved not in _TYPE_VERDICTS:
        _TYPE_VERDICTS[resolved] = _module_imports(f"mlx_lm.models.{resolved}") if _safe_module(resolved) else False
    return _TYPE_VERDICTS[resolved]


def resolve_model_type(model_type: str, architectures=None) -> str:
    """mlx-lm's own mapping of config model_type (and architecture) to its module name (mlx_lm.utils._get_classes)."""
    try:
        from mlx_lm.utils import MODEL_ARCHITECTURE_REMAPPING, MODEL_REMAPPING
    except ImportError:
        return model_type
    if isinstance(architectures, str):
        architectures = [architectures]
    for architecture in architectures or ():
        remapped = MODEL_ARCHITECTURE_REMAPPING.get((model_type, architecture))
        if remapped is not None:
            return remapped
    return MODEL_REMAPPING.get(model_type, model_type)


def _safe_module(name: str) -> bool:
    # A config value becomes a module name: never let it walk out of mlx_lm.models.
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None


def _module_imports(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
    except Exception as error:  # a model module that is present but broken is as unsupported as a missing one
        log.warning("importing %s failed: %s", module, error)
        return False


# Small JSON files the tokenizer loader (transformers) reads whole, as UTF-8 text: one stray byte or a BOM fails
# every load. tokenizer.json is parsed here too, in full: the runtime check runs once per change of the repo in the
# job worker (or for `mlxk health`), never on the `list` path, which only checks its first and last byte.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "chat_template.json", "generation_config.json")


def check_tokenizer_files_load(view: RepoView, detection: "Detection") -> Finding | None:
    """Each tokenizer JSON file parses the way transformers reads it (`open(encoding="utf-8")`, then json.load)."""
    for name in TOKENIZER_JSON_FILES:
        entry = view.by_name.get(name)
        if entry is None:
            continue
        try:
            with open(entry.path, encoding="utf-8") as f:
                json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            return Finding("tokenizer_invalid_json", f"{name} cannot be loaded ({_one_line(error)}); pull "
                                                     f"{view.repo_id} again")
    return None


def check_weights_fit_model(view: RepoView, detection: "Detection") -> Finding | None:
    """The weights fit the architecture config.json describes, as mlx-lm's loader checks them (strict: every
    parameter present with its shape), from the safetensors headers alone: mlx_lm.utils.load_model with lazy=True
    builds the model and reads the headers without loading a byte of weights (a few ms)."""
    if view.snapshot is None or not any(f.name.endswith(".safetensors") for f in view.weight_files):
        return None
    if (view.config or {}).get("model_type") in ENCODER_MODEL_TYPES:
        return None  # not an mlx-lm model: the worker's encoder checks its weights strictly when it loads them
    try:
        from mlx_lm.utils import load_model

        load_model(view.snapshot, lazy=True, strict=True)
    except Exception as error:  # noqa: BLE001 - any failure to build the model is this model's verdict
        return Finding("weights_config_mismatch", f"the weights do not fit config.json ({_one_line(error)}); "
                                                  "re-convert the model or pull it again")
    return None


def _one_line(error: BaseException, limit: int = 240) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
