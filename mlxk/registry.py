"""mlx-lm's model registry read from its files: a runtime verdict without importing mlx-lm (~1 s).

Why: mlx-knife's JSON API promises a boolean `runtime_compatible` on every model object, also on the first `list`
after a repo appears, while `list` must never import mlx-lm (bench/list). mlx-lm decides by `model_type` (after its
MODEL_REMAPPING / MODEL_ARCHITECTURE_REMAPPING) whether a module exists in mlx_lm/models; both are plain files we can
read with `ast`. mlxk.index reads them once per mlx-lm install and keeps the result in state.db. This module stays
light: it is on the `list` path whenever a repo is pending.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

# Encoder model types the inference worker runs itself for embeddings (workers/inference/encoder.py), outside
# mlx-lm's registry: an embedding model of one of these types can run whatever mlx-lm says.
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


def read(package_file: str | None) -> dict | None:
    """The model modules and remappings of the mlx-lm installed at `package_file` (its __init__.py), or None when
    it is not installed or its layout is not the one this reader knows."""
    if not package_file:
        return None
    package = Path(package_file).parent
    try:
        modules = sorted(p.stem for p in (package / "models").glob("*.py") if p.stem != "__init__")
        tree = ast.parse((package / "utils.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    tables = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("MODEL_REMAPPING", "MODEL_ARCHITECTURE_REMAPPING"):
            try:
                tables[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                return None
    if not modules or "MODEL_REMAPPING" not in tables:
        return None
    arch = tables.get("MODEL_ARCHITECTURE_REMAPPING") or {}
    return {"signature": f"mlx-lm {_version(package)}", "modules": modules, "remap": tables["MODEL_REMAPPING"],
            "arch_remap": [[key[0], key[1], value] for key, value in arch.items()]}


def verdict(registry: dict | None, config: dict | None) -> tuple[bool, str | None]:
    """(runtime_compatible, reason) as mlxk.health.check_model_type would say, from a registry (see read())."""
    if registry is None:
        return False, "mlx-lm is not installed, so nothing can run this model; install it (pip install mlx-lm)"
    config = config or {}
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return False, f"config.json has no model_type, so {registry['signature']} cannot pick an architecture"
    if model_type in ENCODER_MODEL_TYPES:
        return True, None
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    remapped = next((target for kind, architecture, target in registry["arch_remap"]
                     if kind == model_type and architecture in architectures), None)
    if (remapped or registry["remap"].get(model_type, model_type)) not in registry["modules"]:
        return False, unsupported_reason(model_type, registry["signature"], config)
    return True, None


def looks_like_encoder(config: dict | None) -> bool:
    """Whether config.json describes an encoder (an embedding model, not a generator): a bare `...Model` without an
    LM head (BertModel, ModernBertModel), or a *bert* model type that is not a causal LM."""
    config = config if isinstance(config, dict) else {}
    architectures = config.get("architectures") or []
    architectures = [a for a in ([architectures] if isinstance(architectures, str) else architectures)
                     if isinstance(a, str)]
    if architectures and all(a.endswith("Model") and "For" not in a for a in architectures):
        return True
    causal = any("CausalLM" in a or "ConditionalGeneration" in a for a in architectures)
    return "bert" in str(config.get("model_type", "")).lower() and not causal


def unsupported_reason(model_type: str, signature: str, config: dict | None = None) -> str:
    """The reason of a model type nothing here runs (this verdict and health.check_model_type's), starting with
    mlx-knife 2.0.8's own words for it ("Model type X not supported"), so scripts matching them keep working.
    An encoder (see looks_like_encoder) is not mlx-lm's to run, so upgrading it would not help: the reason names
    the encoder types the inference worker serves instead."""
    if looks_like_encoder(config):
        served = ", ".join(ENCODER_MODEL_TYPES)
        return (f"Model type {model_type} not supported: it is an encoder, and mlxk's encoder serves embedding "
                f"models of type {served} only; this type is not served (mlx-lm runs no encoders)")
    return f"Model type {model_type} not supported by {signature}; upgrade mlx-lm (pip install -U mlx-lm)"


def _version(package: Path) -> str:
    """mlx-lm's version from its _version.py (what importlib.metadata would say, without its ~25 ms)."""
    try:
        found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (package / "_version.py").read_text(encoding="utf-8"))
    except OSError:
        found = None
    return found.group(1) if found else "(unknown version)"
