"""Run mlx-knife 2.0.8 and mlxk side by side on one temp HF cache (issue 12): the spec's "Agent Integration" jq
examples, the health reason of every broken-repo variant, and the error `type` of common failures.

A tool, not a test: the suite cannot depend on mlx-knife being installed (tests/test_mlx_knife_api.py runs the same
examples against mlxk only). Install the peer in its own venv first, never into mlxk's:

    python3 -m venv /tmp/knife && /tmp/knife/bin/pip install mlx-knife==2.0.8 mlx-cpu==0.32.0
    .venv/bin/python bench/knife_compare.py --knife /tmp/knife/bin/mlxk

Everything runs in a temp HF_HOME / MLXK_HOME with the Hub switched off (HF_HUB_OFFLINE=1); nothing touches a real
cache. Prints one block per check; exit 0 whatever differs (it reports, it does not judge).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import factory  # noqa: E402 - the repo's own cache builder, after the path is set
from tests.fixtures.mlx_knife import jq_examples  # noqa: E402

PHI = "mlx-community/Phi-3-mini-4k-instruct-4bit"
BROKEN = ["config_missing", "config_invalid_json", "config_not_object", "no_weights", "index_shard_missing",
          "shard_empty", "shard_lfs_pointer", "shards_without_index", "dangling_symlink", "tree_mismatch",
          "incomplete_download", "safetensors_truncated", "safetensors_bad_header", "tokenizer_missing", "gguf",
          "pytorch", "legacy_weights", "unsupported_model_type"]
ERROR_CASES = [("show", "nothing-like-it"), ("show", "Llama"), ("rm", "nothing-like-it"), ("rm", "Llama"),
               ("health", "Llama"), ("run", "nothing-like-it", "hi"), ("pull", "a" * 97 + "/x"),
               ("show", "./no-such-dir"), ("rm", "./workspace"), ("pull", "./workspace"),
               ("show", f"{PHI}@ffffff")]


def build_spec_cache(hub_cache: Path, workspace: Path) -> None:
    """The test suite's example cache (tests/test_mlx_knife_api.py `cache`): the spec's names, a GGUF, one broken
    download, and a workspace copy of the Phi model."""
    phi = factory.write_repo(hub_cache, PHI, factory.tiny_model_files(quantize=True))
    factory.add_revision(phi, {"notes.txt": b"second commit", "README.md": b"# the second card\n" * 40})
    for repo in ("mlx-community/Llama-3.2-1B-Instruct-4bit", "mlx-community/Llama-3.2-3B-Instruct-4bit"):
        factory.write_repo(hub_cache, repo, factory.tiny_model_files())
    factory.write_repo(hub_cache, "mlx-community/Qwen3-0.6B-4bit", factory.tiny_model_files(chat_template=False))
    factory.make_variant(hub_cache, "gguf")
    factory.make_variant(hub_cache, "config_missing")
    shutil.copytree(phi.snapshot_dir, workspace, symlinks=False)


def build_broken_cache(hub_cache: Path, workspace: Path) -> None:
    """The example cache plus every broken variant of tests/factory.py (one repo per health rule)."""
    build_spec_cache(hub_cache, workspace)
    for name in BROKEN:
        if name not in ("gguf", "config_missing"):
            factory.make_variant(hub_cache, name)


def call(tool: list[str], args: list[str], env: dict, cwd: Path) -> tuple[int, str, dict | None]:
    done = subprocess.run([*tool, *args, "--json"], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        doc = None
    return done.returncode, done.stdout, doc


def jq(flags: list[str], program: str, text: str) -> str:
    done = subprocess.run(["jq", *flags, program], input=text, capture_output=True, text=True, timeout=30)
    return (done.stdout if done.returncode == 0 else f"jq error: {done.stderr.strip()}").strip()


def covers(knife, mlxk) -> bool:
    """mlxk's answer has every key and value of mlx-knife's (extra keys allowed: a superset, as issue 12 asks)."""
    if isinstance(knife, dict):
        return isinstance(mlxk, dict) and all(k in mlxk and covers(v, mlxk[k]) for k, v in knife.items())
    if isinstance(knife, list):
        return isinstance(mlxk, list) and len(knife) == len(mlxk) and all(map(covers, knife, mlxk))
    return knife == mlxk


def verdict(knife: str, mlxk: str) -> str:
    if knife == mlxk:
        return "SAME"
    try:
        if covers(json.loads(knife), json.loads(mlxk)):
            return "SAME on mlx-knife's keys (mlxk adds keys)"
    except ValueError:
        pass
    return "DIFFERENT"


def compare_examples(tools: dict, env: dict, cwd: Path) -> None:
    """The spec's 12 examples (jq_examples(): 11 one-liners and the `pull "$model"` loop, run for its two models
    under HF_HUB_OFFLINE=1, where both tools answer from the cache)."""
    print("\n# The spec's agent integration examples")
    for number, (args, flags, program) in enumerate(jq_examples(), 1):
        runs = [[a.replace("$model", m) for a in args] for m in ("Phi-3-mini", "Llama-3.2-1B")] \
            if "$model" in args else [args]
        answers = {name: "\n".join(jq(flags, program, call(tool, run, env, cwd)[1]) for run in runs)
                   for name, tool in tools.items()}
        print(f"\n## {number}. {' '.join(args)} | jq {' '.join(flags)}'{program}'  -> "
              f"{verdict(answers['mlx-knife'], answers['mlxk'])}")
        for name, answer in answers.items():
            print(f"  {name}: {answer.replace(chr(10), chr(10) + ' ' * (len(name) + 4))}")


def compare_reasons(tools: dict, env: dict, cwd: Path) -> None:
    print("\n# Health reasons of each repo (health, then list: mlx-knife | mlxk)")
    reasons: dict = {}
    for name, tool in tools.items():
        _, _, doc = call(tool, ["health"], env, cwd)
        data = (doc or {}).get("data") or {}
        for entry in data.get("healthy", []) + data.get("unhealthy", []):
            reasons.setdefault(entry["name"], {})[name] = (entry["status"], entry["reason"])
        _, _, doc = call(tool, ["list"], env, cwd)
        for model in ((doc or {}).get("data") or {}).get("models", []):
            reasons.setdefault(model["name"], {})[name + " list"] = (model["runtime_compatible"], model["reason"])
    for repo, seen in sorted(reasons.items()):
        print(f"\n{repo}")
        for name, value in seen.items():
            print(f"  {name:15} {value}")


def compare_errors(tools: dict, env: dict, cwd: Path) -> None:
    print("\n# Common failures (exit code, status, error.type, error.code, data, message)")
    for args in ERROR_CASES:
        print(f"\n{' '.join(args)}")
        for name, tool in tools.items():
            code, _, doc = call(tool, list(args), env, cwd)
            error = (doc or {}).get("error") or {}
            print(f"  {name:10} exit {code}  {doc and doc.get('status')}  type={error.get('type')}  "
                  f"code={error.get('code')}  data={json.dumps((doc or {}).get('data'))[:160]}  "
                  f"message={error.get('message')!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--knife", default="/tmp/knife/bin/mlxk", help="mlx-knife 2.0.8's `mlxk` (its own venv)")
    parser.add_argument("--mlxk", default=str(ROOT / ".venv" / "bin" / "mlxk"), help="this checkout's mlxk")
    options = parser.parse_args()
    if shutil.which("jq") is None:
        sys.exit("jq is not installed")
    tools = {"mlx-knife": [options.knife], "mlxk": [options.mlxk]}
    for label, build in (("the spec's example cache", build_spec_cache),
                         ("the example cache plus every broken variant", build_broken_cache)):
        with tempfile.TemporaryDirectory(prefix="knife-compare-") as temp:
            temp = Path(temp)
            hub_cache = temp / "hf" / "hub"
            hub_cache.mkdir(parents=True)
            build(hub_cache, temp / "workspace")
            env = {**os.environ, "HF_HOME": str(temp / "hf"), "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1",
                   "MLXK_HOME": str(temp / "mlxk-home"), "HF_ENDPOINT": "http://127.0.0.1:9"}
            env.pop("MLXK_WORKSPACE_HOME", None)
            call(tools["mlxk"], ["health"], env, temp)   # settle runtime verdicts first, as a second `list` would
            print(f"\n######## {label}")
            compare_examples(tools, env, temp)
            compare_reasons(tools, env, temp)
            compare_errors(tools, env, temp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
