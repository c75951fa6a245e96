"""Which implementation runs the model: MLX (default) or the NumPy reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import MlxLlamaError

BACKENDS = ("mlx",)


def load_backend(name: str, path: str | Path, dtype: str | None = None) -> tuple[Any, Any]:
    """`(model, tokenizer)` for a model directory on the named backend."""
    if name == "mlx":
        from .loader import load

        return load(path, dtype)
    raise MlxLlamaError(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)}")
