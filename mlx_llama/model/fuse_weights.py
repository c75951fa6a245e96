"""One matmul for the projections that read the same input: q/k/v, and gate/up.

Checkpoints keep the HF / mlx-lm names and layout (files stay interchangeable
with mlx-lm); the loader fuses in memory after loading.  A 1B decode step then
makes 65 quantized matmul calls instead of 113: each call quantizes its input,
wakes the thread pool and ramps up its prefetching, and costs Python graph
building that competes with the kernels for the cores.  Concatenating along the
output dimension is exact for float weights and for MLX's affine format (each
output row has its own scales and biases), so results are unchanged.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_llama.model.quantized import QuantizedLinear


def _out_dims(layer: nn.Module) -> int:
    return layer.weight.shape[0]


def fuse_linears(layers: Sequence[nn.Module]) -> nn.Module | None:
    """A layer computing ``concatenate([l(x) for l in layers], -1)``, or None when they cannot share one matmul.

    They can when all are bias-free and either all float `nn.Linear` of one dtype, or
    all our `QuantizedLinear` with the same bits, group size and scale dtype (mixed-
    precision checkpoints may quantize q/k/v differently).
    """
    first = layers[0]
    if any("bias" in layer for layer in layers):
        return None
    if all(type(layer) is nn.Linear for layer in layers):
        if len({layer.weight.dtype for layer in layers}) != 1:
            return None
        fused = nn.Linear(first.weight.shape[1], sum(map(_out_dims, layers)), bias=False)
        fused.weight = mx.concatenate([layer.weight for layer in layers])
        return fused
    if not all(isinstance(layer, QuantizedLinear) for layer in layers):
        return None
    if len({(layer.bits, layer.group_size, layer.scales.dtype) for layer in layers}) != 1:
        return None
    in_dims = first.input_dims
    fused = QuantizedLinear(in_dims, sum(map(_out_dims, layers)), False, first.group_size, first.bits)
    for name in ("weight", "scales", "biases"):
        setattr(fused, name, mx.concatenate([layer[name] for layer in layers]))
    return fused


def fuse_projections(model: nn.Module) -> None:
    """Give each decoder layer `self_attn.qkv_proj` and `mlp.gate_up_proj` where the formats allow."""
    for layer in model.layers:
        for module, names, fused_name in (
            (layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
            (layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj"),
        ):
            fused = fuse_linears([module[n] for n in names])
            if fused is None:
                continue
            for n in names:
                del module[n]
            setattr(module, fused_name, fused)
            # One layer at a time: the parts are freed before the next concatenation.
            mx.eval(fused.parameters())
