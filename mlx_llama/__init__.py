"""mlx-llama: run LLaMA-3 models locally with MLX."""

from mlx_llama.kernels import blas as _blas

_blas.install()  # first: MLX's CPU BLAS calls go to OpenBLAS once mlx.core loads (kernels/blas.py)

import importlib  # noqa: E402
from typing import Any  # noqa: E402

# Public API → the module that owns it; imported on first use, so `mlx_llama.reference`
# (the NumPy reference) and `mlx-llama --help` load without mlx.
_EXPORTS = {
    "load": "mlx_llama.loader",
    "load_model": "mlx_llama.loader",
    "generate_tokens": "mlx_llama.generation.loop",
    "GenerationStats": "mlx_llama.generation.loop",
    "batch_generate": "mlx_llama.generation.batch",
    "Sampler": "mlx_llama.generation.sampler",
    "SamplingParams": "mlx_llama.generation.sampler",
    "stream_text": "mlx_llama.generation.text",
    "Tokenizer": "mlx_llama.tokenizer",
    "MlxLlamaError": "mlx_llama.errors",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mlx_llama' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__ + ["__version__"])
