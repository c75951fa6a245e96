"""Batch invariance of the CPU kernels: row i of a batch is bit-identical to row i computed alone.

The batched engine runs rows of different sequences through one matmul; its
promise that a sequence's tokens do not depend on what else is in the batch
rests on this. Checked for every bit width, group size and kernel mode, odd N
and odd multiples of the group size for K, M up to 64 (a sample of M values:
each M takes a different mix of tile shapes and task blocks), and 1, 2 and 3
kernel threads.
"""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.kernels import extension

ext = extension.module()
pytestmark = pytest.mark.skipif(ext is None, reason="C++ extension not built")

ALL_BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
KERNELS = ("exact", "q8", "q16")
THREADS = (1, 2, 3)
# Tile heights are 1-4 (AVX2 tiles) or 1-8 activation rows (AVX-512 panels,
# which also switch from direct tiles to packed panels above M = 4), task
# blocks 64 rows: these M cover every remainder of each.
M_VALUES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 31, 33, 63, 64)
M_MAX = max(M_VALUES)


@pytest.fixture(autouse=True)
def _cpu() -> Iterator[None]:
    with mx.stream(mx.cpu):
        yield


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}threads")
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = ext.num_threads()
    ext.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        ext.set_num_threads(before)



def rows_alone_and_batched(fn, x: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """fn on each row of x alone (stacked), and fn on the first M rows for each M in M_VALUES."""
    alone = np.stack([np.array(fn(mx.array(x[i : i + 1])))[0] for i in range(M_MAX)])
    batched = {m: np.array(fn(mx.array(x[:m]))) for m in M_VALUES}
    return alone, batched


def assert_invariant(alone: np.ndarray, batched: dict[int, np.ndarray], what: str) -> None:
    for m, y in batched.items():
        # Bitwise: compare the float32 patterns, so even -0.0 vs 0.0 or NaN payloads count.
        same = y.view(np.uint32) == alone[:m].view(np.uint32)
        assert same.all(), f"{what}: M={m}, rows {sorted(set(np.nonzero(~same)[0].tolist()))} differ"


@pytest.mark.parametrize("bits", ALL_BITS)
def test_quantized_matmul_rows_do_not_depend_on_the_batch(bits: int, threads: int, kernel_family: str) -> None:
    rng = np.random.default_rng(bits * 31 + threads)
    for g in GROUPS:
        N, K = (37, 3 * g) if g != 32 else (131, 5 * g)  # odd N; K an odd multiple of g
        x = rng.standard_normal((M_MAX, K)).astype(np.float32)
        x[5, :] *= 100.0  # an outlier row: its int8/int16 scale must not leak into other rows
        w, s, b = mx.quantize(mx.array(rng.standard_normal((N, K)).astype(np.float32) * 0.05), group_size=g, bits=bits)
        for scale_dtype in (mx.float32, mx.bfloat16):
            sd, bd = s.astype(scale_dtype), b.astype(scale_dtype)
            for kernel in KERNELS:

                def fn(xm: mx.array) -> mx.array:
                    return ext.quantized_matmul(xm, w, sd, bd, group_size=g, bits=bits, mode=kernel)

                alone, batched = rows_alone_and_batched(fn, x)
                assert_invariant(alone, batched, f"{kernel} {kernel_family} bits={bits} g={g} N={N} K={K} {scale_dtype}")


def test_rms_norm_and_swiglu_rows_do_not_depend_on_the_batch(threads: int) -> None:
    rng = np.random.default_rng(threads)
    for D in (13, 64, 2051):  # odd widths put elements in the SIMD tails
        x = rng.standard_normal((M_MAX, D)).astype(np.float32)
        weight = mx.array(rng.standard_normal(D).astype(np.float32))
        alone, batched = rows_alone_and_batched(lambda xm: ext.rms_norm(xm, weight, 1e-5), x)
        assert_invariant(alone, batched, f"rms_norm D={D}")
        gate_up = rng.standard_normal((M_MAX, 2 * D)).astype(np.float32)  # as the fused projection gives them
        alone, batched = rows_alone_and_batched(lambda xm: ext.swiglu(xm[:, :D], xm[:, D:]), gate_up)
        assert_invariant(alone, batched, f"swiglu D={D}")


def test_rope_and_attention_batch_entries_do_not_depend_on_the_batch(threads: int) -> None:
    """RoPE and attention on (B, ...) inputs: entry b equals entry b computed alone (B = 1)."""
    rng = np.random.default_rng(10 + threads)
    B, H, Hkv, D = 9, 4, 2, 24
    periods = mx.array((10000.0 ** (np.arange(0, D, 2) / D)).astype(np.float32))
    for L, T in ((1, 7), (3, 19), (1, 33)):
        q = rng.standard_normal((B, L, H, D)).astype(np.float32)
        k = mx.array(rng.standard_normal((B, Hkv, T, D)).astype(np.float32))
        v = mx.array(rng.standard_normal((B, Hkv, T, D)).astype(np.float32))
        for causal in (False, True):
            alone = [np.array(ext.attention(mx.array(q[i : i + 1]), k[i : i + 1], v[i : i + 1],
                                            scale=D**-0.5, causal=causal)) for i in range(B)]
            for b in (2, 5, B):
                y = np.array(ext.attention(mx.array(q[:b]), k[:b], v[:b], scale=D**-0.5, causal=causal))
                for i in range(b):
                    assert (y[i].view(np.uint32) == alone[i][0].view(np.uint32)).all(), (L, T, causal, b, i)
        alone = [np.array(ext.rope(mx.array(q[i : i + 1]), 5, periods)) for i in range(B)]
        y = np.array(ext.rope(mx.array(q), 5, periods))
        for i in range(B):
            assert (y[i].view(np.uint32) == alone[i][0].view(np.uint32)).all(), ("rope", L, i)
