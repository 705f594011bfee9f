"""The factory builds real MLX models in the real HF cache layout: huggingface_hub and mlx-lm agree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests import factory
from tests.factory import VARIANTS, ModelSpec, make_variant, tiny_model_files, write_repo

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- layout


def test_layout_is_the_hf_layout(hf_cache):
    files = tiny_model_files()
    files["nested/dir/extra.json"] = b'{"deep": true}\n'
    repo = write_repo(hf_cache, "mlx-community/tiny-chat", files)

    assert repo.repo_dir == hf_cache / "models--mlx-community--tiny-chat"
    assert (repo.repo_dir / "refs" / "main").read_bytes() == repo.revision.encode()  # no newline
    assert len(repo.revision) == 40 and int(repo.revision, 16) >= 0
    for name, data in files.items():
        link = repo.snapshot_dir / name
        assert link.is_symlink()
        target = os.readlink(link)
        ups = 2 + name.count("/")
        assert target == "../" * ups + "blobs/" + repo.files[name].etag
        assert link.read_bytes() == data
        assert link.resolve() == (repo.repo_dir / "blobs" / repo.files[name].etag).resolve()
    assert sorted(p.name for p in (repo.repo_dir / "blobs").iterdir()) == sorted(
        {i.etag for i in repo.files.values()})


def test_blob_names_are_the_hub_etags(hf_cache):
    files = tiny_model_files()
    repo = write_repo(hf_cache, "org/m", files)
    git = shutil.which("git")
    for name, data in files.items():
        etag = repo.files[name].etag
        if name.endswith(".safetensors"):
            import hashlib
            assert etag == hashlib.sha256(data).hexdigest()
        elif git:  # git itself says what a blob id is
            out = subprocess.run([git, "hash-object", "--stdin"], input=data, capture_output=True, check=True)
            assert etag == out.stdout.decode().strip()
        else:
            assert etag == factory.git_blob_sha1(data)
    assert factory.file_info("big.txt", b"x" * factory.LFS_MIN_SIZE).is_lfs


def test_revisions_share_blobs_and_move_main(hf_cache):
    first = write_repo(hf_cache, "org/m", tiny_model_files())
    weights_blob = first.blob_path("model.safetensors")
    inode = weights_blob.stat().st_ino
    second = factory.add_revision(first, {"README.md": b"# v2\n", "generation_config.json": None})

    assert second.revision != first.revision
    assert (first.repo_dir / "refs" / "main").read_text() == second.revision
    assert first.snapshot_dir.is_dir() and second.snapshot_dir.is_dir()
    assert not second.path("generation_config.json").exists()
    assert second.blob_path("model.safetensors") == weights_blob
    assert weights_blob.stat().st_ino == inode  # written once, not rewritten
    blobs = list((first.repo_dir / "blobs").iterdir())
    assert len(blobs) == len(first.files) + 1  # only the new README is a new blob
    # The same content gives the same revision: rewriting is idempotent.
    assert write_repo(hf_cache, "org/m", tiny_model_files()).revision == first.revision


def test_detached_snapshot_and_mtime(hf_cache):
    repo = write_repo(hf_cache, "org/m", tiny_model_files(), ref=None, mtime=1_600_000_000.0)
    assert not (repo.repo_dir / "refs").exists()
    assert repo.snapshot_dir.stat().st_mtime == 1_600_000_000.0
    assert repo.blob_path("config.json").stat().st_mtime == 1_600_000_000.0
    assert os.lstat(repo.path("config.json")).st_mtime == 1_600_000_000.0


def test_trees_json_is_what_huggingface_hub_writes(hf_cache, tmp_path):
    from huggingface_hub._tree_cache import TreeCacheEntry, read_tree_cache, write_tree_cache

    repo = write_repo(hf_cache, "org/m", tiny_model_files(), trees_json=True)
    entries = read_tree_cache(str(repo.repo_dir), repo.revision)
    assert set(entries) == set(repo.files)
    st = entries["model.safetensors"]
    assert st.lfs_sha256 == repo.files["model.safetensors"].etag
    assert st.size == st.lfs_size == repo.path("model.safetensors").stat().st_size
    assert entries["config.json"].lfs_sha256 is None
    # Byte for byte what huggingface_hub itself writes for the same listing.
    theirs = tmp_path / "theirs"
    write_tree_cache(str(theirs), repo.revision,
                     {p: TreeCacheEntry.from_json(i.tree_entry()) for p, i in repo.files.items()})
    ours = repo.repo_dir / "trees" / f"{repo.revision}.json"
    assert ours.read_bytes() == (theirs / "trees" / f"{repo.revision}.json").read_bytes()


# ---------------------------------------------------------------- huggingface_hub reads it


def test_scan_cache_dir_reads_every_sound_variant_without_warnings(hf_cache):
    from huggingface_hub import scan_cache_dir

    sound = [n for n, v in VARIANTS.items() if n != "dangling_symlink"]
    for name in sound:
        make_variant(hf_cache, name)
    info = scan_cache_dir(hf_cache)
    assert info.warnings == []
    assert {r.repo_id for r in info.repos} == {VARIANTS[n].repo_id for n in sound}
    chat = next(r for r in info.repos if r.repo_id == VARIANTS["healthy_chat"].repo_id)
    (rev,) = chat.revisions
    assert rev.refs == frozenset({"main"})
    assert chat.size_on_disk == sum(len(data) for data in tiny_model_files().values())
    detached = next(r for r in info.repos if r.repo_id == VARIANTS["healthy_detached"].repo_id)
    assert [r.refs for r in detached.revisions] == [frozenset()]
    assert {f.file_path.name for f in info.incomplete_files} >= {
        p.name for p in hf_cache.glob("*/blobs/*.incomplete")} != set()


def test_scan_cache_dir_notices_the_dangling_symlink(hf_cache):
    from huggingface_hub import scan_cache_dir

    make_variant(hf_cache, "dangling_symlink")
    (warning,) = scan_cache_dir(hf_cache).warnings
    assert "Blob missing" in str(warning)


def test_snapshot_download_finds_it_offline(hf_cache):
    from huggingface_hub import hf_hub_download, snapshot_download

    repo = write_repo(hf_cache, "mlx-community/tiny-chat", tiny_model_files())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = snapshot_download("mlx-community/tiny-chat", cache_dir=hf_cache, local_files_only=True)
        config = hf_hub_download("mlx-community/tiny-chat", "config.json", cache_dir=hf_cache,
                                 local_files_only=True)
    assert Path(path) == repo.snapshot_dir
    assert Path(config) == repo.path("config.json")


# ---------------------------------------------------------------- the files themselves


def test_files_are_a_real_mlx_model():
    files = tiny_model_files()
    assert factory.safetensors_header(files["model.safetensors"])["__metadata__"] == {"format": "mlx"}
    config = json.loads(files["config.json"])
    tokenizer = json.loads(files["tokenizer.json"])
    vocab_size = len(tokenizer["model"]["vocab"]) + len(
        [t for t in tokenizer["added_tokens"] if t["content"] not in tokenizer["model"]["vocab"]])
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == vocab_size
    assert isinstance(config["eos_token_id"], list) and len(config["eos_token_id"]) >= 2
    assert json.loads(files["generation_config.json"])["eos_token_id"] == config["eos_token_id"]
    tok_config = json.loads(files["tokenizer_config.json"])
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in tok_config["chat_template"]
    assert files["README.md"].startswith(b"---\nlibrary_name: mlx\n")
    assert b"tags:\n- mlx\n" in files["README.md"]
    quantized = json.loads(tiny_model_files(quantize=True)["config.json"])
    assert quantized["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert "chat_template" not in json.loads(tiny_model_files(chat_template=False)["tokenizer_config.json"])


def test_memoized_per_process_and_reproducible():
    a, b = tiny_model_files(), tiny_model_files()
    assert a is not b and a["model.safetensors"] is b["model.safetensors"]  # shared bytes, fresh dict
    assert factory.build_model_files_uncached() == a  # same seed, same bytes


def test_disk_cache_hit_needs_no_mlx(tmp_path):
    tiny_model_files()  # make sure the on-disk entry exists
    code = ("import sys; from tests import factory; f = factory.tiny_model_files(); "
            "print(sorted(f)[0], 'mlx' in sys.modules, 'mlx_lm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.stdout.split() == ["README.md", "False", "False"]
    import pwd

    root = factory._cache_root()
    real_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    assert not root.is_relative_to(REPO_ROOT) and not root.is_relative_to(real_home / ".cache")
    assert any(root.iterdir())


# ---------------------------------------------------------------- mlx-lm loads and runs them


def test_mlx_lm_loads_and_generates(tiny_model):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(tiny_model.snapshot_dir))
    eos = set(json.loads(tiny_model.read("config.json"))["eos_token_id"])
    assert tokenizer.eos_token_ids == eos
    assert tokenizer.has_chat_template and not tokenizer.has_thinking and not tokenizer.has_tool_calling
    text = mlx_lm.generate(model, tokenizer, prompt="Hello", max_tokens=8)
    assert isinstance(text, str)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tokenizer.decode(prompt) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    steps = list(mlx_lm.stream_generate(model, tokenizer, prompt=prompt, max_tokens=8))
    assert 1 <= len(steps) <= 8 and steps[-1].generation_tokens == len(steps)
    assert steps[-1].prompt_tokens == len(prompt)


@pytest.mark.parametrize(
    "flags, thinking, tool_calling, chat",
    [
        ({"reasoning": True}, True, False, True),
        ({"tools": True}, False, True, True),
        ({"reasoning": True, "tools": True}, True, True, True),
        ({"chat_template": False}, False, False, False),
        ({"quantize": True}, False, False, True),
        ({"shards": 2}, False, False, True),
    ],
)
def test_flags_are_what_mlx_lm_detects(model_factory, flags, thinking, tool_calling, chat):
    import mlx_lm

    repo = model_factory.repo("mlx-community/tiny-flags", **flags)
    model, tokenizer = mlx_lm.load(str(repo.snapshot_dir))
    assert (tokenizer.has_thinking, tokenizer.has_tool_calling, tokenizer.has_chat_template) == (
        thinking, tool_calling, chat)
    assert mlx_lm.generate(model, tokenizer, prompt="Hi", max_tokens=2) is not None
    messages = [{"role": "user", "content": "Weather in Berlin?"}]
    if tool_calling:
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
        called = messages + [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Berlin"}}}]}]
        rendered = tokenizer.apply_chat_template(called, tools=tools, tokenize=False)
        assert '"name": "get_weather"' in rendered and "<tool_call>" in rendered
        call = rendered.split("<tool_call>\n")[-1].split("\n</tool_call>")[0]
        assert tokenizer.tool_parser(call, tools) == {"name": "get_weather", "arguments": {"city": "Berlin"}}
        assert len(tokenizer.tool_call_start_tokens) == 1  # one added token
    if thinking:
        on = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        off = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                            enable_thinking=False)
        assert on.endswith("<think>\n") and off.endswith("<think>\n\n</think>\n\n")
        assert tokenizer.think_start_id == tokenizer.convert_tokens_to_ids("<think>")


# ---------------------------------------------------------------- variants


_SHAPE = {
    "healthy_chat": lambda r: r.path("model.safetensors").is_file(),
    "healthy_base": lambda r: "chat_template" not in json.loads(r.read("tokenizer_config.json")),
    "healthy_quantized": lambda r: "quantization" in json.loads(r.read("config.json")),
    "healthy_sharded": lambda r: {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    == set(json.loads(r.read("model.safetensors.index.json"))["weight_map"].values()),
    "healthy_with_leftover_incomplete": lambda r: len(list(r.repo_dir.glob("blobs/*.incomplete"))) == 1,
    "healthy_trees_json": lambda r: (r.repo_dir / "trees" / f"{r.revision}.json").is_file(),
    "healthy_detached": lambda r: not (r.repo_dir / "refs").exists(),
    "gguf": lambda r: r.read("tiny-model-Q4_K_M.gguf")[:4] == b"GGUF" and not list(
        r.snapshot_dir.glob("*.safetensors")),
    "pytorch": lambda r: factory.safetensors_header(r.read("model.safetensors"))["__metadata__"]
    == {"format": "pt"} and b"mlx" not in r.read("README.md").lower(),
    "legacy_weights": lambda r: r.path("weights.00.safetensors").is_file(),
    "unsupported_model_type": lambda r: json.loads(r.read("config.json"))["model_type"] == "notamodel",
    "config_missing": lambda r: not r.path("config.json").exists(),
    "config_invalid_json": lambda r: _json_fails(r.read("config.json")),
    "config_not_object": lambda r: json.loads(r.read("config.json")) == [],
    "no_weights": lambda r: not list(r.snapshot_dir.glob("*.safetensors*")),
    "index_shard_missing": lambda r: not r.path("model-00002-of-00002.safetensors").exists(),
    "shard_empty": lambda r: r.path("model-00002-of-00002.safetensors").stat().st_size == 0,
    "shard_lfs_pointer": lambda r: r.read("model-00002-of-00002.safetensors").startswith(
        b"version https://git-lfs.github.com/spec/v1\n"),
    "shards_without_index": lambda r: not r.path("model.safetensors.index.json").exists()
    and len(list(r.snapshot_dir.glob("model-*.safetensors"))) == 2,
    "dangling_symlink": lambda r: r.path("generation_config.json").is_symlink()
    and not r.path("generation_config.json").exists(),
    "tree_mismatch": lambda r: json.loads((r.repo_dir / "trees" / f"{r.revision}.json").read_text())[
        "files"]["README.md"]["size"] != r.path("README.md").stat().st_size,
    "incomplete_download": lambda r: not r.path("model.safetensors").exists()
    and len(list(r.repo_dir.glob("blobs/*.incomplete"))) == 1,
    "safetensors_truncated": lambda r: _safetensors_data_short(r.read("model.safetensors")),
    "safetensors_bad_header": lambda r: _json_fails(r.read("model.safetensors")[8:]),
    "tokenizer_missing": lambda r: r.path("tokenizer_config.json").exists()
    and not r.path("tokenizer.json").exists() and not r.path("tokenizer.model").exists(),
}


def _json_fails(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return True
    return False


def _safetensors_data_short(data: bytes) -> bool:
    header = factory.safetensors_header(data)
    n = int.from_bytes(data[:8], "little")
    end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    return len(data) < 8 + n + end


def test_variant_table_is_complete_and_consistent():
    assert set(_SHAPE) == set(VARIANTS)
    for name, v in VARIANTS.items():
        assert v.health in ("healthy", "unhealthy") and v.framework in ("mlx", "gguf", "pytorch")
        if v.rule is None:
            assert (v.health, v.runtime_compatible) == ("healthy", True)
        else:
            assert v.rule == name
            assert v.runtime_compatible is (False if v.health == "healthy" else None)
    assert VARIANTS["healthy_base"].model_type == "base"
    assert not VARIANTS["pytorch"].repo_id.startswith("mlx-community/")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_builds(hf_cache, name):
    repo = make_variant(hf_cache, name)
    assert repo.repo_id == VARIANTS[name].repo_id and repo.snapshot_dir.is_dir()
    assert _SHAPE[name](repo)
    other = make_variant(hf_cache, name, repo_id="someone/else")
    assert other.repo_dir.name == "models--someone--else"


def test_unknown_variant_names_the_known_ones(hf_cache):
    with pytest.raises(KeyError, match="healthy_chat"):
        make_variant(hf_cache, "nope")


def test_healthy_quantized_and_sharded_load(hf_cache):
    import mlx_lm

    for name in ("healthy_quantized", "healthy_sharded"):
        model, tokenizer = mlx_lm.load(str(make_variant(hf_cache, name).snapshot_dir))
        assert mlx_lm.generate(model, tokenizer, prompt="Hi", max_tokens=2) is not None


# ---------------------------------------------------------------- speed and fixtures


def test_write_repo_many_is_cheap(hf_cache):
    import time

    files = tiny_model_files()
    start = time.perf_counter()
    for i in range(100):
        write_repo(hf_cache, f"org/m{i}", files)
    elapsed = time.perf_counter() - start
    assert len(list(hf_cache.iterdir())) == 100
    assert elapsed < 10, f"100 repos took {elapsed:.1f}s"


def test_fixtures_use_the_isolated_cache(hf_cache, tiny_model, model_factory, tmp_path):
    assert hf_cache == tmp_path / "hf" / "hub" == Path(os.environ["HF_HUB_CACHE"])
    assert tiny_model.repo_id == "mlx-community/tiny-chat"
    assert tiny_model.repo_dir == hf_cache / "models--mlx-community--tiny-chat"
    assert set(model_factory.files()) == set(tiny_model.files)
    assert model_factory.variant("gguf").repo_dir.parent == hf_cache


def test_custom_spec_is_honoured(model_factory):
    import mlx_lm

    spec = ModelSpec(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=64, max_position_embeddings=512)
    repo = model_factory.repo("org/smaller", spec)
    config = json.loads(repo.read("config.json"))
    assert (config["hidden_size"], config["num_hidden_layers"], config["max_position_embeddings"]) == (32, 1, 512)
    model, tokenizer = mlx_lm.load(str(repo.snapshot_dir))
    assert len(model.layers) == 1


def test_write_repo_rejects_paths_that_escape(hf_cache):
    for bad in ("../x", "/etc/passwd", "a//b", "a/./b"):
        with pytest.raises(ValueError, match="not a repo file path"):
            write_repo(hf_cache, "org/m", {bad: b"x"})


def test_hardlinked_blobs_share_an_inode(hf_cache):
    files = tiny_model_files()
    a = write_repo(hf_cache, "org/a", files, hardlink=True)
    b = write_repo(hf_cache, "org/b", files, hardlink=True)
    assert a.blob_path("model.safetensors").stat().st_ino == b.blob_path("model.safetensors").stat().st_ino
    c = write_repo(hf_cache, "org/c", files)  # the default copies
    assert c.blob_path("model.safetensors").stat().st_ino != a.blob_path("model.safetensors").stat().st_ino


def test_model_files_for_follows_the_name():
    assert "chat_template" not in json.loads(factory.model_files_for("org/Tiny-Base")["tokenizer_config.json"])
    assert "quantization" in json.loads(factory.model_files_for("org/tiny-4bit")["config.json"])
    assert b"<think>" in factory.model_files_for("org/tiny-thinking")["tokenizer.json"]
    assert b"<tool_call>" in factory.model_files_for("org/tiny-tools")["tokenizer_config.json"]
    assert factory.model_files_for("org/tiny") == tiny_model_files()


def test_incomplete_blob_is_named_like_huggingface_hub_names_it(hf_cache):
    from huggingface_hub import scan_cache_dir

    repo = make_variant(hf_cache, "incomplete_download")
    (partial,) = scan_cache_dir(hf_cache).incomplete_files
    weights = tiny_model_files()["model.safetensors"]
    assert partial.file_path.name == f"{factory.file_info('model.safetensors', weights).etag}.incomplete"
    assert 0 < partial.size_on_disk < len(weights)
    assert partial.file_path.parent == repo.repo_dir / "blobs"
    assert VARIANTS["incomplete_download"].expected == {
        "health": "unhealthy", "runtime_compatible": None, "framework": "mlx", "model_type": "chat"}


def test_scripted_reply_model_says_exactly_its_reply(model_factory):
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    repo = model_factory.repo("org/tiny-scripted", reply="Hello world!")
    model, tokenizer = mlx_lm.load(str(repo.snapshot_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say anything"}],
                                           add_generation_prompt=True)
    steps = list(mlx_lm.stream_generate(model, tokenizer, prompt=prompt, max_tokens=20))
    reply_ids = tokenizer.encode("Hello world!", add_special_tokens=False)
    assert "".join(s.text for s in steps) == "Hello world!"
    assert [s.token for s in steps] == reply_ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert steps[-1].finish_reason == "stop"
    hot = list(mlx_lm.stream_generate(model, tokenizer, prompt=prompt, max_tokens=20,
                                      sampler=make_sampler(temp=1.0)))
    assert "".join(s.text for s in hot) == "Hello world!"
    short = list(mlx_lm.stream_generate(model, tokenizer, prompt=prompt, max_tokens=2))
    assert "".join(s.text for s in short) == "Hello world" and short[-1].finish_reason == "length"


def test_scripted_reply_needs_distinct_tokens():
    with pytest.raises(ValueError, match="distinct tokens"):
        tiny_model_files(reply="lll lll")
