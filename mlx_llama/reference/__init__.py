"""The NumPy reference implementation of the same model, written independently to cross-check MLX (imports no mlx)."""
