"""Quantized Linear/Embedding layers that run on our CPU kernels.

Drop-in replacements for `mlx.nn.QuantizedLinear` / `mlx.nn.QuantizedEmbedding`
(affine mode): same parameter names (`weight`, `scales`, `biases`, optional
`bias`) and attributes (`group_size`, `bits`, `mode`), so mlx-lm checkpoints
load unchanged; the matmuls go through `mlx_llama.kernels.qmatmul.quantized_matmul`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from mlx_llama.errors import MlxLlamaError
from mlx_llama.kernels.qmatmul import PANEL_ROWS, dequantize, quantized_matmul, weight_rows


def require_affine(mode: str | None) -> None:
    """MLX's affine format is the one our kernels and the NumPy reference read."""
    if (mode or "affine") != "affine":
        raise MlxLlamaError(f"unsupported quantization mode {mode!r}: only affine is supported")


def _empty_quantized(rows: int, cols: int, group_size: int, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """Placeholder parameters of the right shapes (the loader overwrites them)."""
    if (cols * bits) % 32 or cols % group_size:
        raise ValueError(f"input dims {cols} must be a multiple of group_size={group_size} and of {32 // math.gcd(32, bits)}")
    return (
        mx.zeros((rows, cols * bits // 32), dtype=mx.uint32),
        mx.zeros((rows, cols // group_size)),
        mx.zeros((rows, cols // group_size)),
    )


class QuantizedLinear(nn.Module):
    """``y = x @ dequantize(weight).T (+ bias)`` with `weight` packed at `bits` bits."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        bias: bool = False,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
    ):
        super().__init__()
        require_affine(mode)
        self.group_size = group_size
        self.bits = bits
        self.mode = mode
        self.weight, self.scales, self.biases = _empty_quantized(output_dims, input_dims, group_size, bits)
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    @property
    def input_dims(self) -> int:
        return self.weight.shape[1] * 32 // self.bits  # (N, D) or, in the panel layout, (N / 16, D, 16)

    @property
    def output_dims(self) -> int:
        return self.weight.shape[0] * (PANEL_ROWS if self.weight.ndim == 3 else 1)

    def _extra_repr(self) -> str:
        return (
            f"input_dims={self.input_dims}, output_dims={self.output_dims}, bias={'bias' in self}, "
            f"group_size={self.group_size}, bits={self.bits}"
        )

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(
            x, self["weight"], self["scales"], self["biases"], group_size=self.group_size, bits=self.bits
        )
        if "bias" in self:
            y = y + self["bias"]
        return y


class QuantizedEmbedding(nn.Module):
    """Embedding lookup from a quantized table; `as_linear` serves a tied lm_head."""

    def __init__(self, num_embeddings: int, dims: int, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        super().__init__()
        require_affine(mode)
        self.group_size = group_size
        self.bits = bits
        self.mode = mode
        self.num_embeddings = num_embeddings
        self.dims = dims
        self.weight, self.scales, self.biases = _empty_quantized(num_embeddings, dims, group_size, bits)
        self.freeze()

    def _extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dims}, group_size={self.group_size}, bits={self.bits}"

    def __call__(self, x: mx.array) -> mx.array:
        # In float32 whatever the scales' dtype (bf16 scales are kept for the CPU
        # kernels): only the looked-up rows are widened; the model casts the
        # result to its compute dtype.  One dequantize op on the CPU, where
        # mx.dequantize expands into ~50 small graph nodes.
        ids = x.reshape(-1)
        rows = dequantize(
            weight_rows(self["weight"], ids), weight_rows(self["scales"], ids), weight_rows(self["biases"], ids),
            group_size=self.group_size, bits=self.bits,
        )
        return rows.reshape(*x.shape, self.dims)

    def as_linear(self, x: mx.array) -> mx.array:
        """``x @ dequantize(weight).T``: logits for a tied output projection."""
        return quantized_matmul(
            x, self["weight"], self["scales"], self["biases"], group_size=self.group_size, bits=self.bits
        )


def to_quantized(module: nn.Module, group_size: int, bits: int, mode: str = "affine", **_: Any) -> nn.Module:
    """Our quantized counterpart of an `nn.Linear` / `nn.Embedding` (shapes only, weights not copied)."""
    if isinstance(module, nn.Linear):
        out_dims, in_dims = module.weight.shape
        return QuantizedLinear(in_dims, out_dims, "bias" in module, group_size, bits, mode)
    if isinstance(module, nn.Embedding):
        n, dims = module.weight.shape
        return QuantizedEmbedding(n, dims, group_size, bits, mode)
    raise ValueError(f"cannot quantize a {type(module).__name__}")


def quantize(
    model: nn.Module,
    class_predicate: Callable[[str, nn.Module], bool | dict[str, Any]],
    group_size: int = 64,
    bits: int = 4,
) -> None:
    """Like `mlx.nn.quantize`, but swaps in our layers (with placeholder weights, to be loaded).

    `class_predicate(path, module)` returns False, True (use `group_size`/`bits`)
    or a dict with `group_size` and `bits`.
    """

    def swap(path: str, m: nn.Module) -> nn.Module:
        params = class_predicate(path, m)
        if not params:
            return m
        kw = {"group_size": group_size, "bits": bits} if params is True else dict(params)
        return to_quantized(m, **kw)

    leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
