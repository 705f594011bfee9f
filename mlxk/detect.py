"""What a cached model is: framework, chat/base/embedding, capabilities, context length, quantization.

Pure reading of a `RepoView` (files already listed, small JSON already parsed), so `mlxk list` can describe
1,000 repos without importing mlx, transformers or huggingface_hub. Heuristics follow what the Hub and mlx-lm
themselves use: model card front matter, config keys, chat templates, the safetensors `format` metadata.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from mlxk import registry
from mlxk.health import CHAT_TEMPLATE_FILES, RepoView

log = logging.getLogger("mlxk.detect")

CAPABILITY_ORDER = ("text-generation", "chat", "embeddings", "tools", "reasoning", "vision")
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
EMBEDDING_PIPELINES = ("feature-extraction", "sentence-similarity")
EMBEDDING_TAGS = ("sentence-transformers", "feature-extraction", "sentence-similarity", "embeddings")
CHAT_TAGS = ("conversational", "chat", "instruct")
CONTEXT_KEYS = ("max_position_embeddings", "n_ctx", "max_seq_len", "max_sequence_length", "seq_length",
                "n_positions", "model_max_length")
THINK_MARKERS = ("<think>", "<|begin_of_thought|>", "<seed:think>", "<|channel|>analysis")
TOOL_MARKERS = ("tools", "tool_call", "<|tool")


@dataclass
class Detection:
    framework: str            # "mlx" | "gguf" | "pytorch" | "unknown"
    model_type: str           # "chat" | "base" | "embedding"
    architecture: str | None  # config.json model_type
    capabilities: list[str] = field(default_factory=list)
    context_length: int | None = None
    quantization: str | None = None   # "4bit", "mxfp4", "fp8"... None when unquantized
    quantization_config: dict | None = None  # mlx-knife's model object `quantization`: {bits, group_size[, mode]}


def detect(view: RepoView) -> Detection:
    config = view.config or {}
    architecture = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    template = chat_template(view)
    model_type = detect_model_type(view, template)
    return Detection(
        framework=detect_framework(view),
        model_type=model_type,
        architecture=architecture,
        capabilities=detect_capabilities(view, model_type, template),
        context_length=context_length(config),
        quantization=quantization(config),
        quantization_config=quantization_config(config),
    )


# ---------------------------------------------------------------------------------------------------------------
# Framework


def detect_framework(view: RepoView) -> str:
    """GGUF when the weights are .gguf only; MLX on any MLX marker; other safetensors/bin weights are PyTorch."""
    names = [f.name for f in view.weight_files]
    if names and all(n.endswith(".gguf") for n in names):
        return "gguf"
    if has_mlx_marker(view):
        return "mlx"
    if any(not n.endswith(".gguf") for n in names):
        return "pytorch"
    return "unknown"


def has_mlx_marker(view: RepoView) -> bool:
    readme = view.readme
    if str(readme.get("library_name", "")).lower() == "mlx" or "mlx" in _lower_list(readme.get("tags")):
        return True
    if view.repo_id.lower().startswith("mlx-community/"):
        return True
    config = view.config or {}
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    if "quantization" in config or "quantization" in text_config:
        return True
    return _safetensors_says_mlx(view)


def _safetensors_says_mlx(view: RepoView) -> bool:
    # mlx-lm writes {"format": "mlx"} into every file it saves; one readable header is enough to tell.
    for entry in view.weight_files:
        if entry.name.endswith(".safetensors") and entry.size:
            header = view.safetensors_header(entry.name)
            if header.error is None:
                return header.metadata.get("format") == "mlx"
    return False


def _lower_list(value) -> list[str]:
    if isinstance(value, str):
        return [value.lower()]
    return [str(v).lower() for v in value] if isinstance(value, list) else []


# ---------------------------------------------------------------------------------------------------------------
# Model type and capabilities


def chat_template(view: RepoView) -> str | None:
    """The chat template text when the repo has one (tokenizer config, chat_template.jinja/json), else None."""
    template = (view.tokenizer_config or {}).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        template = "\n".join(t.get("template", "") for t in template if isinstance(t, dict))
    if isinstance(template, str) and template.strip():
        return template
    for name in CHAT_TEMPLATE_FILES:
        entry = view.by_name.get(name)
        if entry is not None and entry.size:
            return _read_text(entry.path, name)
    return None


def _read_text(path, name: str) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return " "  # the file exists: it is a chat model even when the template cannot be read right now
    # chat_template.json is {"chat_template": "..."}; the raw text is kept either way, markers show in both
    return text or " "


def detect_model_type(view: RepoView, template: str | None) -> str:
    if is_embedding(view):
        return "embedding"
    if template is not None or _name_says_chat(view):
        return "chat"
    return "base"


def is_embedding(view: RepoView) -> bool:
    if any(view.has(name) for name in SENTENCE_TRANSFORMERS_FILES):
        return True
    readme = view.readme
    if str(readme.get("pipeline_tag", "")).lower() in EMBEDDING_PIPELINES:
        return True
    if any(tag in EMBEDDING_TAGS for tag in _lower_list(readme.get("tags"))):
        return True
    name = view.repo_id.rsplit("/", 1)[-1].lower()
    if "embed" in name:
        return True
    return registry.looks_like_encoder(view.config)  # a bare encoder (BertModel, XLMRobertaModel, ...)


def _name_says_chat(view: RepoView) -> bool:
    name = view.repo_id.rsplit("/", 1)[-1].lower()
    if "instruct" in name or "chat" in name:
        return True
    if "it" in re.split(r"[-_.]", name):  # gemma-2-2b-it
        return True
    return any(tag in CHAT_TAGS for tag in _lower_list(view.readme.get("tags")))


def detect_capabilities(view: RepoView, model_type: str, template: str | None) -> list[str]:
    config = view.config or {}
    found = set()
    if model_type == "embedding":
        found.add("embeddings")
    else:
        found.add("text-generation")
        if model_type == "chat":
            found.add("chat")
    if template and any(marker in template for marker in TOOL_MARKERS):
        found.add("tools")
    if _has_think_tokens(view, template):
        found.add("reasoning")
    if isinstance(config.get("vision_config"), dict):
        found.add("vision")
    return [c for c in CAPABILITY_ORDER if c in found]


def _has_think_tokens(view: RepoView, template: str | None) -> bool:
    if template and any(marker in template for marker in THINK_MARKERS):
        return True
    added = (view.tokenizer_config or {}).get("added_tokens_decoder")
    if isinstance(added, dict):
        contents = {str(tok.get("content")) for tok in added.values() if isinstance(tok, dict)}
        if any(marker in contents for marker in THINK_MARKERS):
            return True
    head = view.tokenizer_head
    return any(f'"{marker}"'.encode() in head for marker in THINK_MARKERS)


# ---------------------------------------------------------------------------------------------------------------
# Numbers from config.json


def context_length(config: dict) -> int | None:
    for source in (config, config.get("text_config"), config.get("llm_config")):
        if not isinstance(source, dict):
            continue
        for key in CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 100_000_000:
                return value
    return None


def quantization(config: dict) -> str | None:
    """mlx-lm's `quantization` ({"bits": 4, "group_size": 64, "mode": ...}) or HF's `quantization_config`."""
    for source in (config, config.get("text_config")):
        if not isinstance(source, dict):
            continue
        for key in ("quantization", "quantization_config"):
            label = _quant_label(source.get(key))
            if label:
                return label
    return None


def quantization_config(config: dict) -> dict | None:
    """The quantization settings of a quantized model (bits, group_size, mode...), as mlx-knife's JSON API reports
    them: the config's scalar values (per-module overrides, dicts of their own, left out)."""
    for source in (config, config.get("text_config")):
        if not isinstance(source, dict):
            continue
        for key in ("quantization", "quantization_config"):
            value = source.get(key)
            if isinstance(value, dict) and _quant_label(value):
                return {name: item for name, item in value.items()
                        if isinstance(item, (str, int, float, bool)) or item is None}
    return None


def _quant_label(value) -> str | None:
    if not isinstance(value, dict):
        return None
    mode = value.get("mode")
    if isinstance(mode, str) and mode not in ("affine", ""):
        return mode  # mxfp4, nvfp4, mxfp8: the format says more than the bit count
    bits = value.get("bits") or value.get("w_bit")
    if isinstance(bits, (int, float)) and not isinstance(bits, bool) and bits:
        return f"{int(bits)}bit"
    if value.get("load_in_4bit"):
        return "4bit"
    if value.get("load_in_8bit"):
        return "8bit"
    method = value.get("quant_method")
    return str(method) if method else None
