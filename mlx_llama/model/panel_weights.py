"""Quantized weights (with their scales and biases) rearranged once at load into the panel layout
the AVX-512 kernels stream.

Checkpoints keep MLX's layout (files stay interchangeable with mlx-lm): one
weight row of packed words after another.  A matmul tile reads 16 rows at a
time word by word, so from that layout every call first transposes 16 rows
through a buffer (or in registers), and the weights arrive as 16 streams.  In
the panel layout (the 16 rows' words side by side) a tile reads its weights
straight as one sequential stream (and a panel's scales and biases, group by
group, with no per-call transposing either), prefetched far enough ahead that
they keep arriving while the arithmetic of several activation rows runs: a
batched decode matmul (8 rows) is ~1.5x faster (benchmarks/kernel_small_m.py).

Only weights the panel kernels will read are rearranged (CPU stream, AVX-512
VNNI, 4/8-bit in the int8/int16 modes, 16 | rows); the rest stay as loaded.
In place (`to_panels` takes over the loaded buffer), so loading needs no
second copy of the largest tensor.  ``MLX_LLAMA_PANELS=0`` keeps MLX's layout;
a kernel mode chosen after load that does not read panels still works (the
extension restores the rows per call, slowly).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_llama.kernels import extension
from mlx_llama.kernels.qmatmul import PANEL_ROWS, to_panels
from mlx_llama.model.quantized import QuantizedEmbedding, QuantizedLinear


def use_panel_layout(model: nn.Module, *, tied_embeddings: bool) -> None:
    """Rearrange the weight, scales and biases of every quantized layer the panel kernels will read.

    The embedding table is rearranged only when it is also the output
    projection (`tied_embeddings`): its lookups read either layout.
    """
    if not extension.panel_layout_enabled():
        return
    ext = extension.module()
    mode = extension.get_mode()
    for _, layer in model.named_modules():
        if not isinstance(layer, (QuantizedLinear, QuantizedEmbedding)):
            continue
        if isinstance(layer, QuantizedEmbedding) and not tied_embeddings:
            continue
        w = layer["weight"]
        if w.ndim != 2 or w.shape[0] % PANEL_ROWS:
            continue
        k = w.shape[1] * 32 // layer.bits
        if not ext.panel_layout_supported(k, layer.group_size, layer.bits, extension.kernel_for(mode, layer.bits)):
            continue
        del w  # the layer is then the only holder of the old buffers: rearranged in place
        for name in ("weight", "scales", "biases"):
            setattr(layer, name, to_panels(layer[name]))
            mx.eval(layer[name])
