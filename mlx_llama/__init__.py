"""mlx-llama: run LLaMA-3 models locally with MLX."""

from . import blas as _blas

_blas.install()  # first: MLX's CPU BLAS calls go to OpenBLAS once mlx.core loads (blas.py)

from .generate import GenerationStats, generate_tokens
from .loader import load

__all__ = ["load", "generate_tokens", "GenerationStats"]
__version__ = "0.1.0"
