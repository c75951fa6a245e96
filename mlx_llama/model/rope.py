"""Rotary position embeddings, plain or with Llama 3.1's frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_llama.kernels import ops as fused


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    """Per-pair inverse frequencies (float64), as transformers computes them."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
    medium = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return np.where(medium, (1 - smooth) * inv / factor + smooth * inv, scaled)


class RoPE(nn.Module):
    """Half-split ("rotate_half") RoPE, the layout of HF LLaMA checkpoints."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        # mx.fast.rope takes periods (1 / inverse frequency); kept frozen, not a weight.
        self._freqs = mx.array((1.0 / inverse_frequencies(head_dim, theta, scaling)).astype(np.float32))

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        """Rotate x (B, L, heads, head_dim) for positions offset + l."""
        return fused.rope(x, offset, self._freqs)

    def rows(self, x: mx.array, positions: mx.array) -> mx.array:
        """Rotate x (B, L, heads, head_dim), row r of its B * L rows for positions[r] (int32);
        only where `fused.has_row_ops` (the same bits as `__call__` at the same positions)."""
        return fused.rope_rows(x, positions, self._freqs)
