"""Measurement and test helpers: benchmarks, the MLX-vs-NumPy check, random-weight checkpoints."""
