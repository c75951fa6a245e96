"""mlx-llama: run LLaMA-3 models locally with MLX."""

from mlx_llama.kernels import blas as _blas

_blas.install()  # first: MLX's CPU BLAS calls go to OpenBLAS once mlx.core loads (blas.py)

from typing import Any

__all__ = ["load", "generate_tokens", "GenerationStats", "batch_generate"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use, so `mlx_llama.reference.model` (the NumPy reference) loads without mlx.
    if name == "load":
        from mlx_llama.loader import load

        return load
    if name in ("generate_tokens", "GenerationStats"):
        from mlx_llama.generation import loop as generate

        return getattr(generate, name)
    if name == "batch_generate":
        from mlx_llama.generation.batch import batch_generate

        return batch_generate
    raise AttributeError(f"module 'mlx_llama' has no attribute {name!r}")
