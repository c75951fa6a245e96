"""Rotary position embeddings in NumPy for the reference model (imports no mlx).

Written independently of `mlx_llama.model.rope` (which feeds `mx.fast.rope`): Llama
3.1's scaling is expressed as a clipped blend between the slowed (÷ factor) and
the original frequency, which equals transformers' three-band piecewise rule.
Angles and their cos/sin are computed in float64 and only then rounded.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def rope_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    """Angular frequency (radians per position) of each rotated pair, float64."""
    freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if not scaling:
        return freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    # How many full turns each pair makes over the original context, mapped so
    # that <= low turns → 0 (fully slowed) and >= high turns → 1 (untouched).
    turns = context * freq / (2 * np.pi)
    blend = np.clip((turns - low) / (high - low), 0.0, 1.0)
    return blend * freq + (1.0 - blend) * freq / factor


class NumpyRoPE:
    """Half-split ("rotate_half") layout: pair i is (x[i], x[i + head_dim/2])."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        self.freq = rope_frequencies(head_dim, theta, scaling)

    def __call__(self, x: np.ndarray, offset: int) -> np.ndarray:
        """Rotate `x` (B, H, L, D) whose tokens sit at positions offset, offset+1, ..."""
        L = x.shape[2]
        angle = np.arange(offset, offset + L, dtype=np.float64)[:, None] * self.freq[None, :]
        cos, sin = np.cos(angle).astype(x.dtype), np.sin(angle).astype(x.dtype)
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
