"""Quantization recipes (which bits for which matrix) and per-chunk affine quantization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

from mlx_llama.config import ModelConfig
from mlx_llama.errors import MlxLlamaError
from .layout import kind_of, layer_of, module_of

BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)
MODE = "affine"


@dataclass(frozen=True)
class QParams:
    bits: int
    group_size: int

    def as_config(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": MODE}


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's Q4_K_M `use_more_bits`: first and last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _mixed(low: int, high: int) -> Callable[[str, ModelConfig], int]:
    def bits_for(name: str, cfg: ModelConfig) -> int:
        kind = kind_of(name)
        # The output projection is the most sensitive matrix; a tied embedding is that projection.
        if kind == "lm_head" or (kind == "embed" and cfg.tie_word_embeddings):
            return high
        layer = layer_of(name)
        if kind in ("v", "down") and layer is not None and _more_bits(layer, cfg.num_hidden_layers):
            return high
        return low
    return bits_for


# name -> (base bits, bits_for(tensor name, config)); in the spirit of llama.cpp's K-quant mixes.
RECIPES: dict[str, tuple[int, Callable[[str, ModelConfig], int]]] = {
    "mixed-3-4": (3, _mixed(3, 4)),
    "mixed-3-6": (3, _mixed(3, 6)),
    "mixed-4-6": (4, _mixed(4, 6)),
    "mixed-4-8": (4, _mixed(4, 8)),
}


@dataclass
class Plan:
    """Per-tensor quantization (None: stays float) and the mlx-lm `quantization` config entry."""

    params: dict[str, QParams | None]
    config: dict[str, Any] | None
    skipped: list[str]  # matrices left float because no group size divides their input dim


def make_plan(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], bits: int | None,
              group_size: int, recipe: str | None) -> Plan:
    """Decide each tensor's quantization; `bits=None` and no recipe means keep everything float."""
    if recipe is None and bits is None:
        return Plan({k: None for k in shapes}, None, [])
    if group_size not in GROUP_SIZES:
        raise MlxLlamaError(f"group size {group_size} unsupported: choose from {GROUP_SIZES}")
    if recipe is not None:
        if recipe not in RECIPES:
            raise MlxLlamaError(f"unknown recipe {recipe!r}: choose from {', '.join(RECIPES)}")
        base, bits_for = RECIPES[recipe]
    else:
        if bits not in BITS:
            raise MlxLlamaError(f"{bits}-bit quantization unsupported: choose from {BITS}")
        base, bits_for = bits, (lambda name, cfg: bits)
    qconfig: dict[str, Any] = QParams(base, group_size).as_config()
    params: dict[str, QParams | None] = {}
    skipped: list[str] = []
    for name, shape in shapes.items():
        if len(shape) != 2 or kind_of(name) is None:
            params[name] = None  # norms stay float
            continue
        if shape[1] % group_size:
            params[name] = None
            skipped.append(name)
            qconfig[module_of(name)] = False
            continue
        p = QParams(bits_for(name, cfg), group_size)
        params[name] = p
        if p.bits != base:
            qconfig[module_of(name)] = p.as_config()
    return Plan(params, qconfig, skipped)


def quantized_shapes(shape: tuple[int, ...], p: QParams) -> dict[str, tuple[int, ...]]:
    """Shapes of weight (packed uint32), scales and biases for an [out, in] matrix."""
    out, inp = shape
    return {"weight": (out, inp * p.bits // 32), "scales": (out, inp // p.group_size),
            "biases": (out, inp // p.group_size)}


def quantize_chunk(src: mx.array, dtype: mx.Dtype, p: QParams,
                   sample_stride: int) -> tuple[dict[str, mx.array], mx.array, mx.array]:
    """(weight/scales/biases, squared error sum, squared norm sum) for rows of a matrix.

    Rows are cast to `dtype` (the scales' and biases' dtype, as in mlx-lm) and quantized.
    The error compares the dequantized rows with the *source* rows, so it includes any
    cast, on every `sample_stride`-th row to stay cheap on huge tensors.
    """
    wq, scales, biases = mx.quantize(src.astype(dtype), group_size=p.group_size, bits=p.bits, mode=MODE)
    rows = slice(None, None, sample_stride)
    ref = src[rows].astype(mx.float32)
    deq = mx.dequantize(wq[rows], scales[rows], biases[rows], group_size=p.group_size, bits=p.bits,
                        mode=MODE).astype(mx.float32)
    return {"weight": wq, "scales": scales, "biases": biases}, mx.sum((deq - ref) ** 2), mx.sum(ref * ref)
