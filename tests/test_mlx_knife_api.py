"""`--json` is a superset of mlx-knife's JSON API (issue 12): every command both tools have validates against its
published schema (relaxed: extra keys allowed), and the spec's jq examples give answers, not errors or nulls.

The schema and spec are read from ../shared/reference/mlx-knife-json-api/ (skipped with the reason when absent)."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests import factory
from tests.fixtures.cli import run, run_json
from tests.fixtures.mlx_knife import jq_examples, validate

PHI = "mlx-community/Phi-3-mini-4k-instruct-4bit"


@pytest.fixture
def cache(model_factory, hf_cache):
    """The spec's example names: a quantized chat model, two Llamas, a Qwen, a GGUF and a broken download."""
    phi = model_factory.repo(PHI, quantize=True)
    factory.add_revision(phi, {"notes.txt": b"second commit", "README.md": b"# the second card\n" * 40})
    model_factory.repo("mlx-community/Llama-3.2-1B-Instruct-4bit")
    model_factory.repo("mlx-community/Llama-3.2-3B-Instruct-4bit")
    model_factory.repo("mlx-community/Qwen3-0.6B-4bit", chat_template=False)
    factory.make_variant(hf_cache, "gguf")
    factory.make_variant(hf_cache, "config_missing")
    return phi


COMMANDS = [
    ("list",), ("list", "Llama"), ("list", "nothing-matches"),
    ("show", "Phi-3-mini"), ("show", PHI, "--files"), ("show", "Phi-3-mini", "--config"),
    ("health",), ("health", "Phi-3-mini"), ("health", "config-missing"),
    ("rm", "Qwen3-0.6B-4bit"), ("rm", "Llama"), ("rm", "mlx-community/Qwen3-0.6B-4bit", "--dry-run"),
    ("rm", "mlx-community/Qwen3-0.6B-4bit"), ("show", "nothing-like-it"), ("version",),
]


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_every_shared_command_validates_against_the_schema(cache, args):
    result, doc = run_json(*args)
    validate(doc)
    assert result.exit_code == (0 if doc["status"] == "success" else 1), result.output
    if doc["status"] == "success" and args[0] in ("list", "show"):
        models = doc["data"]["models"] if args[0] == "list" else [doc["data"]["model"]]
        assert all(isinstance(m["runtime_compatible"], bool) for m in models)


def test_show_at_hash_and_version_carry_the_spec_fields(cache):
    old = [r for r in json.loads(run_json("show", PHI)[0].stdout)["data"]["model"]["revisions"]][-1]
    _, doc = run_json("show", f"{PHI}@{old[:7]}")
    validate(doc)
    assert doc["data"]["model"]["hash"] == old
    assert doc["data"]["model"]["quantization"]["bits"] == 4 and doc["data"]["metadata"]["quantization"] == "4bit"
    _, doc = run_json("version")
    assert doc["data"]["json_api_spec_version"] == "0.2.4" and doc["data"]["cli_version"]
    assert doc["data"]["system"] is None or doc["data"]["system"]["memory_total_bytes"] > 0


def test_version_flag_with_json_is_the_version_document():
    from tests.fixtures.cli import MLXK

    done = subprocess.run([*MLXK, "--version", "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    validate(doc)
    assert doc["command"] == "version" and doc["data"]["cli_version"]


def test_pull_documents_validate(hub, worker):
    repo = hub.unique_repo("mlx-community/schema")
    hub.add_repo(repo, factory.tiny_model_files(factory.TINY))
    for args in ((repo,), (repo, "--wait"), (repo.split("/")[1], "--wait"), ("org/missing", "--wait"),
                 ("../bad",)):
        _, doc = run_json("pull", *args)
        validate(doc)
        assert doc["data"]["download_status"]
        if args[1:] == ("--wait",) and doc["status"] == "success":
            # QA F3: no cache paths in --json: the snapshot relative to the HF cache
            path = doc["data"]["result"]["snapshot_path"]
            assert path.startswith("models--mlx-community--schema") and "/snapshots/" in path, path


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed (make system-deps installs it)")
def test_the_specs_jq_examples_answer(cache):
    """Each one-line example of the spec's "Agent Integration" section, through the real jq: no jq error, and an
    answer (not null) for every model or count it asks about. The `pull "$model"` loop runs for its two short names
    under HF_HUB_OFFLINE=1: both mean a cached model, so both are `already_exists` (as mlx-knife 2.0.8 answers;
    test_pull_documents_validate runs pull against the test Hub). Not a one-liner, so not matched: the
    `.size | test("GB")` loop, which reads a field the spec itself says does not exist (only size_bytes)."""
    import os

    from tests.fixtures.cli import MLXK

    examples = jq_examples()
    ran = 0
    for args, flags, program in examples:
        runs = [[a.replace("$model", m) for a in args] for m in ("Phi-3-mini", "Llama-3.2-1B")] \
            if "$model" in args else [args]
        for argv in runs:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"} if argv[0] == "pull" else None
            mlxk = subprocess.run([*MLXK, *argv, "--json"], capture_output=True, text=True, timeout=120, env=env)
            jq = subprocess.run(["jq", *flags, program], input=mlxk.stdout, capture_output=True, text=True,
                                timeout=30)
            assert jq.returncode == 0, (argv, program, jq.stderr)
            assert jq.stdout.strip() and "null" not in jq.stdout.split(), (argv, program, jq.stdout)
            if argv[0] == "pull":
                assert jq.stdout.strip() == '"already_exists"', (argv, mlxk.stdout)
        ran += 1
    assert ran == len(examples) == 12


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed (make system-deps installs it)")
def test_the_specs_health_monitoring_script_warns(cache):
    """The spec's "Automated Health Monitoring" script: it silently skipped its warning before issue 12."""
    from tests.fixtures.cli import MLXK

    import shlex

    mlxk = shlex.join(MLXK)
    script = (f"count=$({mlxk} health --json | jq '.data.summary.unhealthy_count')\n"
              'if [ "$count" -gt 0 ]; then echo "Warning: $count unhealthy models found"\n'
              f"  {mlxk} health --json | jq -r '.data.unhealthy[] | \"UNHEALTHY: \\(.name) - \\(.reason)\"'\nfi\n")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Warning: 1 unhealthy models found\nUNHEALTHY: mlx-community/tiny-config-missing")


def test_workspace_paths_show_and_health_as_cached_false(cache, tmp_path, monkeypatch):
    """The spec: commands taking model names take workspace paths (`./dir`); `cached: false`, `hash: null`."""
    workspace = tmp_path / "my-phi"
    shutil.copytree(cache.snapshot_dir, workspace, symlinks=False)
    monkeypatch.chdir(tmp_path)
    result, doc = run_json("show", "./my-phi", "--files")
    assert result.exit_code == 0, result.output
    validate(doc)
    model = doc["data"]["model"]
    assert (model["name"], model["display_name"], model["cached"], model["hash"]) == (
        str(workspace), "./my-phi", False, None)
    assert model["health"] == "healthy" and model["runtime_compatible"] is True
    assert model["size_bytes"] == sum(f["size_bytes"] for f in doc["data"]["files"])
    assert doc["data"]["metadata"]["quantization"] == "4bit"
    assert doc["data"]["workspace_metadata"] == {}            # mlx-knife 2.0.8: {} for a workspace, null for a repo
    # QA F5: `list ./dir` lists the workspace as mlx-knife 2.0.8 does (count 1, the absolute path, cached false)
    result, doc = run_json("list", "./my-phi")
    assert result.exit_code == 0, result.output
    validate(doc)
    assert doc["data"]["count"] == 1 and [(m["name"], m["cached"]) for m in doc["data"]["models"]] == [
        (str(workspace), False)]
    result = run("list", "./my-phi")
    assert result.exit_code == 0 and str(workspace) in result.stdout, result.output
    result, doc = run_json("health", "./my-phi")
    assert doc["data"]["healthy"][0]["cached"] is False and doc["data"]["healthy"][0]["managed"] is False
    (workspace / "config.json").write_text("{")   # broken, not gone: a folder without config.json is no model
    result, doc = run_json("health", str(workspace))
    validate(doc)
    assert result.exit_code == 0 and doc["data"]["unhealthy"][0]["name"] == str(workspace)
    result, doc = run_json("show", "./nowhere")
    assert result.exit_code == 1 and doc["error"]["code"] == "model_not_found"


def test_file_sizes_and_quantization_as_mlx_knife_2_0_8_spells_them(cache):
    """Compared with mlx-knife 2.0.8 on the same cache: `60.9KB`, `178B` (decimal, no space), and the config's
    quantization settings as they are."""
    from mlxk.units import compact_size

    _, doc = run_json("show", PHI, "--files")
    sizes = {f["name"]: (f["size"], f["size_bytes"]) for f in doc["data"]["files"]}
    assert all(size == compact_size(exact) for size, exact in sizes.values())
    assert (compact_size(178), compact_size(60858), compact_size(3554), compact_size(2_300_000_000)) == (
        "178B", "60.9KB", "3.6KB", "2.3GB")
    assert doc["data"]["model"]["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert doc["data"]["workspace_metadata"] is None and doc["data"]["metadata"]["architecture"] == "LlamaForCausalLM"
    _, doc = run_json("rm", "Phi-3-mini")
    assert doc["data"]["requires_confirmation"] is True and doc["data"]["action"] == "requires_confirmation"


def test_size_bytes_is_the_selected_snapshots_and_disk_bytes_the_repos(cache):
    """Issue 12 #10: with several revisions, `hash` named the current one and `size_bytes` counted them all."""
    (model,) = [m for m in run_json("list", "Phi-3")[1]["data"]["models"]]
    files = run_json("show", PHI, "--files")[1]["data"]["files"]
    assert model["size_bytes"] == sum(f["size_bytes"] for f in files)
    on_disk = sum(p.stat().st_size for p in (cache.repo_dir / "blobs").iterdir())
    assert model["disk_bytes"] == on_disk > model["size_bytes"]


@pytest.mark.parametrize("args, exit_code, knife_type, code", [
    (("show", "nothing-like-it"), 1, "model_not_found", "model_not_found"),
    (("show", "Llama"), 1, "ambiguous_match", "ambiguous_match"),
    (("rm", "Llama"), 1, "ambiguous_match", "ambiguous_match"),
    (("health", "Llama"), 1, "ambiguous_match", "ambiguous_match"),
    (("pull", "a" * 97 + "/x"), 1, "ValidationError", "invalid_name"),
    (("run", "nothing-like-it", "hi"), 1, "execution_error", "model_not_found"),
    (("show", "--bogus"), 2, "CommandError", "usage"),
], ids=lambda value: " ".join(value)[:40] if isinstance(value, tuple) else None)
def test_error_type_is_mlx_knifes_word_and_code_mlxks_type(cache, args, exit_code, knife_type, code):
    """What mlx-knife 2.0.8 answers on the same cache (bench/knife_compare.py): its word in `error.type`; mlxk's
    own type stays in `error.code` (issue 12 item 13)."""
    result, doc = run_json(*args)
    validate(doc)
    assert result.exit_code == exit_code and (doc["error"]["type"], doc["error"]["code"]) == (knife_type, code), doc
    if args[:2] == ("rm", "Llama"):
        assert len(doc["data"]["matches"]) == 2


def test_workspace_paths_in_rm_and_pull_are_refused_clearly(cache, tmp_path, monkeypatch):
    """mlx-knife 2.0.8 refuses `rm ./dir` (workspace_model: delete it yourself; the absolute path in data.model) and
    fails `pull ./dir` at the Hub; mlxk refuses both before any work, naming the commands that do read a workspace
    (`run ./dir` runs it: tests/test_run_workspace.py)."""
    from mlxk.db import jobs as jobs_db
    from tests.fixtures.jobs import state_db

    workspace = tmp_path / "ws"
    shutil.copytree(cache.snapshot_dir, workspace, symlinks=False)
    before = sorted(p.name for p in workspace.iterdir())
    monkeypatch.chdir(tmp_path)

    result, doc = run_json("rm", "./ws", "--force")
    validate(doc)
    assert result.exit_code == 1 and (doc["error"]["type"], doc["error"]["code"]) == ("workspace_model",
                                                                                      "workspace_path")
    assert doc["error"]["message"].startswith("Cannot delete workspace model './ws'")
    assert f"rm -rf {workspace}" in doc["error"]["message"]
    assert doc["data"]["model"] == str(workspace) and doc["data"]["action"] == "unknown"
    assert sorted(p.name for p in workspace.iterdir()) == before   # nothing outside the cache is ever deleted

    for args, knife_type in ((("pull", "./ws"), "ValidationError"), (("rm", "~/ws"), "workspace_model")):
        result, doc = run_json(*args)
        validate(doc)
        assert result.exit_code == 1 and (doc["error"]["type"], doc["error"]["code"]) == (knife_type,
                                                                                          "workspace_path"), doc
        if args[0] != "rm":
            assert f"`mlxk show {args[1]}`" in doc["error"]["message"]
    with state_db() as conn:
        assert jobs_db.list_jobs(conn) == []


# Each broken variant's reason starts with mlx-knife 2.0.8's own words for it (the spec's example: "config.json
# missing"), so a script matching them keeps working; mlxk's detail and fix follow. Variants mlx-knife does not flag
# (dangling links, trees/ sizes, safetensors headers, partial downloads) have no words of its to start with.
KNIFE_REASONS = {
    "config_missing": "config.json missing",
    "config_invalid_json": "config.json contains invalid JSON",
    "config_not_object": "config.json is empty or invalid",
    "no_weights": "No model weights found",
    "index_shard_missing": "Index/shard mismatch",
    "shard_empty": "Empty weight shards: model-00002-of-00002.safetensors",
    "shard_lfs_pointer": "LFS pointers instead of files: model-00002-of-00002.safetensors",
    "shards_without_index": "Safetensors index missing for sharded model",
    "tokenizer_missing": "tokenizer_config.json present but tokenizer.json missing",
    "gguf": "Incompatible framework: GGUF",
    "pytorch": "Incompatible framework: PyTorch",
    "legacy_weights": "Legacy format not supported by mlx-lm",
    "unsupported_model_type": "Model type notamodel not supported",
}


def test_health_reasons_start_with_mlx_knifes_words(model_factory):
    repos = {name: model_factory.variant(name).repo_id for name in KNIFE_REASONS}
    _, doc = run_json("list")
    reasons = {model["name"]: model["reason"] for model in doc["data"]["models"]}
    for name, words in KNIFE_REASONS.items():
        assert reasons[repos[name]].startswith(words), (name, reasons[repos[name]])
    _, doc = run_json("health")
    unhealthy = {entry["name"]: entry["reason"] for entry in doc["data"]["unhealthy"]}
    assert unhealthy[repos["config_missing"]] == "config.json missing"


def test_pull_of_a_short_name_means_the_cached_model_it_names(cache, monkeypatch):
    """mlx-knife's pull resolves a bare name against the cache first (the spec's `pull "Phi-3-mini"` and its
    "Ambiguous Match" example); a name no cached model matches is mlx-community/NAME (test_pull_cli)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # never asked
    result, doc = run_json("pull", "phi-3-MINI")
    validate(doc)
    assert result.exit_code == 0 and doc["data"]["download_status"] == "already_exists"
    main = (cache.repo_dir / "refs" / "main").read_text().strip()
    assert doc["data"]["model"] == doc["data"]["expanded_name"] == PHI and doc["data"]["hash"] == main

    result, doc = run_json("pull", "Llama")
    validate(doc)
    assert result.exit_code == 1 and (doc["error"]["type"], doc["data"]["download_status"]) == (
        "ambiguous_match", "unknown")
    assert doc["error"]["matches"] == ["mlx-community/Llama-3.2-1B-Instruct-4bit",
                                       "mlx-community/Llama-3.2-3B-Instruct-4bit"]


def test_a_revision_that_is_not_cached_lists_the_available_hashes(cache):
    """mlx-knife's schema has `error.available_hashes` for a hash that is not there: the revisions that are."""
    _, doc = run_json("show", PHI)
    revisions = doc["data"]["model"]["revisions"]
    # mlx-knife 2.0.8 answers model_not_found in both (its rm's hash_not_found branch is unreachable: its resolver
    # finds `name@hash` only when that snapshot exists)
    for command in ("show", "rm"):
        result, doc = run_json(command, f"{PHI}@ffffff")
        validate(doc)
        assert result.exit_code == 1 and doc["error"]["type"] == doc["error"]["code"] == "model_not_found"
        assert sorted(doc["error"]["available_hashes"]) == sorted(revisions) and len(revisions) == 2
