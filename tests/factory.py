"""Tiny real MLX models and real Hugging Face cache layouts, for tests and benchmarks.

Why this exists: every part of mlxk (health checks, `list`, pull/push against the test Hub,
the inference worker) must be exercised on *real* artefacts without the network or the
user's cache. This module produces them:

- `tiny_model_files()` builds the file set of a real llama-architecture MLX model (random,
  seeded weights written by mlx-lm's own save functions, a byte-level BPE tokenizer trained with
  `tokenizers`), small enough to load and generate on the MLX CPU backend in milliseconds.
  A file set is built once per (spec, flags) per process and kept in an on-disk cache under the
  system temp dir (never the working directory or ~/.cache), so repeated runs skip the build.
- `write_repo()` lays files out exactly as huggingface_hub does: `models--org--name/blobs/<etag>`
  (sha256 for LFS files, git blob sha1 otherwise), `snapshots/<rev>/<path>` as relative symlinks,
  `refs/<ref>`, optionally `trees/<rev>.json`.
- `VARIANTS` / `make_variant()` give one repo per health rule, each recording what the health
  checker must conclude.

It imports without pytest (bench scripts put the repo root on sys.path and import it) and keeps
mlx imports inside the functions that need them, so a cache hit never imports mlx.

Quick reference (in tests prefer the fixtures of tests/fixtures/cache.py: hf_cache,
model_factory, tiny_model):

    files = tiny_model_files()                          # chat model; also chat_template=False,
                                                        # reasoning=, tools=, quantize=, shards=2,
                                                        # reply="Hello world!"
    repo = write_repo(cache_dir, "mlx-community/tiny-chat", files)
    repo.snapshot_dir, repo.revision, repo.path("config.json"), repo.blob_path("config.json")
    repo2 = add_revision(repo, {"README.md": b"v2", "generation_config.json": None})
    broken = make_variant(cache_dir, "shard_empty")     # VARIANTS["shard_empty"].expected
    info = file_info("model.safetensors", data)         # size, blob_id, sha256, etag (Hub metadata)

Generation on the random weights is deterministic with greedy sampling but meaningless text,
and an end-of-sequence token is rarely produced. Tests that need exact text, exact token counts
or `finish_reason: stop` use a scripted model instead: `tiny_model_files(reply="Hello world!")`
answers any prompt with exactly "Hello world!" (3 tokens) and then `<|im_end|>`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Union

# The test Hub decides what is LFS; the layouts written here name their blobs by its rule and hashes.
from tests.hubserver import LFS_MIN_SIZE, git_blob_sha1, is_lfs, lfs_pointer  # noqa: F401 (re-exported)

log = logging.getLogger("mlxk.tests.factory")

# Bump when the generated files change, so stale on-disk cache entries are ignored.
FACTORY_VERSION = "1"

FileContent = Union[bytes, Path]

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]

# The corpus the tokenizer is trained on; generation output is random text over this vocabulary.
_CORPUS = [
    "Hello, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "MLX is an array framework for machine learning on Apple silicon.",
    "A tiny model answers questions about the weather, numbers and code.",
    "What is the capital of France? The capital of France is Paris.",
    "Count with me: one, two, three, four, five, six, seven, eight, nine, ten.",
    "def add(a, b):\n    return a + b\n",
    '{"name": "get_weather", "arguments": {"city": "Berlin"}}',
    "The system prompt says: you are a helpful assistant.",
    "Once upon a time there was a small language model that lived in a cache.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols ! ? . , ; : - _ ( ) [ ] { } < > / \\ | @ # $ % ^ & * + = ~",
    "user assistant system tool function call response reasoning think answer",
    # Repeated so that "Hello world" merges into few distinct tokens (handy for reply=).
    "Hello world! Hello world! Hello world! Hello world! Hello world! Hello world!",
]


# --------------------------------------------------------------------------------------------
# Model spec and file sets


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a tiny llama model. `seed` fixes the random weights (files are reproducible)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    vocab_target: int = 384  # BPE trainer target before added tokens; config.vocab_size is exact
    seed: int = 0
    dtype: str = "float16"


TINY = ModelSpec()


@dataclass(frozen=True)
class FileSet:
    """What a file set is built from: the spec and tiny_model_files' flags (also its memo and disk-cache key)."""

    spec: ModelSpec = TINY
    chat_template: bool = True
    reasoning: bool = False
    tools: bool = False
    quantize: bool = False
    shards: int = 1
    reply: str | None = None

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError("shards must be >= 1")


_FILES_MEMO: dict[FileSet, dict[str, bytes]] = {}


def tiny_model_files(spec: ModelSpec = TINY, **flags) -> dict[str, bytes]:
    """The files of a real tiny MLX llama model, {repo path: bytes}.

    Files: config.json, model.safetensors (or model-0000i-of-0000n.safetensors when shards > 1),
    model.safetensors.index.json (mlx-lm's save_model always writes one), tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, generation_config.json, README.md.

    chat_template: ChatML template in tokenizer_config.json (False gives a base model).
    reasoning: `<think>`/`</think>` in the vocab (mlx-lm then reports has_thinking) and a template
      whose generation prompt opens `<think>\\n` (or renders an empty think block when
      enable_thinking=False).
    tools: a Qwen-style template that renders `tools` and `<tool_call>` blocks (mlx-lm picks its
      `json_tools` parser) and `<tool_call>`/`</tool_call>` added tokens.
    quantize: 4-bit, group size 64, via mlx-lm's quantize_model (config gets `quantization`).
    shards: split the weights into that many model-0000i-of-0000n.safetensors files + index.
    reply: instead of random weights, hand-set ones that make the model a "scripted" bigram
      machine: whatever the prompt, greedy decoding emits exactly the tokens of `reply` and then
      `<|im_end|>` (an eos id), so tests can assert exact text, token counts and
      finish_reason "stop" (or "length" with a smaller max_tokens). The tokens of `reply` must be
      distinct and at most hidden_size - 1; if the prompt ends with one of them, the reply
      continues from there.

    Flags (keyword only, the fields of `FileSet`): chat_template=True, reasoning=False, tools=False,
    quantize=False, shards=1, reply=None.

    Returns a fresh dict each call; the bytes objects are shared between calls, which is what
    makes `write_repo` cheap (hashes are memoized per bytes object).
    """
    key = FileSet(spec, **flags)
    files = _FILES_MEMO.get(key)
    if files is None:
        files = _load_or_build(key)
        _FILES_MEMO[key] = files
    return dict(files)


def _cache_root() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"mlxk-test-factory-{uid}"


def _cache_key(key: FileSet) -> str:
    versions = {}
    for dist in ("mlx", "mlx-lm", "tokenizers"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    payload = {
        "factory": FACTORY_VERSION,
        # Any edit of this module invalidates the cache: no stale models after a builder change.
        "source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "files": dataclasses.asdict(key),
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _load_or_build(key: FileSet) -> dict[str, bytes]:
    entry = _cache_root() / _cache_key(key)
    files = _read_cache_entry(entry)
    if files is not None:
        return files
    files = _build_model_files(key)
    _write_cache_entry(entry, files)
    return files


def _read_cache_entry(entry: Path) -> dict[str, bytes] | None:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        files = {}
        for name, digest in manifest.items():
            data = (entry / "files" / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                return None
            files[name] = data
        return files
    except (OSError, ValueError):
        return None


def _write_cache_entry(entry: Path, files: dict[str, bytes]) -> None:
    # Build in a private dir and rename: concurrent test processes never see half an entry.
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=entry.name + ".tmp-"))
        for name, data in files.items():
            target = tmp / "files" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        manifest = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
        if _read_cache_entry(entry) is not None:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)  # a corrupt entry: replace it
        try:
            os.rename(tmp, entry)
        except OSError:  # another process won the race; its entry is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        log.warning("could not cache tiny model files in %s: %s", entry, e)


def build_model_files_uncached(spec: ModelSpec = TINY, **flags) -> dict[str, bytes]:
    """Build a file set from scratch, bypassing both caches (for reproducibility checks)."""
    return _build_model_files(FileSet(spec, **flags))


def _build_model_files(key: FileSet) -> dict[str, bytes]:
    spec = key.spec
    tok_json, vocab = _build_tokenizer(spec, reasoning=key.reasoning, tools=key.tools)
    config = _model_config(spec, vocab)
    script = None
    if key.reply is not None:
        script = _reply_chain(tok_json, key.reply, spec)
        config["tie_word_embeddings"] = False  # the scripted lm_head differs from the embedding
    files = _build_weights(spec, config, quantize=key.quantize, shards=key.shards,
                           script=script, eos_id=vocab["<|im_end|>"])
    files["tokenizer.json"] = tok_json
    template = _chat_template(reasoning=key.reasoning, tools=key.tools) if key.chat_template else None
    files["tokenizer_config.json"] = _json_bytes(_tokenizer_config(spec, template))
    files["special_tokens_map.json"] = _json_bytes(_special_tokens_map())
    files["generation_config.json"] = _json_bytes(
        {"bos_token_id": vocab["<s>"], "eos_token_id": config["eos_token_id"], "do_sample": False}
    )
    files["README.md"] = _readme(chat_template=key.chat_template, reasoning=key.reasoning, tools=key.tools,
                                 quantize=key.quantize).encode()
    return dict(sorted(files.items()))


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def _build_tokenizer(spec: ModelSpec, *, reasoning: bool, tools: bool) -> tuple[bytes, dict]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_target,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    # Think and tool-call markers are added but not "special", as in Qwen/DeepSeek tokenizers:
    # they must survive decoding so mlx-lm can see them in the text.
    extra = (THINK_TOKENS if reasoning else []) + (TOOL_TOKENS if tools else [])
    if extra:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    return tok.to_str(pretty=True).encode(), tok.get_vocab(with_added_tokens=True)


def _model_config(spec: ModelSpec, vocab: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "vocab_size": len(vocab),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": vocab["<s>"],
        "eos_token_id": [vocab["</s>"], vocab["<|im_end|>"]],
        "torch_dtype": spec.dtype,
    }


def _reply_chain(tok_json: bytes, reply: str, spec: ModelSpec) -> list[int]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tok_json.decode()).encode(reply, add_special_tokens=False).ids
    if not ids or len(set(ids)) != len(ids) or len(ids) > spec.hidden_size - 1:
        raise ValueError(f"reply {reply!r} must be 1..{spec.hidden_size - 1} distinct tokens, got {ids}")
    return ids


def _script_weights(model, chain: list[int], eos_id: int, spec: ModelSpec) -> None:
    """Make the model a bigram machine: c1 → c2 → … → cK → eos, any other token → c1.

    Attention and MLP outputs are zeroed, so the residual stream is the token's embedding; each
    reply token gets its own one-hot embedding dimension (all others share the last one) and the
    lm_head row of its successor reads that dimension. A logit gap of 4·sqrt(hidden) makes even
    temperature-1 sampling follow the script almost surely.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    vocab, dim = model.args.vocab_size, spec.hidden_size
    other = dim - 1
    embed = [[0.0] * dim for _ in range(vocab)]
    head = [[0.0] * dim for _ in range(vocab)]
    for row in embed:
        row[other] = 1.0
    for i, token in enumerate(chain):
        embed[token][other] = 0.0
        embed[token][i] = 1.0
    successors = [(chain[0], other)] + [(chain[i + 1], i) for i in range(len(chain) - 1)]
    for token, source_dim in successors + [(eos_id, len(chain) - 1)]:
        head[token][source_dim] = 4.0
    dtype = getattr(mx, spec.dtype)
    updates = [(k, mx.zeros_like(v)) for k, v in tree_flatten(model.parameters())
               if k.endswith(("o_proj.weight", "down_proj.weight"))]
    updates += [("model.embed_tokens.weight", mx.array(embed, dtype=dtype)),
                ("lm_head.weight", mx.array(head, dtype=dtype))]
    model.load_weights(updates, strict=False)


def _build_weights(spec: ModelSpec, config: dict, *, quantize: bool, shards: int,
                   script: list[int] | None = None, eos_id: int = 0) -> dict[str, bytes]:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.utils import quantize_model, save_config, save_model

    mx.random.seed(spec.seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, spec.dtype))
    if script is not None:
        _script_weights(model, script, eos_id, spec)
    if quantize:
        with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints bits-per-weight
            model, config = quantize_model(model, config, group_size=64, bits=4)
    mx.eval(model.parameters())
    with tempfile.TemporaryDirectory(prefix="mlxk-factory-build-") as tmp:
        out = Path(tmp)
        if shards == 1:
            save_model(out, model)
        else:
            _save_sharded(out, dict(tree_flatten(model.parameters())), shards)
        save_config(dict(config), out / "config.json")
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _save_sharded(out: Path, weights: dict, shards: int) -> None:
    """Split weights into `shards` files with mlx-lm's names, metadata and index format.

    mlx-lm's save_model only splits past 5 GB, so tiny models need this to get real shard sets.
    """
    import mlx.core as mx

    names = sorted(weights)
    if len(names) < shards:
        raise ValueError(f"cannot split {len(names)} tensors into {shards} shards")
    per = -(-len(names) // shards)
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values()),
                          "total_parameters": sum(v.size for v in weights.values())},
             "weight_map": {}}
    for i in range(shards):
        part = {k: weights[k] for k in names[i * per:(i + 1) * per]}
        shard_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(out / shard_name), part, metadata={"format": "mlx"})
        index["weight_map"].update({k: shard_name for k in part})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def _tokenizer_config(spec: ModelSpec, template: str | None) -> dict:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
    }
    if template is not None:
        config["chat_template"] = template
    return config


def _special_tokens_map() -> dict:
    return {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }


_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2.5-style: mlx-lm's _infer_tool_parser picks `json_tools` for a template containing
# "<tool_call>" and "tool_call.name" (and not "<tool_call>\n<function=", which is qwen3_coder).
_TOOLS_SYSTEM = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
)
_TOOLS_MESSAGES = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def _generation_prompt(reasoning: bool) -> str:
    if not reasoning:
        return "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    # mlx-lm passes enable_thinking=has_thinking; like DeepSeek-R1 the prompt opens the think
    # block, and enable_thinking=False renders an empty one (Qwen3's convention).
    return (
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}"
        "{{- '<think>\\n\\n</think>\\n\\n' }}{%- else %}{{- '<think>\\n' }}{%- endif %}"
        "{%- endif %}"
    )


def tiny_embedding_files(spec: ModelSpec = TINY) -> dict[str, bytes]:
    """A tiny decoder embedding model, the way Qwen3-Embedding is one: the tiny llama base model's weights and
    tokenizer, with the model card of an embedding model (`pipeline_tag: feature-extraction`, the
    sentence-transformers tag) and a sentence-transformers `modules.json`, so the index classifies it `embedding`
    whatever its name. The inference worker pools its last token's hidden state."""
    files = tiny_model_files(spec, chat_template=False)
    files["README.md"] = (
        "---\nlibrary_name: mlx\nlicense: mit\npipeline_tag: feature-extraction\ntags:\n- mlx\n"
        "- sentence-transformers\n---\n\n# Tiny embedding model\n\nA tiny llama model generated by a test factory; "
        "its embedding is the last token's final hidden state.\n").encode()
    files["modules.json"] = _json_bytes([{"idx": 0, "name": "0", "path": "", "type":
                                          "sentence_transformers.models.Transformer"}])
    return files


BERT_WORDS = ("hello", "world", "the", "a", "an", "is", "of", "sentence", "different", "longer", "short", "cat",
              "dog", "sat", "on", "mat", "text", "vector", "embedding", "model")


def tiny_bert_files(*, model_type: str = "bert", pooling: str = "mean", hidden: int = 32, layers: int = 2,
                    seed: int = 0, quantize_bits: int | None = None) -> dict[str, bytes]:
    """A tiny BERT-family sentence-transformers model with random weights, as the Hub has them: Hugging Face
    parameter names (with the `pooler` and the `embeddings.position_ids` buffer an embedder ignores), a WordPiece
    tokenizer.json + vocab.txt adding [CLS]/[SEP], modules.json with Transformer, Pooling and Normalize modules and
    1_Pooling/config.json saying `pooling` ("mean", "cls", "max" or "lasttoken"). model_type "xlm-roberta" gives
    RoBERTa positions (padding index 1, so two more position rows) and one token type. `quantize_bits` stores every
    embedding and linear weight MLX-quantized (group size 32, `mx.quantize`: packed `weight`, `scales`, `biases`)
    with config.json's `quantization`, as mlx-community's conversions are. Written independently of the worker's
    encoder, so a naming or masking mistake there shows in the tests."""
    import mlx.core as mx
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    roberta = model_type != "bert"
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if not roberta else ["<s>", "<pad>", "</s>", "<unk>"]
    pad, unk, cls, sep = (special[0], special[1], special[2], special[3]) if not roberta else \
        ("<pad>", "<unk>", "<s>", "</s>")
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab_list = list(dict.fromkeys(special + letters + ["##" + c for c in letters] + list(BERT_WORDS)))
    vocab = {token: i for i, token in enumerate(vocab_list)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    tok.decoder = decoders.WordPiece()
    positions, offset = 64, (vocab[pad] + 1 if roberta else 0)
    config = {
        "architectures": ["XLMRobertaModel" if roberta else "BertModel"], "model_type": model_type,
        "vocab_size": len(vocab), "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
        "intermediate_size": hidden * 2, "max_position_embeddings": positions + offset,
        "type_vocab_size": 1 if roberta else 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
        "pad_token_id": vocab[pad], "torch_dtype": "float32",
    }
    key = mx.random.key(seed)

    def rand(*shape):
        nonlocal key
        key, sub = mx.random.split(key)
        return mx.random.normal(shape, key=sub) * 0.5

    h, i = hidden, hidden * 2
    weights = {"embeddings.word_embeddings.weight": rand(len(vocab), h),
               "embeddings.position_embeddings.weight": rand(positions + offset, h),
               "embeddings.token_type_embeddings.weight": rand(config["type_vocab_size"], h),
               "embeddings.LayerNorm.weight": mx.ones((h,)), "embeddings.LayerNorm.bias": mx.zeros((h,)),
               "embeddings.position_ids": mx.arange(positions + offset)[None],
               "pooler.dense.weight": rand(h, h), "pooler.dense.bias": rand(h)}
    for n in range(layers):
        at = f"encoder.layer.{n}."
        for name, shape in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                            ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                            ("intermediate.dense", (i, h)), ("output.dense", (h, i))):
            weights[at + name + ".weight"] = rand(*shape)
            weights[at + name + ".bias"] = rand(shape[0]) * 0.1
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            weights[at + norm + ".weight"] = 1 + rand(h) * 0.1
            weights[at + norm + ".bias"] = rand(h) * 0.1
    if quantize_bits:
        config["quantization"] = {"group_size": 32, "bits": quantize_bits}
        for name in [n for n, v in weights.items() if n.endswith(".weight") and v.ndim == 2 and "LayerNorm" not in n]:
            weights[name], weights[name[:-6] + "scales"], weights[name[:-6] + "biases"] = mx.quantize(
                weights[name], group_size=32, bits=quantize_bits)
    with tempfile.TemporaryDirectory(prefix="mlxk-factory-bert-") as tmp:
        out = Path(tmp) / "model.safetensors"
        mx.save_safetensors(str(out), weights, metadata={"format": "pt"})
        model_bytes = out.read_bytes()
    modes = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
             "lasttoken": "pooling_mode_lasttoken"}
    pooling_config = {"word_embedding_dimension": h, **{flag: mode == pooling for mode, flag in modes.items()}}
    tokenizer_class = "PreTrainedTokenizerFast" if roberta else "BertTokenizer"
    return dict(sorted({
        "config.json": _json_bytes(config),
        "model.safetensors": model_bytes,
        "tokenizer.json": tok.to_str().encode(),
        "vocab.txt": ("\n".join(vocab_list) + "\n").encode(),
        "tokenizer_config.json": _json_bytes({
            "tokenizer_class": tokenizer_class, "do_lower_case": True, "model_max_length": positions,
            "cls_token": cls, "sep_token": sep, "pad_token": pad, "unk_token": unk,
            **({"mask_token": "[MASK]"} if not roberta else {"bos_token": cls, "eos_token": sep})}),
        "special_tokens_map.json": _json_bytes({"cls_token": cls, "sep_token": sep, "pad_token": pad,
                                                "unk_token": unk}),
        "modules.json": _json_bytes([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]),
        "1_Pooling/config.json": _json_bytes(pooling_config),
        "sentence_bert_config.json": _json_bytes({"max_seq_length": positions, "do_lower_case": False}),
        "README.md": ("---\nlibrary_name: mlx\nlicense: mit\npipeline_tag: sentence-similarity\ntags:\n- mlx\n"
                      "- sentence-transformers\n---\n\n# Tiny BERT embedding model\n\nA tiny random "
                      f"{model_type} encoder generated by a test factory ({pooling} pooling).\n").encode(),
    }.items()))


def _chat_template(*, reasoning: bool, tools: bool) -> str:
    messages = _TOOLS_SYSTEM + _TOOLS_MESSAGES if tools else _CHATML.split("{%- if add_generation_prompt")[0]
    return messages + _generation_prompt(reasoning)


def _readme(*, chat_template: bool, reasoning: bool, tools: bool, quantize: bool,
            library_name: str = "mlx", tags: list[str] | None = None) -> str:
    tags = tags if tags is not None else ["mlx"]
    kind = "chat" if chat_template else "base"
    extras = [w for w, on in (("reasoning", reasoning), ("tools", tools), ("4-bit", quantize)) if on]
    tag_lines = "".join(f"- {t}\n" for t in tags)
    return (
        f"---\nlibrary_name: {library_name}\nlicense: mit\npipeline_tag: text-generation\n"
        f"tags:\n{tag_lines}---\n\n"
        f"# Tiny {kind} model{' (' + ', '.join(extras) + ')' if extras else ''}\n\n"
        "A tiny randomly initialised llama model generated by a test factory.\n"
    )


# --------------------------------------------------------------------------------------------
# Hashes the way the Hub computes them


@dataclass(frozen=True)
class FileInfo:
    """What the Hub reports for a file: size, git blob id, and for LFS files the sha256."""

    size: int
    blob_id: str  # git blob sha1 (of the LFS pointer text for LFS files), as in /tree listings
    sha256: str | None  # LFS files only

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def etag(self) -> str:
        """The blob name in the cache (and the ETag the Hub sends)."""
        return self.sha256 if self.sha256 is not None else self.blob_id

    def tree_entry(self) -> dict:
        """The entry huggingface_hub 2.4 writes in trees/<rev>.json."""
        entry: dict = {"size": self.size, "blob_id": self.blob_id}
        if self.sha256 is not None:
            entry["lfs_sha256"] = self.sha256
            entry["lfs_size"] = self.size
        return entry


# id(bytes) -> (bytes, lfs, FileInfo). The bytes object is kept alive so its id cannot be reused.
_INFO_MEMO: dict[tuple[int, bool], tuple[bytes, FileInfo]] = {}
_INFO_MEMO_MAX = 4096


def file_info(path: str, data: bytes) -> FileInfo:
    """Hub metadata of `data` stored at repo path `path` (memoized per bytes object)."""
    lfs = is_lfs(path, len(data))  # as the test Hub decides for a repo added without .gitattributes
    key = (id(data), lfs)
    hit = _INFO_MEMO.get(key)
    if hit is not None and hit[0] is data:
        return hit[1]
    if lfs:
        sha = hashlib.sha256(data).hexdigest()
        info = FileInfo(size=len(data), blob_id=git_blob_sha1(lfs_pointer(sha, len(data))), sha256=sha)
    else:
        info = FileInfo(size=len(data), blob_id=git_blob_sha1(data), sha256=None)
    if len(_INFO_MEMO) >= _INFO_MEMO_MAX:
        _INFO_MEMO.clear()
    _INFO_MEMO[key] = (data, info)
    return info


# --------------------------------------------------------------------------------------------
# The HF cache layout


@dataclass
class CachedRepo:
    """A repo written into a HF cache by `write_repo`."""

    repo_id: str
    repo_dir: Path  # <cache>/models--org--name
    revision: str
    snapshot_dir: Path  # <repo_dir>/snapshots/<revision>
    files: dict[str, FileInfo] = field(default_factory=dict)  # repo path -> Hub metadata

    def path(self, name: str) -> Path:
        """The snapshot path (a symlink) of a repo file."""
        return self.snapshot_dir / name

    def blob_path(self, name: str) -> Path:
        """The blob a repo file points to."""
        return self.repo_dir / "blobs" / self.files[name].etag

    @property
    def size_bytes(self) -> int:
        """Size of this revision's distinct blobs."""
        return sum({info.etag: info.size for info in self.files.values()}.values())

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()


def repo_folder_name(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def default_revision(repo_id: str, infos: Mapping[str, FileInfo]) -> str:
    """A deterministic 40-hex commit id from the repo id and the content of its files."""
    h = hashlib.sha1(repo_id.encode())
    for path in sorted(infos):
        h.update(f"\x00{path}\x00{infos[path].etag}".encode())
    return h.hexdigest()


def write_repo(
    cache_dir: Path,
    repo_id: str,
    files: Mapping[str, FileContent],
    *,
    revision: str | None = None,
    ref: str | None = "main",
    trees_json: bool = False,
    mtime: float | None = None,
    hardlink: bool = False,
) -> CachedRepo:
    """Write `files` as one snapshot of `repo_id` in the HF cache at `cache_dir`.

    Blobs already present (same etag) are not rewritten, so revisions share blobs. `ref`
    (e.g. "main"; None for a detached snapshot) is written to refs/<ref>. `trees_json` also writes
    trees/<revision>.json as huggingface_hub 2.4 does. `mtime` sets the modification time of
    everything written. `hardlink=True` hard-links blobs this process already wrote elsewhere
    instead of copying (for benchmarks building thousands of repos; never combine it with tests
    that modify blobs in place, the change would show in every linked repo).
    """
    cache_dir = Path(cache_dir)
    repo_dir = cache_dir / repo_folder_name(repo_id)
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for path in files:
        _check_repo_path(path)
    datas = {path: _as_bytes(content) for path, content in files.items()}
    infos = {path: file_info(path, data) for path, data in datas.items()}
    revision = revision or default_revision(repo_id, infos)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path, data in datas.items():
        blob = blobs / infos[path].etag
        _write_blob(blob, data, hardlink=hardlink)
        written += [blob, _link_snapshot_file(snapshot, path, infos[path].etag)]
    if ref is not None:
        ref_path = repo_dir / "refs" / ref
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        ref_path.write_text(revision)  # no trailing newline, as huggingface_hub writes it
        written.append(ref_path)
    if trees_json:
        written.append(write_trees_json(repo_dir, revision, infos))
    if mtime is not None:
        _set_mtimes(written + [snapshot, snapshot.parent, blobs, repo_dir], mtime)
    return CachedRepo(repo_id=repo_id, repo_dir=repo_dir, revision=revision, snapshot_dir=snapshot,
                      files=infos)


def _check_repo_path(path: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a repo file path: {path!r}")


def add_incomplete_blob(repo: CachedRepo, data: bytes, *, path: str = "model.safetensors",
                        fraction: float = 1 / 3) -> Path:
    """Leave `blobs/<etag>.incomplete` holding the first `fraction` of `data`, as an interrupted
    huggingface_hub download does (the etag is that of `data` stored at repo path `path`)."""
    blob = repo.repo_dir / "blobs" / f"{file_info(path, data).etag}.incomplete"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data[: int(len(data) * fraction)])
    return blob


def _as_bytes(content: FileContent) -> bytes:
    if isinstance(content, (bytes, bytearray)):
        return bytes(content) if isinstance(content, bytearray) else content
    return _read_path_memo(Path(content))


_PATH_MEMO: dict[tuple[str, int, int], bytes] = {}


def _read_path_memo(path: Path) -> bytes:
    # One bytes object per unchanged file, so its hash is computed once too.
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    data = _PATH_MEMO.get(key)
    if data is None:
        data = path.read_bytes()
        _PATH_MEMO[key] = data
    return data


# etag -> a blob path this process wrote, used as the source of hard links.
_WRITTEN_BLOBS: dict[str, Path] = {}


def _write_blob(blob: Path, data: bytes, *, hardlink: bool) -> None:
    if blob.exists() and blob.stat().st_size == len(data):
        return
    source = _WRITTEN_BLOBS.get(blob.name) if hardlink else None
    if source is not None and source != blob:
        try:
            os.link(source, blob)
            return
        except OSError:
            pass  # other filesystem, or the source is gone: copy instead
    blob.write_bytes(data)
    _WRITTEN_BLOBS[blob.name] = blob


def _link_snapshot_file(snapshot: Path, path: str, etag: str) -> Path:
    link = snapshot / path
    link.parent.mkdir(parents=True, exist_ok=True)
    depth = len(Path(path).parts) - 1  # nested files sit deeper below snapshots/<rev>
    target = "/".join([".."] * (2 + depth) + ["blobs", etag])
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)
    return link


def write_trees_json(repo_dir: Path, revision: str, infos: Mapping[str, FileInfo]) -> Path:
    """trees/<revision>.json in huggingface_hub 2.4's format (see huggingface_hub/_tree_cache.py)."""
    path = repo_dir / "trees" / f"{revision}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format_version": 1, "files": {p: infos[p].tree_entry() for p in sorted(infos)}}
    path.write_text(json.dumps(data, indent=1))
    return path


def _set_mtimes(paths: list[Path], mtime: float) -> None:
    for p in paths:
        os.utime(p, (mtime, mtime), follow_symlinks=False)


def snapshot_files(repo: CachedRepo) -> dict[str, bytes]:
    """The current content of every file of a written snapshot."""
    return {name: repo.path(name).read_bytes() for name in repo.files if repo.path(name).exists()}


def add_revision(
    repo: CachedRepo,
    changes: Mapping[str, FileContent | None],
    *,
    revision: str | None = None,
    ref: str | None = "main",
    trees_json: bool = False,
    mtime: float | None = None,
) -> CachedRepo:
    """A second commit of `repo`: its files with `changes` applied (None deletes a file).

    Unchanged files share their blobs with the first revision. With ref="main" (the default)
    refs/main moves to the new revision; ref=None leaves it where it was.
    """
    files: dict[str, FileContent] = dict(snapshot_files(repo))
    for name, content in changes.items():
        if content is None:
            files.pop(name, None)
        else:
            files[name] = content
    return write_repo(repo.repo_dir.parent, repo.repo_id, files, revision=revision, ref=ref,
                      trees_json=trees_json, mtime=mtime)


def model_files_for(repo_id: str, spec: ModelSpec = TINY) -> dict[str, bytes]:
    """Tiny model files whose flavour follows the repo name, for serving arbitrary names.

    Case-insensitive markers in the name: "base" → no chat template; "think"/"reason"/"r1" →
    reasoning; "tool" → tools; "4bit"/"quant" → quantized. Anything else is a tiny chat model.
    """
    name = repo_id.lower().rsplit("/", 1)[-1]
    return tiny_model_files(
        spec,
        chat_template="base" not in name,
        reasoning=any(m in name for m in ("think", "reason", "r1")),
        tools="tool" in name,
        quantize=any(m in name for m in ("4bit", "quant")),
    )


# --------------------------------------------------------------------------------------------
# Safetensors surgery (no mlx needed)


def safetensors_header(data: bytes) -> dict:
    """The parsed JSON header of a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


def with_safetensors_metadata(data: bytes, metadata: dict | None) -> bytes:
    """The same tensors with `__metadata__` replaced (None removes it), header re-padded to 8."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def with_safetensors_dtype(data: bytes, old: str, new: str) -> bytes:
    """The same bytes with every `old` dtype in the header renamed `new` (e.g. F32 -> I32, same width): a file that
    parses and has the right size, whose weights mlx then reads as the wrong type (a broken conversion)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    for name, tensor in header.items():
        if name != "__metadata__" and tensor.get("dtype") == old:
            tensor["dtype"] = new
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def gguf_bytes(n_padding: int = 4096) -> bytes:
    """A minimal well-formed GGUF v3 file: magic, version, zero tensors, zero metadata keys."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + b"\x00" * n_padding


# --------------------------------------------------------------------------------------------
# Variants: one repo per health rule


@dataclass(frozen=True)
class Variant:
    """A cache repo shape and what mlxk's health checker must conclude about it."""

    name: str
    health: str  # "healthy" | "unhealthy"
    runtime_compatible: bool | None  # None when integrity fails (runtime is not judged)
    rule: str | None  # the failing rule id (== name for broken / not-runnable ones), None if fine
    framework: str  # "mlx" | "gguf" | "pytorch"
    model_type: str  # "chat" | "base" | "embedding"
    repo_id: str  # default repo id
    note: str
    build: Callable[[Path, str], CachedRepo] = field(repr=False, compare=False)

    @property
    def expected(self) -> dict:
        """The model-object fields the checker must produce: compare with `{k: model[k] ...}`."""
        return {"health": self.health, "runtime_compatible": self.runtime_compatible,
                "framework": self.framework, "model_type": self.model_type}


def _chat() -> dict[str, bytes]:
    return tiny_model_files(TINY)


def _sharded() -> dict[str, bytes]:
    return tiny_model_files(TINY, shards=2)


_SHARD1 = "model-00001-of-00002.safetensors"
_SHARD2 = "model-00002-of-00002.safetensors"


def _without(files: dict, *names: str) -> dict:
    return {k: v for k, v in files.items() if k not in names}


def _b_healthy_chat(cache: Path, repo_id: str) -> CachedRepo:
    return write_repo(cache, repo_id, _chat())


def _b_healthy_base(cache: Path, repo_id: str) -> CachedRepo:
    return write_repo(cache, repo_id, tiny_model_files(TINY, chat_template=False))


def _b_healthy_quantized(cache: Path, repo_id: str) -> CachedRepo:
    return write_repo(cache, repo_id, tiny_model_files(TINY, quantize=True))


def _b_healthy_sharded(cache: Path, repo_id: str) -> CachedRepo:
    return write_repo(cache, repo_id, _sharded())


def _b_healthy_with_leftover_incomplete(cache: Path, repo_id: str) -> CachedRepo:
    repo = write_repo(cache, repo_id, _chat())
    # An abandoned download of some other (older) weights file, beside a complete snapshot.
    add_incomplete_blob(repo, b"an older revision's weights" * 64)
    return repo


def _b_healthy_trees_json(cache: Path, repo_id: str) -> CachedRepo:
    return write_repo(cache, repo_id, _chat(), trees_json=True)


def _b_healthy_detached(cache: Path, repo_id: str) -> CachedRepo:
    return write_repo(cache, repo_id, _chat(), ref=None)


def _b_gguf(cache: Path, repo_id: str) -> CachedRepo:
    files = _without(_chat(), "model.safetensors", "model.safetensors.index.json", "README.md")
    files["tiny-model-Q4_K_M.gguf"] = gguf_bytes()
    files["README.md"] = _readme(chat_template=True, reasoning=False, tools=False, quantize=False,
                                 library_name="gguf", tags=["gguf", "llama"]).encode()
    return write_repo(cache, repo_id, files)


def _b_pytorch(cache: Path, repo_id: str) -> CachedRepo:
    files = _chat()
    # What transformers writes: format "pt", and no mlx marker anywhere.
    files["model.safetensors"] = with_safetensors_metadata(files["model.safetensors"], {"format": "pt"})
    files = _without(files, "model.safetensors.index.json")
    files["README.md"] = _readme(chat_template=True, reasoning=False, tools=False, quantize=False,
                                 library_name="transformers", tags=["llama", "text-generation"]).encode()
    return write_repo(cache, repo_id, files)


def _b_legacy_weights(cache: Path, repo_id: str) -> CachedRepo:
    files = _chat()
    files["weights.00.safetensors"] = files.pop("model.safetensors")
    files = _without(files, "model.safetensors.index.json")
    return write_repo(cache, repo_id, files)


def _b_unsupported_model_type(cache: Path, repo_id: str) -> CachedRepo:
    files = _chat()
    config = json.loads(files["config.json"])
    config["model_type"] = "notamodel"
    config["architectures"] = ["NotAModelForCausalLM"]
    files["config.json"] = _json_bytes(config)
    return write_repo(cache, repo_id, files)


def _b_config_missing(cache: Path, repo_id: str) -> CachedRepo:
    return write_repo(cache, repo_id, _without(_chat(), "config.json"))


def _b_config_invalid_json(cache: Path, repo_id: str) -> CachedRepo:
    files = _chat()
    files["config.json"] = files["config.json"][: len(files["config.json"]) // 2]
    return write_repo(cache, repo_id, files)


def _b_config_not_object(cache: Path, repo_id: str) -> CachedRepo:
    files = _chat()
    files["config.json"] = b"[]\n"
    return write_repo(cache, repo_id, files)


def _b_no_weights(cache: Path, repo_id: str) -> CachedRepo:
    return write_repo(cache, repo_id, _without(_chat(), "model.safetensors", "model.safetensors.index.json"))


def _b_index_shard_missing(cache: Path, repo_id: str) -> CachedRepo:
    return write_repo(cache, repo_id, _without(_sharded(), _SHARD2))


def _b_shard_empty(cache: Path, repo_id: str) -> CachedRepo:
    files = _sharded()
    files[_SHARD2] = b""
    return write_repo(cache, repo_id, files)


def _b_shard_lfs_pointer(cache: Path, repo_id: str) -> CachedRepo:
    files = _sharded()
    real = files[_SHARD2]
    files[_SHARD2] = lfs_pointer(hashlib.sha256(real).hexdigest(), len(real))
    return write_repo(cache, repo_id, files)


def _b_shards_without_index(cache: Path, repo_id: str) -> CachedRepo:
    return write_repo(cache, repo_id, _without(_sharded(), "model.safetensors.index.json"))


def _b_dangling_symlink(cache: Path, repo_id: str) -> CachedRepo:
    # generation_config.json: a file no earlier rule looks at, so only the symlink rule fires.
    repo = write_repo(cache, repo_id, _chat())
    repo.blob_path("generation_config.json").unlink()
    return repo


def _b_tree_mismatch(cache: Path, repo_id: str) -> CachedRepo:
    repo = write_repo(cache, repo_id, _chat(), trees_json=True)
    trees = repo.repo_dir / "trees" / f"{repo.revision}.json"
    data = json.loads(trees.read_text())
    data["files"]["README.md"]["size"] += 7  # the Hub said README.md is bigger than what we have
    trees.write_text(json.dumps(data, indent=1))
    return repo


def _b_incomplete_download(cache: Path, repo_id: str) -> CachedRepo:
    # What an interrupted `hf download` leaves: small files linked, refs/main written, the
    # weights still a `<sha256>.incomplete` blob with no snapshot link.
    files = _chat()
    weights = files["model.safetensors"]
    repo = write_repo(cache, repo_id, _without(files, "model.safetensors"),
                      revision=default_revision(repo_id, {k: file_info(k, v) for k, v in files.items()}))
    add_incomplete_blob(repo, weights)
    return repo


def _b_safetensors_truncated(cache: Path, repo_id: str) -> CachedRepo:
    files = _chat()
    files["model.safetensors"] = files["model.safetensors"][:-1000]
    return write_repo(cache, repo_id, files)


def _b_safetensors_bad_header(cache: Path, repo_id: str) -> CachedRepo:
    files = _chat()
    data = files["model.safetensors"]
    (n,) = struct.unpack("<Q", data[:8])
    garbage = b"{not json" + b"!" * (n - 9)  # same header length, unparseable JSON
    files["model.safetensors"] = data[:8] + garbage + data[8 + n:]
    return write_repo(cache, repo_id, files)


def _b_tokenizer_missing(cache: Path, repo_id: str) -> CachedRepo:
    return write_repo(cache, repo_id, _without(_chat(), "tokenizer.json"))


def _v(name: str, health: str, runtime: bool | None, rule: str | None, build, note: str, *,
       framework: str = "mlx", model_type: str = "chat", repo_id: str | None = None) -> Variant:
    repo_id = repo_id or f"mlx-community/tiny-{name.replace('_', '-')}"
    return Variant(name=name, health=health, runtime_compatible=runtime, rule=rule,
                   framework=framework, model_type=model_type, repo_id=repo_id, note=note, build=build)


def _healthy(name, build, note, **kw) -> Variant:
    return _v(name, "healthy", True, None, build, note, **kw)


def _not_runnable(name, build, note, **kw) -> Variant:
    return _v(name, "healthy", False, name, build, note, **kw)


def _broken(name, build, note, **kw) -> Variant:
    return _v(name, "unhealthy", None, name, build, note, **kw)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        _healthy("healthy_chat", _b_healthy_chat, "tiny chat model, refs/main"),
        _healthy("healthy_base", _b_healthy_base, "no chat template anywhere", model_type="base",
                 repo_id="mlx-community/tiny-base"),
        _healthy("healthy_quantized", _b_healthy_quantized, "4-bit, config has quantization"),
        _healthy("healthy_sharded", _b_healthy_sharded, "two shards + model.safetensors.index.json"),
        _healthy("healthy_with_leftover_incomplete", _b_healthy_with_leftover_incomplete,
                 "complete snapshot plus a stray blobs/<sha256>.incomplete (reclaimable)"),
        _healthy("healthy_trees_json", _b_healthy_trees_json, "trees/<rev>.json matches the snapshot"),
        _healthy("healthy_detached", _b_healthy_detached, "no refs/main, one snapshot"),
        _not_runnable("gguf", _b_gguf, "a .gguf file (+ config/tokenizer), README library_name gguf",
                      framework="gguf", repo_id="example-org/tiny-gguf"),
        _not_runnable("pytorch", _b_pytorch, "safetensors format pt, no mlx markers, non-mlx org",
                      framework="pytorch", repo_id="example-org/tiny-pytorch"),
        _not_runnable("legacy_weights", _b_legacy_weights, "weights.00.safetensors, no index"),
        _not_runnable("unsupported_model_type", _b_unsupported_model_type,
                      "config model_type notamodel"),
        _broken("config_missing", _b_config_missing, "no config.json"),
        _broken("config_invalid_json", _b_config_invalid_json, "config.json cut in half"),
        _broken("config_not_object", _b_config_not_object, "config.json is []"),
        _broken("no_weights", _b_no_weights, "no safetensors and no index"),
        _broken("index_shard_missing", _b_index_shard_missing,
                "index names model-00002-of-00002.safetensors, which is absent"),
        _broken("shard_empty", _b_shard_empty, "second shard is 0 bytes"),
        _broken("shard_lfs_pointer", _b_shard_lfs_pointer, "second shard is a Git LFS pointer text"),
        _broken("shards_without_index", _b_shards_without_index, "two shards, no index"),
        _broken("dangling_symlink", _b_dangling_symlink,
                "snapshot generation_config.json links to a deleted blob"),
        _broken("tree_mismatch", _b_tree_mismatch, "trees json says README.md is 7 bytes bigger"),
        _broken("incomplete_download", _b_incomplete_download,
                "refs/main + snapshot without model.safetensors (index still names it) and its "
                "blob as <sha256>.incomplete: must win over index_shard_missing"),
        _broken("safetensors_truncated", _b_safetensors_truncated,
                "model.safetensors missing its last 1000 bytes"),
        _broken("safetensors_bad_header", _b_safetensors_bad_header,
                "header length intact, header JSON garbage"),
        _broken("tokenizer_missing", _b_tokenizer_missing,
                "tokenizer_config.json without tokenizer.json / tokenizer.model"),
    ]
}


def make_variant(cache_dir: Path, name: str, *, repo_id: str | None = None) -> CachedRepo:
    """Write variant `name` (see VARIANTS) into the HF cache at `cache_dir`."""
    try:
        variant = VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}") from None
    return variant.build(Path(cache_dir), repo_id or variant.repo_id)
