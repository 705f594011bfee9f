"""The api process: a FastAPI app speaking the OpenAI API, supervising the inference worker over its socket.

Nothing here imports mlx or mlx_lm; the worker (workers/inference) owns all MLX memory.
"""
