"""BERT-family encoders for embeddings (BERT, RoBERTa, XLM-RoBERTa) in MLX, with sentence-transformers pooling.

Why written here rather than taken from a library: mlx-lm builds decoders only, and mlx-embeddings 0.1.0 (the one
maintained MLX package that has these encoders) cannot be used in part: importing any of its modules, even
`mlx_embeddings.models.bert`, runs its package `__init__`, which imports `mlx_vlm`; installing it pulls mlx-vlm with
opencv, datasets, pyarrow, scipy and mlx-audio into the worker. The encoder is small (an embedding layer, N
post-norm transformer layers), so it follows the reference BERT of ml-explore/mlx-examples (`bert/model.py`) and keeps
Hugging Face's parameter names (`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`, ...), which
both the original checkpoints and mlx-community's conversions (mlx-embeddings keeps them) use, so either loads as it
is; an `mlx_lm.convert`-style `quantization` entry in config.json is honoured.

What makes batches correct: attention is bidirectional, so a padded row's real tokens would attend to the padding
unless masked; every forward pass takes the attention mask (True for real tokens), and pooling counts real tokens
only. Hence a text's vector is the same alone or batched with longer ones. RoBERTa-style models number positions
from `pad_token_id + 1` (Hugging Face's `create_position_ids_from_input_ids`); token_type_ids are all 0 (one
segment).

Pooling comes from the repo's sentence-transformers files: modules.json names the Pooling module's folder, whose
config.json sets `pooling_mode_cls_token`, `_mean_tokens`, `_max_tokens` or `_lasttoken`; without them, mean
pooling (sentence-transformers' default). Vectors are L2-normalized by the embed op, as OpenAI's are.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxk.registry import ENCODER_MODEL_TYPES

POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "last"}
_ROBERTA_TYPES = ("roberta", "xlm-roberta")


def serves(config: dict | None) -> bool:
    """Whether this module runs the model config.json describes (see mlxk.registry.ENCODER_MODEL_TYPES)."""
    return isinstance(config, dict) and config.get("model_type") in ENCODER_MODEL_TYPES


@dataclass
class EncoderArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_offset: int = 0     # RoBERTa: positions start after the padding index

    @classmethod
    def from_config(cls, config: dict) -> "EncoderArgs":
        if config.get("hidden_act", "gelu") not in ("gelu", "gelu_new", "gelu_python"):
            raise ValueError(f"hidden_act {config.get('hidden_act')!r} is not supported (gelu only)")
        roberta = config.get("model_type") in _ROBERTA_TYPES
        pad = int(config.get("pad_token_id") or (1 if roberta else 0))
        return cls(
            vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=int(config["num_attention_heads"]),
            intermediate_size=int(config["intermediate_size"]),
            max_position_embeddings=int(config["max_position_embeddings"]),
            type_vocab_size=int(config.get("type_vocab_size") or 1),
            layer_norm_eps=float(config.get("layer_norm_eps") or 1e-12),
            pad_token_id=pad, position_offset=pad + 1 if roberta else 0)

    @property
    def context_length(self) -> int:
        """Most tokens one input may have: the position table less the positions RoBERTa skips."""
        return self.max_position_embeddings - self.position_offset


class Embeddings(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.position_embeddings = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.hidden_size)
        self.LayerNorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.offset = args.position_offset

    def __call__(self, input_ids: mx.array) -> mx.array:
        positions = mx.arange(input_ids.shape[1]) + self.offset
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings(mx.zeros_like(input_ids))
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.heads = args.num_attention_heads
        self.scale = 1 / math.sqrt(args.hidden_size // args.num_attention_heads)
        self.query = nn.Linear(args.hidden_size, args.hidden_size)
        self.key = nn.Linear(args.hidden_size, args.hidden_size)
        self.value = nn.Linear(args.hidden_size, args.hidden_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, n, _ = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

        out = mx.fast.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                                   scale=self.scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(b, n, -1)


class DenseNorm(nn.Module):
    """BERT's post-norm residual: LayerNorm(dense(x) + residual)."""

    def __init__(self, inner: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(inner, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        setattr(self, "self", SelfAttention(args))  # Hugging Face's name: attention.self.query
        self.output = DenseNorm(args.hidden_size, args.hidden_size, args.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        return self.output(getattr(self, "self")(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.dense = nn.Linear(args.hidden_size, args.intermediate_size)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.dense(x))  # the exact (erf) GELU, Hugging Face's "gelu"


class Layer(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.attention = Attention(args)
        self.intermediate = Intermediate(args)
        self.output = DenseNorm(args.intermediate_size, args.hidden_size, args.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.layer = [Layer(args) for _ in range(args.num_hidden_layers)]


class Model(nn.Module):
    """input_ids (batch, width) int, attention_mask (batch, width) bool -> hidden states (batch, width, hidden)."""

    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.args = args
        self.embeddings = Embeddings(args)
        self.encoder = Encoder(args)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        mask = attention_mask[:, None, None, :]  # every query may look at every real key, never at padding
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


def sanitize(weights: dict) -> dict:
    """Hugging Face checkpoint names -> this model's: drop a task wrapper's prefix (`bert.`, `roberta.`), the pooler
    and heads sentence embeddings do not use, and the position_ids buffer."""
    out = {}
    for name, value in weights.items():
        for prefix in ("bert.", "roberta.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.startswith(("embeddings.", "encoder.")) and not name.endswith("position_ids"):
            out[name] = value
    return out


def pooling_mode(path: Path) -> str:
    """The sentence-transformers pooling of the repo at path ("cls", "mean", "max" or "last"); "mean" without one."""
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        folder = next(m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling"))
        config = json.loads((path / folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return "mean"
    return next((mode for key, mode in POOLING_MODES.items() if config.get(key)), "mean")


def load(path: Path, config: dict):
    """(model, tokenizer, pooling) for the encoder repo at path; raises on weights that do not fit the config."""
    from transformers import AutoTokenizer

    model = Model(EncoderArgs.from_config(config))
    weights = {}
    for file in sorted(path.glob("model*.safetensors")):
        weights.update(mx.load(str(file)))
    if not weights:
        raise ValueError(f"no model*.safetensors in {path}")
    weights = sanitize(weights)
    if quantization := config.get("quantization"):
        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    class_predicate=lambda p, m: f"{p}.scales" in weights)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    probe = model(mx.array([[tokenizer.cls_token_id or 0]]), mx.array([[True]]))
    mx.eval(probe)  # weights that load but cannot compute fail here, as the model's load error
    if not mx.issubdtype(probe.dtype, mx.floating):
        raise ValueError(f"the forward pass gives {probe.dtype} states, not floating point")
    return model, tokenizer, pooling_mode(path)


def pool(hidden: mx.array, mask: mx.array, lengths: mx.array, mode: str) -> mx.array:
    """(batch, width, hidden) states -> (batch, hidden) float32, over each row's real tokens only."""
    hidden = hidden.astype(mx.float32)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        return hidden[mx.arange(hidden.shape[0]), lengths - 1]
    weights = mask[..., None]
    if mode == "max":
        return mx.where(weights, hidden, -mx.inf).max(axis=1)
    return (hidden * weights).sum(axis=1) / lengths[:, None]
