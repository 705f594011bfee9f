"""mlxk: an ollama-style manager and OpenAI-compatible server for MLX models in the Hugging Face cache."""
__version__ = "0.1.0"
