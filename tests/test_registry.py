"""mlx-lm's registry read from its files (mlxk.registry) agrees with mlx-lm's own import-based answer."""
from __future__ import annotations

import importlib.util
import json

import pytest

from mlxk import health, registry
from tests import factory
from tests.fixtures.cli import run_json


def installed() -> dict:
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None:
        pytest.skip("mlx-lm is not installed")
    return registry.read(spec.origin)


@pytest.mark.parametrize("config", [
    {"model_type": "llama"}, {"model_type": "mistral"}, {"model_type": "qwen3"}, {"model_type": "notamodel"},
    {"model_type": "bailing_hybrid", "architectures": ["BailingMoeV3ForCausalLM"]}, {"model_type": "kimi_k2"},
])
def test_registry_verdict_matches_importing_mlx_lm(config):
    ok, reason = registry.verdict(installed(), config)
    assert ok == health.model_type_supported(config["model_type"], config.get("architectures"))
    assert (reason is None) == ok


def test_registry_of_a_package_layout(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "llama.py").write_text("")
    (tmp_path / "utils.py").write_text('MODEL_REMAPPING = {"mistral": "llama"}\n')
    (tmp_path / "_version.py").write_text("__version__ = '9.9.9'\n")
    found = registry.read(str(tmp_path / "__init__.py"))
    assert registry.verdict(found, {"model_type": "mistral"}) == (True, None)
    ok, reason = registry.verdict(found, {"model_type": "qwen3"})
    assert not ok and "mlx-lm 9.9.9" in reason and "pip install -U mlx-lm" in reason
    assert registry.verdict(found, {}) == (False, "config.json has no model_type, so mlx-lm 9.9.9 cannot pick an "
                                                  "architecture")
    assert registry.read(None) is None and registry.verdict(None, {"model_type": "llama"})[0] is False


def test_first_list_says_true_or_false_for_every_repo(hf_cache):
    """Issue 12 #7: `runtime_compatible` was null on the first list after a repo appeared."""
    for name in ("healthy_chat", "unsupported_model_type", "gguf", "config_missing"):
        factory.make_variant(hf_cache, name)
    _, doc = run_json("list", "--no-scan")
    by_name = {m["name"]: m for m in doc["data"]["models"]}
    assert all(isinstance(m["runtime_compatible"], bool) for m in by_name.values()), json.dumps(by_name)
    chat = by_name["mlx-community/tiny-healthy-chat"]
    assert (chat["runtime_compatible"], chat["reason"], chat["runtime_pending"]) == (True, None, True)
    odd = by_name["mlx-community/tiny-unsupported-model-type"]
    assert odd["runtime_compatible"] is False and "notamodel" in odd["reason"]
    # the worker's (or health's) import-based verdict replaces the provisional one
    _, doc = run_json("health")
    _, doc = run_json("list", "--no-scan")
    assert all(m["runtime_pending"] is False for m in doc["data"]["models"])
