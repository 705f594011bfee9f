"""The inference worker: the only mlxk process that imports MLX. See protocol.py for its socket protocol."""
