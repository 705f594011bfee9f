"""The api process, and only it: a FastAPI app speaking the OpenAI, Anthropic, Responses and Ollama dialects (each a
translation module in routes/ over generation.py), supervising the inference worker over its socket. Code the CLI
shares with it lives in mlxk/ (catalog.py: what can be served; processes.py: the server's pid file).

Nothing here imports mlx or mlx_lm; the worker (workers/inference) owns all MLX memory.
"""
