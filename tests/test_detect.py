"""Model detection on real cache layouts: framework, chat/base/embedding, capabilities, context, quantization."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxk.detect import Detection, context_length, detect, quantization
from mlxk.health import inspect_repo, parse_front_matter
from tests import factory
from tests.factory import VARIANTS


def detect_repo(repo) -> Detection:
    return detect(inspect_repo(repo.repo_id, repo.repo_dir))


def base_files(**flags) -> dict[str, bytes]:
    return factory.tiny_model_files(chat_template=False, **flags)


def with_config(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    config = json.loads(files["config.json"])
    config.update(changes)
    return {**files, "config.json": json.dumps(config).encode()}


def with_tokenizer_config(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    config = json.loads(files["tokenizer_config.json"])
    config.update(changes)
    return {**files, "tokenizer_config.json": json.dumps(config).encode()}


def plain_readme(library: str = "transformers", tags: str = "[]", pipeline: str = "text-generation") -> bytes:
    return f"---\nlibrary_name: {library}\npipeline_tag: {pipeline}\ntags: {tags}\n---\n# model\n".encode()


def pt_weights(files: dict[str, bytes]) -> dict[str, bytes]:
    """The same model as transformers would save it: format pt, no mlx markers, no README mlx tag."""
    files = {k: v for k, v in files.items() if k != "model.safetensors.index.json"}
    files["model.safetensors"] = factory.with_safetensors_metadata(files["model.safetensors"], {"format": "pt"})
    files["README.md"] = plain_readme()
    return files


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_framework_and_model_type(model_factory, name):
    variant = VARIANTS[name]
    found = detect_repo(model_factory.variant(name))
    assert (found.framework, found.model_type) == (variant.framework, variant.model_type)


def test_healthy_chat_detection_in_full(model_factory):
    found = detect_repo(model_factory.variant("healthy_chat"))
    assert found == Detection(framework="mlx", model_type="chat", architecture="llama",
                              capabilities=["text-generation", "chat"], context_length=2048, quantization=None)


def test_quantized_model_from_mlx_lm(model_factory):
    assert detect_repo(model_factory.variant("healthy_quantized")).quantization == "4bit"


# --------------------------------------------------------------------------------------------------------------
# Framework markers, each on its own


@pytest.mark.parametrize("marker", ["readme_library", "readme_tag", "org", "config_quantization", "header_format"])
def test_each_mlx_marker_alone_makes_it_mlx(model_factory, marker):
    files = pt_weights(factory.tiny_model_files())
    repo_id = "example-org/tiny"
    if marker == "readme_library":
        files["README.md"] = plain_readme(library="mlx")
    elif marker == "readme_tag":
        files["README.md"] = b"---\nlibrary_name: transformers\ntags:\n  - llama\n  - mlx\n---\n"
    elif marker == "org":
        repo_id = "mlx-community/tiny"
    elif marker == "config_quantization":
        files = with_config(files, quantization={"group_size": 64, "bits": 4})
    elif marker == "header_format":
        files["model.safetensors"] = factory.with_safetensors_metadata(files["model.safetensors"], {"format": "mlx"})
    assert detect_repo(model_factory.write(repo_id, files)).framework == "mlx"


def test_without_markers_it_is_pytorch(model_factory):
    assert detect_repo(model_factory.write("example-org/tiny", pt_weights(factory.tiny_model_files()))).framework \
        == "pytorch"


def test_pytorch_bin_weights(model_factory):
    files = {k: v for k, v in pt_weights(factory.tiny_model_files()).items() if k != "model.safetensors"}
    files["pytorch_model.bin"] = b"\x80\x02" + b"\0" * 64
    assert detect_repo(model_factory.write("example-org/bin", files)).framework == "pytorch"


def test_gguf_beside_mlx_safetensors_is_mlx(model_factory):
    files = {**factory.tiny_model_files(), "extra-Q4.gguf": factory.gguf_bytes()}
    assert detect_repo(model_factory.write("mlx-community/mixed", files)).framework == "mlx"


def test_no_weights_and_no_markers_is_unknown(model_factory):
    files = {"config.json": b'{"model_type": "llama"}', "README.md": b"# hi\n"}
    assert detect_repo(model_factory.write("example-org/empty", files)).framework == "unknown"


# --------------------------------------------------------------------------------------------------------------
# chat / base / embedding


@pytest.mark.parametrize("extra, expected", [
    ({}, "base"),
    ({"chat_template.jinja": b"{{ messages }}"}, "chat"),
    ({"chat_template.json": b'{"chat_template": "{{ messages }}"}'}, "chat"),
])
def test_chat_template_files(model_factory, extra, expected):
    assert detect_repo(model_factory.write("org/tiny-plain", {**base_files(), **extra})).model_type == expected


def test_named_chat_templates_in_tokenizer_config(model_factory):
    files = with_tokenizer_config(base_files(), chat_template=[{"name": "default", "template": "{{ m }}"},
                                                               {"name": "tool_use", "template": "{{ tools }}"}])
    found = detect_repo(model_factory.write("org/tiny-plain", files))
    assert found.model_type == "chat" and "tools" in found.capabilities


@pytest.mark.parametrize("repo_id, expected", [
    ("org/Llama-3.2-1B-Instruct-4bit", "chat"),
    ("org/gemma-2-2b-it", "chat"),
    ("org/openchat-3.5", "chat"),
    ("org/tiny-base", "base"),
    ("org/git-lfs-model", "base"),  # "it" only counts as a whole name part
])
def test_name_says_chat(model_factory, repo_id, expected):
    assert detect_repo(model_factory.write(repo_id, base_files())).model_type == expected


def test_readme_tag_says_chat(model_factory):
    files = {**base_files(), "README.md": plain_readme(library="mlx", tags="[mlx, conversational]")}
    assert detect_repo(model_factory.write("org/tiny-plain", files)).model_type == "chat"


@pytest.mark.parametrize("how", ["sentence_transformers", "architecture", "name", "bert_type", "pipeline_tag"])
def test_embedding_models(model_factory, how):
    files, repo_id = factory.tiny_model_files(), "org/tiny-encoder"  # has a chat template: embedding still wins
    if how == "sentence_transformers":
        files = {**files, "modules.json": b"[]", "sentence_bert_config.json": b"{}"}
    elif how == "architecture":
        files = with_config(files, architectures=["XLMRobertaModel"], model_type="xlm-roberta")
    elif how == "name":
        repo_id = "mlx-community/Qwen3-Embedding-0.6B-4bit"
    elif how == "bert_type":
        files = with_config(files, architectures=["BertForMaskedLM"], model_type="bert")
    elif how == "pipeline_tag":
        files = {**files, "README.md": plain_readme(library="mlx", pipeline="feature-extraction")}
    found = detect_repo(model_factory.write(repo_id, files))
    assert (found.model_type, found.capabilities) == ("embedding", ["embeddings"])


# --------------------------------------------------------------------------------------------------------------
# Capabilities


def test_tools_and_reasoning_from_real_templates(model_factory):
    found = detect_repo(model_factory.write("org/tiny-agent", factory.tiny_model_files(tools=True, reasoning=True)))
    assert found.capabilities == ["text-generation", "chat", "tools", "reasoning"]
    assert detect_repo(model_factory.write("org/tiny-tools", factory.tiny_model_files(tools=True))).capabilities \
        == ["text-generation", "chat", "tools"]


def test_reasoning_from_added_think_tokens_alone(model_factory):
    # A base model whose template is absent: only the tokenizer's added tokens say it can think.
    files = factory.tiny_model_files(chat_template=False, reasoning=True)
    assert detect_repo(model_factory.write("org/tiny-thinker", files)).capabilities == ["text-generation", "reasoning"]
    files = with_tokenizer_config(base_files(), added_tokens_decoder={"7": {"content": "<think>", "special": False}})
    assert "reasoning" in detect_repo(model_factory.write("org/tiny-thinker2", files)).capabilities


def test_vision(model_factory):
    files = with_config(factory.tiny_model_files(), vision_config={"hidden_size": 32})
    assert detect_repo(model_factory.write("org/tiny-vl", files)).capabilities == ["text-generation", "chat", "vision"]


# --------------------------------------------------------------------------------------------------------------
# Numbers from config


@pytest.mark.parametrize("config, expected", [
    ({"max_position_embeddings": 4096}, 4096),
    ({"n_ctx": 1024}, 1024),
    ({"max_seq_len": 512}, 512),
    ({"text_config": {"max_position_embeddings": 131072}}, 131072),
    ({"max_position_embeddings": True}, None),
    ({"model_max_length": 10 ** 30}, None),
    ({}, None),
])
def test_context_length(config, expected):
    assert context_length(config) == expected


@pytest.mark.parametrize("config, expected", [
    ({"quantization": {"group_size": 64, "bits": 4}}, "4bit"),
    ({"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}, "mxfp4"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 8}}, "8bit"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
    ({"quantization_config": {"load_in_4bit": True}}, "4bit"),
    ({"text_config": {"quantization": {"bits": 6, "group_size": 64}}}, "6bit"),
    ({"torch_dtype": "bfloat16"}, None),
])
def test_quantization(config, expected):
    assert quantization(config) == expected


def test_architecture_is_config_model_type(model_factory):
    repo = model_factory.write("org/tiny-qwen", with_config(base_files(), model_type="qwen2"))
    assert detect_repo(repo).architecture == "qwen2"
    assert detect_repo(model_factory.variant("config_missing")).architecture is None


# --------------------------------------------------------------------------------------------------------------
# README front matter


def test_front_matter_forms():
    text = ("---\nlibrary_name: \"mlx\"\nlicense: mit  # a comment\ntags:\n- mlx\n- 'chat'\nbase_model: [a/b, c/d]\n"
            "model-index:\n  - name: x\n---\n# Title\nlibrary_name: not this\n")
    found = parse_front_matter(text)
    assert found["library_name"] == "mlx" and found["license"] == "mit"
    assert found["tags"] == ["mlx", "chat"] and found["base_model"] == ["a/b", "c/d"]
    assert parse_front_matter("# no front matter\nlibrary_name: mlx\n") == {}



def test_engine_and_show_share_one_context_length():
    """`show` reported `n_ctx`/`model_max_length` limits the engine ignored: one definition now serves both (the
    worker's loader lives in residency.py)."""
    import ast

    source = (Path(__file__).parents[1] / "workers" / "inference" / "residency.py").read_text()
    defined = [node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)]
    assert "_context_length" not in defined and "from mlxk.detect import context_length" in source
    assert context_length({"n_ctx": 2048}) == 2048
