"""Quantized matmul and dequantize for MLX's affine 2-8 bit format, on our CPU kernels where they apply.

`quantized_matmul(x, w, scales, biases, group_size=, bits=)` computes
``x @ dequantize(w, scales, biases).T`` — the same as
``mx.quantized_matmul(..., transpose=True)`` — on the extension's
multi-threaded kernels on CPU streams (mode: `extension`), and with
`mx.quantized_matmul` everywhere else.

A weight with its scales and biases may be in the panel layout
(`to_panels` on all three: 16 rows' elements side by side, shapes (N / 16,
K * bits / 32, 16) and (N / 16, K / group_size, 16)), the order the AVX-512
kernels read them in; every function here takes either layout.

Prefill (large M) uses the same kernels: dequantize + sgemm would also need a
float32 copy of each weight per call (1 GB for a 128256x2048 lm_head).
``MLX_LLAMA_QMM_DEQUANT_M=<rows>`` sends calls with at least that many rows of
x to dequantize + `mx.matmul` instead (figures: benchmarks/results/).
"""

from __future__ import annotations

import mlx.core as mx

from mlx_llama.kernels import extension


PANEL_ROWS = 16


def to_panels(a: mx.array) -> mx.array:
    """`a` (N x D: a packed weight, its scales or biases; N a multiple of 16) in the panel layout;
    rearranged in place when nothing else holds `a`."""
    return extension.module().pack_panels(a)


def from_panels(a: mx.array) -> mx.array:
    """MLX's layout (N x D) of a weight, scales or biases in either layout."""
    if a.ndim == 2:
        return a
    p, d, _ = a.shape
    return a.swapaxes(1, 2).reshape(p * PANEL_ROWS, d)


def weight_rows(a: mx.array, ids: mx.array) -> mx.array:
    """Rows `ids` (1-D) of a weight, scales or biases in either layout, in MLX's layout (len(ids) x D)."""
    if a.ndim == 2:
        return a[ids]
    return a[ids // PANEL_ROWS, :, ids % PANEL_ROWS]


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    group_size: int,
    bits: int,
) -> mx.array:
    """``x @ dequantize(w, scales, biases, group_size, bits).T`` for any leading dims of x."""
    mode = extension.get_mode()
    ext = extension.module()
    if group_size in (32, 64, 128) and bits in (2, 3, 4, 5, 6, 8) and extension.use_ext(mode):
        dequant_m = extension.dequant_threshold()
        if dequant_m is not None and x.size // max(x.shape[-1], 1) >= dequant_m:
            wf = ext.dequantize(w, scales, biases, group_size=group_size, bits=bits)
            y = mx.matmul(x.astype(mx.float32), wf.T)
            return y.astype(x.dtype)
        return ext.quantized_matmul(
            x, w, scales, biases, group_size=group_size, bits=bits, mode=extension.kernel_for(mode, bits)
        )
    if scales.dtype != x.dtype:  # half-precision scales kept for our kernels (see reads_half_scales)
        scales, biases = scales.astype(x.dtype), biases.astype(x.dtype)
    w, scales, biases = from_panels(w), from_panels(scales), from_panels(biases)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int, bits: int) -> mx.array:
    """Dequantize the rows of a 2-D `w` to float32 (multi-threaded on the CPU), exactly whatever the scales' dtype."""
    if extension.use_ext(extension.get_mode()) and group_size in (32, 64, 128):
        return extension.module().dequantize(w, scales, biases, group_size=group_size, bits=bits)
    return mx.dequantize(
        from_panels(w), from_panels(scales).astype(mx.float32), from_panels(biases).astype(mx.float32),
        group_size=group_size, bits=bits,
    )
