"""Which implementation runs the model: MLX (default) or the NumPy reference."""

from __future__ import annotations

from pathlib import Path

from mlx_llama.errors import MlxLlamaError
from mlx_llama.interfaces import LanguageModel, TokenizerLike

BACKENDS = ("mlx", "numpy")


def load_backend(name: str, path: str | Path, dtype: str | None = None) -> tuple[LanguageModel, TokenizerLike | None]:
    """`(model, tokenizer)` for a model directory on the named backend."""
    if name == "mlx":
        from mlx_llama.loader import load

        return load(path, dtype)
    if name == "numpy":
        from mlx_llama.reference.model import load_numpy_model
        from mlx_llama.tokenizer import Tokenizer

        model = load_numpy_model(path, dtype)
        return model, Tokenizer.from_dir(model.path, model.config, model.generation_config)
    raise MlxLlamaError(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)}")
