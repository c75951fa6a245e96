"""RMSNorm, RoPE, SwiGLU and attention, each one graph node on the CPU.

MLX's CPU backend has no kernels for `mx.fast.rms_norm`, `mx.fast.rope` and
`mx.fast.scaled_dot_product_attention`: it expands them into 11, 27 and 12 small
ops, so a 1B decode step had ~2300 graph nodes and spent ~15 ms per token on
their bookkeeping; its compiled SiLU calls libm per element (~9% of a 1B
prefill).  On CPU streams with the extension these go to its fused
primitives (float32, within ~1e-6 of mx.fast; tests/test_fused.py); everywhere
else (Metal, no extension, ``MLX_LLAMA_QMM=mlx``) to `mx.fast`.

Layout: activations are (B, L, heads, head_dim), as the projections produce
them; the KV cache stores (B, kv_heads, T, head_dim).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_llama.kernels import extension



def _ext() -> Any:
    """The extension when the fused CPU ops apply (as for the quantized matmul), else None."""
    return extension.active_extension()


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    ext = _ext()
    if ext is not None and x.dtype == mx.float32:
        return ext.rms_norm(x, weight, eps)
    return mx.fast.rms_norm(x, weight, eps)


def rope(x: mx.array, offset: int, periods: mx.array) -> mx.array:
    """Half-split RoPE of x (B, L, H, D) at positions offset + l; `periods` = 1 / inverse frequencies."""
    ext = _ext()
    if ext is not None and x.dtype == mx.float32:
        return ext.rope(x, offset, periods)
    y = mx.fast.rope(
        x.transpose(0, 2, 1, 3), x.shape[-1], traditional=False, base=None, scale=1.0, offset=offset, freqs=periods
    )
    return y.transpose(0, 2, 1, 3)


def has_row_ops(dtype: mx.Dtype) -> bool:
    """Whether `rope_rows` and `attention_rows_update` run for activations of `dtype` (the extension's CPU ops).

    Elsewhere callers keep one `rope` and `attention` call per sequence:
    mx.fast has no per-row positions nor per-row key sets.
    """
    return _ext() is not None and dtype == mx.float32


def rope_rows(x: mx.array, positions: mx.array, periods: mx.array) -> mx.array:
    """`rope` with a position per row: row r of x's B * L rows at positions[r] (int32).

    Row r gets the bits `rope` gives it at the same position.  Only where `has_row_ops`.
    """
    return _row_ops().rope_rows(x, positions, periods)


def attention_rows_update(q: mx.array, k: mx.array, v: mx.array, buffers: list[mx.array], slots: list[int],
                          lengths: list[int], scale: float) -> mx.array:
    """Attention of decoding rows, each over its own cache after storing its own key and value.

    Row i of k and v (1, N, Hkv, D) goes into slot slots[i] of its cache's
    buffers[2i], buffers[2i + 1] (1, Hkv, capacity, D), IN PLACE: they must be
    a cache's own storage (`KVCache.reserve_one`), nothing else's.  Then row i
    of q (1, N, H, D) attends to their first lengths[i] slots, with the bits
    `attention(q[:, i:i+1], those slots, scale, None)` gives it → (1, N, H, D).
    One graph node for all rows, where per sequence a write, a fetch and an
    attention call were five.  Only where `has_row_ops`.
    """
    return _row_ops().attention_rows_update(q, k, v, buffers, slots=slots, lengths=lengths, scale=scale)


def _row_ops() -> Any:
    ext = _ext()
    if ext is None:
        raise RuntimeError("the per-row RoPE and attention need the extension's CPU ops (check has_row_ops)")
    return ext


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up."""
    ext = _ext()
    if ext is not None and gate.dtype == mx.float32 and up.dtype == mx.float32:
        return ext.swiglu(gate, up)
    return nn.silu(gate) * up


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Any) -> mx.array:
    """softmax(q k^T * scale + mask) v: q (B, L, H, D), k and v (B, Hkv, T, D) → (B, L, H, D).

    `mask` is None, "causal" (query block aligned with the last L keys) or an
    additive/boolean array broadcastable to (B, H, L, T).

    The extension's kernel takes prefill chunks too: MLX's CPU expansion of
    mx.fast.scaled_dot_product_attention was 2.5-7x slower for 64-512 query
    rows (4x at L=128, T=1152; 1B shape, 2 threads, paired runs: see
    benchmarks/results/kernels-auto.md).
    """
    ext = _ext()
    if (
        ext is not None
        and q.dtype == mx.float32
        and (mask is None or (isinstance(mask, str) and mask == "causal"))
    ):
        return ext.attention(q, k, v, scale=scale, causal=mask is not None)
    out = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), k, v, scale=scale, mask=mask)
    return out.transpose(0, 2, 1, 3)
