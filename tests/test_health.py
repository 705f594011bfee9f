"""Health rules on real cache layouts: every factory variant, then each rule on its own corner cases."""
from __future__ import annotations

import importlib.metadata
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlxk import health
from mlxk.detect import detect
from mlxk.health import check_integrity, check_runtime, inspect_dir, inspect_repo
from tests import factory
from tests.factory import VARIANTS

# The factory names the framework variants after the framework; mlxk's rule ids say what kind of rule they are.
RULE_IDS = {"gguf": "framework_gguf", "pytorch": "framework_pytorch"}

# The file (or the thing) each verdict's reason must name.
REASON_NAMES = {
    "gguf": "tiny-model-Q4_K_M.gguf",
    "pytorch": "mlx_lm.convert",
    "legacy_weights": "weights.00.safetensors",
    "unsupported_model_type": "Model type notamodel not supported",
    "config_missing": "config.json",
    "config_invalid_json": "config.json",
    "config_not_object": "config.json",
    "no_weights": ".safetensors",
    "index_shard_missing": "model-00002-of-00002.safetensors (listed in model.safetensors.index.json)",
    "shard_empty": "model-00002-of-00002.safetensors",
    "shard_lfs_pointer": "model-00002-of-00002.safetensors",
    "shards_without_index": "model.safetensors.index.json",
    "dangling_symlink": "generation_config.json",
    "tree_mismatch": "README.md",
    "incomplete_download": ".incomplete",
    "safetensors_truncated": "model.safetensors",
    "safetensors_bad_header": "model.safetensors",
    "tokenizer_missing": "tokenizer.json",
}

SHARD2 = "model-00002-of-00002.safetensors"


def verdict(repo) -> tuple[str, bool | None, health.Finding | None]:
    """(health, runtime_compatible, the deciding finding) the way `mlxk health` reaches them."""
    view = inspect_repo(repo.repo_id, repo.repo_dir)
    findings = check_integrity(view)
    if findings:
        return "unhealthy", None, findings[0]
    finding = check_runtime(view, detect(view))
    return "healthy", finding is None, finding


def view_of(repo) -> health.RepoView:
    return inspect_repo(repo.repo_id, repo.repo_dir)


def rules(findings) -> list[str]:
    return [f.rule for f in findings]


def chat_files() -> dict[str, bytes]:
    return factory.tiny_model_files()


# --------------------------------------------------------------------------------------------------------------
# Every variant of the factory


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_verdict(model_factory, name):
    variant = VARIANTS[name]
    repo = model_factory.variant(name)
    status, runtime, finding = verdict(repo)
    assert (status, runtime) == (variant.health, variant.runtime_compatible)
    if variant.rule is None:
        assert finding is None
    else:
        assert finding.rule == RULE_IDS.get(variant.rule, variant.rule)
        assert REASON_NAMES[name] in finding.message
        assert "\n" not in finding.message


def test_every_variant_has_a_reason_expectation():
    # A new factory variant must come with what its reason names.
    assert {n for n, v in VARIANTS.items() if v.rule} == set(REASON_NAMES)


def test_runtime_messages_name_the_fix(model_factory):
    _, _, gguf = verdict(model_factory.variant("gguf"))
    assert gguf.message == ("Incompatible framework: GGUF (tiny-model-Q4_K_M.gguf): mlx-lm cannot run GGUF weights; "
                            "use an MLX conversion such as mlx-community/tiny")
    _, _, unsupported = verdict(model_factory.variant("unsupported_model_type"))
    version = importlib.metadata.version("mlx-lm")
    assert unsupported.message == (f"Model type notamodel not supported by mlx-lm {version}; "
                                   "upgrade mlx-lm (pip install -U mlx-lm)")


# --------------------------------------------------------------------------------------------------------------
# Snapshot selection and incomplete downloads


def test_no_snapshot(hf_cache):
    path = hf_cache / "models--org--empty"
    (path / "blobs").mkdir(parents=True)
    view = inspect_repo("org/empty", path)
    assert view.snapshot is None and view.revision is None
    assert rules(check_integrity(view)) == ["no_snapshot"]


def test_only_incomplete_blobs_is_an_unfinished_download(hf_cache):
    path = hf_cache / "models--org--partial"
    (path / "blobs").mkdir(parents=True)
    (path / "blobs" / ("ab" * 32 + ".incomplete")).write_bytes(b"\0" * 5000)
    findings = check_integrity(inspect_repo("org/partial", path))
    assert rules(findings) == ["incomplete_download", "no_snapshot"]
    assert "blobs/" + "ab" * 32 + ".incomplete" in findings[0].message
    assert "(5 KB)" in findings[0].message  # decimal units, as every view (mlxk.units)


def test_leftover_incomplete_beside_complete_snapshot_is_reclaimable(model_factory):
    repo = model_factory.variant("healthy_with_leftover_incomplete")
    view = view_of(repo)
    leftover = next((repo.repo_dir / "blobs").glob("*.incomplete"))
    assert check_integrity(view) == []
    assert view.incomplete == [leftover]
    assert view.incomplete_bytes == leftover.stat().st_size > 0


def test_leftover_incomplete_does_not_explain_a_malformed_file(model_factory):
    repo = model_factory.write("org/bad-config-leftover", {**chat_files(), "config.json": b"{"})
    factory.add_incomplete_blob(repo, b"\0" * 3000, path="other.safetensors")
    assert rules(check_integrity(view_of(repo))) == ["config_invalid_json"]


def test_partial_file_inside_snapshot_counts_as_incomplete(model_factory):
    files = chat_files()
    del files["model.safetensors"]
    files["model.safetensors.part"] = b"\0" * 100
    repo = model_factory.write("org/part", files)
    view = view_of(repo)
    assert not view.has("model.safetensors.part")
    assert view.incomplete == [repo.path("model.safetensors.part")]
    assert rules(check_integrity(view))[:2] == ["incomplete_download", "index_shard_missing"]


def test_refs_main_pointing_at_the_broken_revision(model_factory):
    good = model_factory.write("org/two-revs", chat_files())
    broken = factory.add_revision(good, {"config.json": b"{"})  # refs/main moves to the broken one
    view = view_of(good)
    assert view.revision == broken.revision and set(view.revisions) == {good.revision, broken.revision}
    assert rules(check_integrity(view)) == ["config_invalid_json"]


def test_broken_revision_beside_refs_main_does_not_count(model_factory):
    good = model_factory.write("org/two-revs-ok", chat_files())
    broken = factory.add_revision(good, {"config.json": b"{"}, ref=None)
    os.utime(broken.snapshot_dir, (time.time() + 100, time.time() + 100))  # newer, but not what main names
    view = view_of(good)
    assert view.revision == good.revision
    assert check_integrity(view) == []


# --------------------------------------------------------------------------------------------------------------
# Rules one by one


def test_config_empty_object(model_factory):
    repo = model_factory.write("org/empty-config", {**chat_files(), "config.json": b"{}"})
    assert [(f.rule, f.message) for f in health.check_config(view_of(repo))] == \
        [("config_not_object", "config.json is empty or invalid: an empty object")]


def test_config_dangling_link_is_config_missing(model_factory):
    repo = model_factory.write("org/config-gone", chat_files())
    repo.blob_path("config.json").unlink()
    view = view_of(repo)
    assert [f.rule for f in health.check_config(view)] == ["config_missing"]
    assert rules(health.check_symlinks(view)) == ["dangling_symlink"]


def test_gguf_only_repo_needs_no_config(model_factory):
    repo = model_factory.write("org/bare-gguf", {"model-Q4_K_M.gguf": factory.gguf_bytes(), "README.md": b"hi\n"})
    view = view_of(repo)
    assert check_integrity(view) == []
    assert check_runtime(view, detect(view)).rule == "framework_gguf"


def test_no_weights_counts_gguf_and_bin(model_factory):
    files = {k: v for k, v in chat_files().items() if not k.startswith("model.safetensors")}
    bin_repo = model_factory.write("org/bin", {**files, "pytorch_model.bin": b"\x80\x02" + b"\0" * 2000})
    assert health.check_weights_present(view_of(bin_repo)) == []
    args_only = model_factory.write("org/args", {**files, "training_args.bin": b"\x80\x02" + b"\0" * 2000})
    assert rules(health.check_weights_present(view_of(args_only))) == ["no_weights"]


def test_index_in_a_nested_folder_resolves_shards_beside_it(model_factory):
    files = factory.tiny_model_files(shards=2)
    nested = {f"sub/dir/{k}": v for k, v in files.items() if "safetensors" in k}
    repo = model_factory.write("org/nested", {**files, **nested})
    view = view_of(repo)
    assert view.has(f"sub/dir/{SHARD2}")
    assert check_integrity(view) == []
    (repo.path(f"sub/dir/{SHARD2}")).unlink()
    findings = health.check_index_shards(view_of(repo))
    assert [f.message for f in findings] == \
        [f"Index/shard mismatch: sub/dir/{SHARD2} (listed in sub/dir/model.safetensors.index.json) is missing"]


def test_index_that_is_not_usable(model_factory):
    files = factory.tiny_model_files()
    repo = model_factory.write("org/bad-index", {**files, "model.safetensors.index.json": b'{"metadata": {}}'})
    assert rules(health.check_index_shards(view_of(repo))) == ["index_invalid"]


def test_single_unindexed_weights_file_that_is_empty(model_factory):
    files = {k: v for k, v in chat_files().items() if k != "model.safetensors.index.json"}
    repo = model_factory.write("org/empty-single", {**files, "model.safetensors": b""})
    findings = check_integrity(view_of(repo))
    assert rules(findings) == ["shard_empty"]  # no bad-header finding on top for the same file


def test_lfs_pointer_is_not_also_a_bad_header(model_factory):
    assert rules(check_integrity(view_of(model_factory.variant("shard_lfs_pointer")))) == ["shard_lfs_pointer"]


def test_one_of_one_shard_needs_no_index(model_factory):
    files = {k: v for k, v in chat_files().items() if not k.startswith("model.safetensors")}
    files["model-00001-of-00001.safetensors"] = chat_files()["model.safetensors"]
    repo = model_factory.write("org/one-of-one", files)
    assert health.check_shards_without_index(view_of(repo)) == []


def test_nested_dangling_symlink(model_factory):
    repo = model_factory.write("org/nested-link", {**chat_files(), "extra/notes/info.json": b'{"a": 1}'})
    repo.blob_path("extra/notes/info.json").unlink()
    assert [f.message for f in health.check_symlinks(view_of(repo))] == \
        ["extra/notes/info.json links to a blob that is gone"]


def test_tree_listing_names_a_file_the_snapshot_lacks(model_factory):
    repo = model_factory.write("org/tree-missing", chat_files(), trees_json=True)
    repo.path("generation_config.json").unlink()
    findings = health.check_tree(view_of(repo))
    assert [f.message for f in findings] == \
        [f"generation_config.json (listed in trees/{repo.revision}.json) is missing from the snapshot"]


@pytest.mark.parametrize("content", ['{"format_version": 2, "files": {"nope.bin": {"size": 1}}}', "{not json"])
def test_tree_listing_huggingface_hub_would_ignore_is_ignored(model_factory, content):
    repo = model_factory.write("org/tree-odd", chat_files(), trees_json=True)
    (repo.repo_dir / "trees" / f"{repo.revision}.json").write_text(content)
    assert check_integrity(view_of(repo)) == []


def _with_header(data: bytes, header_bytes: bytes, declared: int | None = None) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    return struct.pack("<Q", len(header_bytes) if declared is None else declared) + header_bytes + data[8 + n:]


@pytest.mark.parametrize("mutate, expected_rule, expected_text", [
    (lambda d: _with_header(d, b"", declared=2 ** 63), "safetensors_bad_header", "declares a 9223372036854775808"),
    (lambda d: _with_header(d, b"[1, 2, 3]" + b" " * 7), "safetensors_bad_header", "not a JSON object"),
    (lambda d: _with_header(d, b'{"w": {"dtype": "F16"}}' + b" "), "safetensors_bad_header", "data_offsets"),
    (lambda d: d[:5], "safetensors_bad_header", "too short"),
    (lambda d: d + b"\0" * 16, "safetensors_truncated", "16 bytes more than its header declares"),
    (lambda d: d[:-1000], "safetensors_truncated", "1000 bytes short"),
])
def test_safetensors_header_checks(model_factory, mutate, expected_rule, expected_text):
    files = chat_files()
    files["model.safetensors"] = mutate(files["model.safetensors"])
    repo = model_factory.write("org/st", files)
    findings = health.check_safetensors(view_of(repo))
    assert [f.rule for f in findings] == [expected_rule]
    assert findings[0].message.startswith("model.safetensors ") and expected_text in findings[0].message


def test_safetensors_check_reads_only_the_header(tmp_path):
    # 8 GiB of declared tensor data in a sparse file: reading the weights would take seconds and real disk.
    header = json.dumps({"__metadata__": {"format": "mlx"},
                         "w": {"dtype": "U8", "shape": [8 << 30], "data_offsets": [0, 8 << 30]}}).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + (8 << 30))
    started = time.perf_counter()
    parsed = health.read_safetensors_header(path, path.stat().st_size)
    assert time.perf_counter() - started < 0.5
    assert (parsed.error, parsed.data_len, parsed.metadata) == (None, 8 << 30, {"format": "mlx"})


def test_tokenizer_model_alone_is_enough(model_factory):
    files = {k: v for k, v in chat_files().items() if k != "tokenizer.json"}
    repo = model_factory.write("org/spm", {**files, "tokenizer.model": b"\x0a\x05spm..."})
    assert health.check_tokenizer(view_of(repo)) == []


def test_snapshot_without_any_tokenizer_file_is_unhealthy(model_factory):
    """What a pull killed while linking, or an rm killed after the tokenizer files, leaves: config and weights, no
    tokenizer.json and no tokenizer_config.json. mlx-lm cannot load it, so it is not healthy."""
    files = {k: v for k, v in chat_files().items() if not k.startswith("tokenizer")}
    status, _, finding = verdict(model_factory.write("org/no-tok", files))
    assert status == "unhealthy" and finding.rule == "tokenizer_missing"
    assert "vocabulary of 384 tokens" in finding.message and "tokenizer.json" in finding.message


def test_model_without_a_vocabulary_needs_no_tokenizer(model_factory):
    files = {k: v for k, v in chat_files().items() if not k.startswith("tokenizer")}
    config = json.loads(files["config.json"])
    del config["vocab_size"]  # an image or audio encoder reads no tokens
    files["config.json"] = json.dumps(config).encode()
    assert health.check_tokenizer(view_of(model_factory.write("org/vision", files))) == []


def test_chat_template_without_tokenizer_is_unhealthy(model_factory):
    files = {k: v for k, v in chat_files().items() if not k.startswith("tokenizer")}
    files["chat_template.jinja"] = b"{% for m in messages %}{{ m.content }}{% endfor %}"
    (finding,) = health.check_tokenizer(view_of(model_factory.write("org/tpl", files)))
    assert finding.rule == "tokenizer_missing" and finding.message.startswith("chat_template.jinja present but tokenizer.json missing")


@pytest.mark.parametrize("name, mutate, fragment", [
    ("tokenizer_config.json", lambda b: b + b"x", "Extra data"),            # one stray byte after the JSON
    ("tokenizer_config.json", lambda b: b[: len(b) // 2], "Unterminated"),   # truncated
    ("tokenizer_config.json", lambda b: b"[1, 2]", "not a JSON object"),
    ("tokenizer.json", lambda b: b + b"x", "ends in"),
    ("tokenizer.json", lambda b: b[: len(b) // 2], "ends in"),
    ("tokenizer.json", lambda b: b"\x00" + b, "does not start"),
])
def test_tokenizer_files_that_are_not_json_are_unhealthy(model_factory, name, mutate, fragment):
    files = chat_files()
    files[name] = mutate(files[name])
    status, _, finding = verdict(model_factory.write("org/bad-tok", files))
    assert status == "unhealthy" and finding.rule == "tokenizer_invalid_json"
    assert finding.message.startswith(f"{name} is not valid JSON") and fragment in finding.message


# --------------------------------------------------------------------------------------------------------------
# Weights against config.json (headers only)


def _with_config(files: dict, **changes) -> dict:
    config = json.loads(files["config.json"])
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return {**files, "config.json": json.dumps(config).encode()}


def test_float_weights_stored_as_integers_are_unhealthy(model_factory):
    """The issue's reproduction: a float32 model whose safetensors header says I32 (same width, same size)."""
    files = factory.tiny_model_files(factory.ModelSpec(dtype="float32"))
    files["model.safetensors"] = factory.with_safetensors_dtype(files["model.safetensors"], "F32", "I32")
    status, _, finding = verdict(model_factory.write("org/int-weights", files))
    assert status == "unhealthy" and finding.rule == "weights_dtype_mismatch"
    assert "tensor model.embed_tokens.weight is I32" in finding.message and "no quantization" in finding.message


def test_quantized_model_keeps_its_integer_weights(model_factory):
    repo = model_factory.repo("org/q4", quantize=True)
    assert verdict(repo)[0] == "healthy"
    assert health.check_weight_dtypes(view_of(repo)) == [] and health.check_quantized_shapes(view_of(repo)) == []


@pytest.mark.parametrize("changes, rule, fragment", [
    ({"vocab_size": 999}, "embedding_shape_mismatch", "vocab_size x hidden_size = 999 x 64"),
    ({"hidden_size": 128}, "embedding_shape_mismatch", "384 x 64"),
])
def test_config_that_does_not_match_the_weights_is_unhealthy(model_factory, changes, rule, fragment):
    files = _with_config(chat_files(), **changes)
    status, _, finding = verdict(model_factory.write("org/mismatch", files))
    assert status == "unhealthy" and finding.rule == rule and fragment in finding.message
    assert "model.embed_tokens.weight" in finding.message


@pytest.mark.parametrize("changes, rule, fragment", [
    ({"quantization": {"bits": 8}}, "quantization_mismatch", "8 bits, group size 64"),
    ({"quantization": {"group_size": 32}}, "quantization_mismatch", "group size 32"),
    ({"vocab_size": 500}, "embedding_shape_mismatch", "500 x 64"),
])
def test_quantized_config_that_does_not_match_the_weights_is_unhealthy(model_factory, changes, rule, fragment):
    files = _with_config(factory.tiny_model_files(quantize=True), **changes)
    status, _, finding = verdict(model_factory.write("org/q-mismatch", files))
    assert status == "unhealthy" and finding.rule == rule and fragment in finding.message
    assert "tensor model." in finding.message


def test_per_module_quantization_overrides_are_honoured(model_factory):
    """mlx-lm's mixed quantization: `quantization` may name a module with its own bits (or false)."""
    files = factory.tiny_model_files(quantize=True)
    header = factory.safetensors_header(files["model.safetensors"])
    module = next(n[: -len(".scales")] for n in sorted(header) if n.endswith(".scales"))
    wrong = _with_config(files, quantization={module: {"bits": 8, "group_size": 64}})
    (finding,) = health.check_quantized_shapes(view_of(model_factory.write("org/mixed", wrong)))
    assert finding.message.startswith(f"tensor {module}.weight")
    skipped = _with_config(files, quantization={module: False})
    assert health.check_quantized_shapes(view_of(model_factory.write("org/mixed-off", skipped))) == []


from tests.fixtures.shared import REALMODELS  # noqa: E402


@pytest.mark.skipif(not REALMODELS.is_dir(), reason="the real model-family files are not on this machine")
@pytest.mark.parametrize("family", sorted(p.name for p in REALMODELS.iterdir() if p.is_dir())
                         if REALMODELS.is_dir() else [])
def test_real_families_tokenizers_and_configs_are_healthy(model_factory, family):
    """Every real family's tokenizer, template and config files pass the tokenizer and config rules (their weights
    are not shipped: one small tensor that no rule compares stands in for them)."""
    files = {p.name: p.read_bytes() for p in (REALMODELS / family).iterdir() if p.is_file()}
    files["model.safetensors"] = factory.with_safetensors_metadata(_one_tensor_safetensors(), {"format": "mlx"})
    view = view_of(model_factory.write(f"mlx-community/{family}", files))
    assert check_integrity(view) == []


def _one_tensor_safetensors() -> bytes:
    raw = json.dumps({"model.norm.weight": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"\x00" * 8


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_files(model_factory):
    repo = model_factory.write("org/locked", chat_files())
    for name in ("config.json", "model.safetensors"):
        repo.blob_path(name).chmod(0)
    try:
        findings = check_integrity(view_of(repo))
    finally:
        for name in ("config.json", "model.safetensors"):
            repo.blob_path(name).chmod(0o644)
    assert rules(findings) == ["file_unreadable", "file_unreadable"]
    assert findings[0].message.startswith("config.json cannot be read")
    assert findings[1].message.startswith("model.safetensors cannot be read")


def test_blob_that_cannot_be_read_even_as_root(model_factory):
    # A blob replaced by a directory fails to read for every user, so this path is tested when running as root.
    repo = model_factory.write("org/dir-blob", chat_files())
    for name in ("config.json", "model.safetensors"):
        repo.blob_path(name).unlink()
        repo.blob_path(name).mkdir()
    findings = check_integrity(view_of(repo))
    assert rules(findings) == ["file_unreadable", "file_unreadable"]
    assert findings[0].message.startswith("config.json cannot be read: ")
    assert findings[1].message.startswith("model.safetensors cannot be read: ")


# --------------------------------------------------------------------------------------------------------------
# Runtime rules


def test_model_type_remapping_is_honoured(model_factory):
    config = json.loads(chat_files()["config.json"])
    repo = model_factory.write("mlx-community/tiny-mistral",
                               {**chat_files(), "config.json": json.dumps({**config, "model_type": "mistral"}).encode()})
    view = view_of(repo)
    assert health.resolve_model_type("mistral") == "llama"
    assert check_runtime(view, detect(view)) is None


def test_model_type_verdicts_are_cached_per_type(model_factory, monkeypatch):
    calls = []
    real = health._module_imports
    monkeypatch.setattr(health, "_TYPE_VERDICTS", {})
    monkeypatch.setattr(health, "_module_imports", lambda module: calls.append(module) or real(module))
    for i in range(3):
        repo = model_factory.write(f"mlx-community/m{i}", chat_files())
        view = view_of(repo)
        assert check_runtime(view, detect(view)) is None
    assert health.model_type_supported("notamodel") is False
    assert health.model_type_supported("notamodel") is False
    assert health.model_type_supported("../etc") is False
    assert calls == ["mlx_lm.models.llama", "mlx_lm.models.notamodel"]


def test_config_without_model_type(model_factory):
    config = json.loads(chat_files()["config.json"])
    del config["model_type"]
    repo = model_factory.write("mlx-community/no-type", {**chat_files(), "config.json": json.dumps(config).encode()})
    view = view_of(repo)
    assert check_runtime(view, detect(view)).rule == "unsupported_model_type"


def test_legacy_names_in_a_pytorch_repo_are_a_framework_problem_first(model_factory):
    files = {k: v for k, v in chat_files().items() if not k.startswith(("model.safetensors", "README"))}
    data = factory.with_safetensors_metadata(chat_files()["model.safetensors"], {"format": "pt"})
    repo = model_factory.write("example-org/old-pt", {**files, "pytorch_model-00001-of-00001.safetensors": data})
    view = view_of(repo)
    assert check_integrity(view) == []
    assert check_runtime(view, detect(view)).rule == "framework_pytorch"
    mlx_repo = model_factory.write("mlx-community/old-pt", {**files, "pytorch_model-00001-of-00001.safetensors": data})
    view = view_of(mlx_repo)
    assert check_runtime(view, detect(view)).rule == "legacy_weights"


def test_mlx_lm_signature():
    assert health.mlx_lm_signature() == f"mlx-lm {importlib.metadata.version('mlx-lm')}"


# --------------------------------------------------------------------------------------------------------------
# Flat workspaces (mlxk clone, push --check-only)


def write_flat(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_flat_workspace_healthy_and_ignores_git_and_cache(tmp_path):
    root = write_flat(tmp_path / "ws", {**chat_files(), ".git/objects/model.safetensors": b"",
                                        ".cache/huggingface/model-00009-of-00010.safetensors": b"x"})
    view = inspect_dir(root, "me/tiny")
    assert view.flat and view.repo_id == "me/tiny" and view.revision is None
    assert not any(f.name.startswith((".git", ".cache")) for f in view.files)
    assert check_integrity(view) == []
    assert check_runtime(view, detect(view)) is None  # README says library_name: mlx


def test_flat_workspace_breakage_is_found(tmp_path):
    files = {k: v for k, v in factory.tiny_model_files(shards=2).items() if k != SHARD2}
    root = write_flat(tmp_path / "ws", files)
    assert rules(check_integrity(inspect_dir(root, "me/tiny"))) == ["index_shard_missing"]
    partial = root / ".cache" / "huggingface" / "download" / f"{SHARD2}.abc.incomplete"
    write_flat(root, {partial.relative_to(root).as_posix(): b"\0" * 10})
    view = inspect_dir(root, "me/tiny")
    assert view.incomplete == [partial] and view.incomplete_bytes == 10
    assert rules(check_integrity(view)) == ["incomplete_download", "index_shard_missing"]


def test_flat_workspace_skips_cache_only_rules(tmp_path):
    root = write_flat(tmp_path / "ws", chat_files())
    (root / "notes.txt").symlink_to(root / "gone.txt")
    view = inspect_dir(root, "me/tiny")
    assert health.check_symlinks(view) == [] and view.trees is None
    assert check_integrity(view) == []


def test_missing_flat_folder_has_no_snapshot(tmp_path):
    assert rules(check_integrity(inspect_dir(tmp_path / "nope", "me/nope"))) == ["no_snapshot"]


# --------------------------------------------------------------------------------------------------------------
# Speed and imports: `mlxk list` runs these synchronously


def test_integrity_and_detect_import_nothing_heavy(model_factory, hf_cache):
    model_factory.variant("healthy_sharded")
    model_factory.variant("pytorch")
    code = ("import sys; from pathlib import Path; from mlxk import cache, health, detect\n"
            f"for repo_id, entry in cache.iter_repo_dirs(Path({str(hf_cache)!r})):\n"
            "    view = health.inspect_repo(repo_id, Path(entry.path)); health.check_integrity(view); detect.detect(view)\n"
            "print(sorted(m for m in ('mlx', 'mlx_lm', 'transformers', 'numpy', 'huggingface_hub', 'yaml')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_two_hundred_repos_check_fast(hf_cache):
    files = chat_files()
    for i in range(200):
        factory.write_repo(hf_cache, f"mlx-community/m{i}", files, hardlink=True, trees_json=i % 2 == 0)
    started = time.perf_counter()
    views = [inspect_repo(repo_id, Path(entry.path)) for repo_id, entry in health.cache.iter_repo_dirs(hf_cache)]
    assert all(check_integrity(v) == [] for v in views)
    assert all(detect(v).framework == "mlx" for v in views)
    elapsed = time.perf_counter() - started
    # ~0.1 s on a busy 2-core box; the bound only catches a rule that starts hashing or reading weights
    assert len(views) == 200 and elapsed < 2.0, elapsed


# --------------------------------------------------------------------------------------------------------------
# The reproductions through the CLI: `mlxk list` and `mlxk health NAME` (exit 1)


def _stray_byte_config(files: dict) -> dict:
    return {**files, "tokenizer_config.json": files["tokenizer_config.json"] + b"x"}


def _int_weights(files: dict) -> dict:
    files = factory.tiny_model_files(factory.ModelSpec(dtype="float32"))
    return {**files, "model.safetensors": factory.with_safetensors_dtype(files["model.safetensors"], "F32", "I32")}


@pytest.mark.parametrize("name, broken, fragment", [
    ("no-tokenizer", lambda f: {k: v for k, v in f.items() if not k.startswith("tokenizer")}, "tokenizer.json missing"),
    ("stray-byte", _stray_byte_config, "tokenizer_config.json is not valid JSON"),
    ("int-weights", _int_weights, "tensor model.embed_tokens.weight is I32"),
    ("wrong-vocab", lambda f: _with_config(f, vocab_size=999), "999 x 64"),
])
def test_list_and_health_call_the_reproductions_unhealthy(model_factory, name, broken, fragment):
    from tests.fixtures.cli import run, run_json

    model_factory.write(f"mlx-community/{name}", broken(chat_files()))
    result, doc = run_json("list")
    (model,) = doc["data"]["models"]
    assert (model["health"], model["runtime_compatible"]) == ("unhealthy", False) and fragment in model["reason"]
    assert name not in run("list").stdout  # the default view shows runnable models only
    result, doc = run_json("health", name)
    assert result.exit_code == 0 and doc["data"]["summary"]["unhealthy_count"] == 1
    assert fragment in doc["data"]["unhealthy"][0]["reason"]


# --------------------------------------------------------------------------------------------------------------
# What only mlx-lm's own loader notices, checked from headers and whole JSON files (the runtime rules): a config whose
# layer sizes, layer count or head count do not fit the weights, integer scales in a quantized model, and tokenizer
# JSON files transformers cannot read (one stray byte, a BOM). Each loaded "healthy" before and failed at `mlxk run`.


def _quantized_int_scales(files: dict) -> dict:
    files = factory.tiny_model_files(quantize=True)
    header = factory.safetensors_header(files["model.safetensors"])
    float_type = next(v["dtype"] for k, v in header.items() if k.endswith(".scales"))
    int_type = {"F16": "I16", "BF16": "I16", "F32": "I32"}[float_type]
    return {**files, "model.safetensors": factory.with_safetensors_dtype(files["model.safetensors"], float_type, int_type)}


@pytest.mark.parametrize("name, broken, fragment", [
    ("wider-mlp", lambda f: _with_config(f, intermediate_size=256), "Expected shape (256, 64)"),
    ("extra-layer", lambda f: _with_config(f, num_hidden_layers=3), "Missing 9 parameters"),
    ("more-heads", lambda f: _with_config(f, num_attention_heads=8, num_key_value_heads=8), "Expected shape"),
    ("int-scales", _quantized_int_scales, "scales"),
    ("tokenizer-stray", lambda f: {**f, "tokenizer.json": f["tokenizer.json"] + b"}"}, "tokenizer.json cannot be loaded"),
    ("special-stray", lambda f: {**f, "special_tokens_map.json": f["special_tokens_map.json"] + b"x"},
     "special_tokens_map.json cannot be loaded"),
    ("config-bom", lambda f: {**f, "tokenizer_config.json": b"\xef\xbb\xbf" + f["tokenizer_config.json"]},
     "tokenizer_config.json"),
])
def test_what_the_loader_would_refuse_is_not_runnable(model_factory, name, broken, fragment):
    from tests.fixtures.cli import run, run_json

    model_factory.write(f"mlx-community/{name}", broken(chat_files()))
    _, doc = run_json("health", name)
    assert doc["data"]["summary"]["not_runnable"] + doc["data"]["summary"]["unhealthy"] == 1, doc
    _, doc = run_json("list")
    (model,) = doc["data"]["models"]
    assert model["runtime_compatible"] is False and fragment in model["reason"], model
    assert name not in run("list").stdout  # the default view shows runnable models only


def test_the_loader_check_passes_every_factory_model(model_factory):
    from tests.fixtures.cli import run_json

    model_factory.write("mlx-community/plain", chat_files())
    model_factory.write("mlx-community/quant", factory.tiny_model_files(quantize=True))
    for name in ("plain", "quant"):
        result, doc = run_json("health", name)
        assert result.exit_code == 0 and doc["data"]["summary"]["healthy"] == 1, doc
        assert doc["data"]["models"][0]["runtime_compatible"] is True, doc
