"""Does the batched engine's batch invariance hold with the kernels active here?  Measured, not assumed.

The engine (generation/engine.py) is batch-invariant exactly when every matmul
gives each row the same bits whatever the number of rows M.  This probe
multiplies the same rows alone and inside larger M, through the kernels a
forward pass would use now (the quantized-matmul mode of MLX_LLAMA_QMM, or the
float32 BLAS), and reports which weight kinds are row-invariant.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_llama.kernels import extension
from mlx_llama.kernels.qmatmul import quantized_matmul

_ROW_COUNTS = (1, 2, 3, 4, 5, 8, 16, 17, 33)  # every kernel path: GEMV-like, small-M, blocked
_K = _N = 512


def _invariant(matmul: object, x: mx.array) -> bool:
    full = np.array(matmul(x))  # type: ignore[operator]
    return all(np.array_equal(np.array(matmul(x[:, :m])), full[:, :m]) for m in _ROW_COUNTS)


def row_invariance() -> dict[str, bool]:
    """{"4-bit": ..., "8-bit": ..., "float32": ...}: whether rows come out bit-identical for any M."""
    key = mx.random.key(0)
    w = mx.random.normal((_N, _K), key=key)
    x = mx.random.normal((1, 64, _K), key=mx.random.key(1))
    result = {}
    with extension.resolved():
        for bits in (4, 8):
            wq, scales, biases = mx.quantize(w, group_size=64, bits=bits)
            result[f"{bits}-bit"] = _invariant(
                lambda a: quantized_matmul(a, wq, scales, biases, group_size=64, bits=bits), x)
    result["float32"] = _invariant(lambda a: a @ w.T, x)
    return result


def describe() -> str:
    """One line for `mlx-llama info`."""
    r = row_invariance()
    parts = [f"{kind} {'yes' if ok else 'no'}" for kind, ok in r.items()]
    return f"{', '.join(parts)} (mode {extension.get_mode()}; 'no': tokens may differ with the batch's size)"
