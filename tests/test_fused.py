"""The extension's fused RMSNorm / RoPE / SwiGLU / attention against mx.fast and mlx.nn.

Tolerance: float32, 1e-5 relative to the largest reference value (measured
~5e-7; RoPE takes its cos/sin in double, MLX in float32).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_llama.kernels import extension, ops as fused
from mlx_llama.loader import load_model
from mlx_llama.model.rope import inverse_frequencies

pytestmark = pytest.mark.skipif(extension._ext is None, reason="extension not built")
ext = extension._ext
RNG = np.random.default_rng(0)


def close(a: mx.array, b: mx.array, rel: float = 1e-5) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rel * np.abs(b).max(), np.abs(a - b).max()


def randn(*shape: int) -> mx.array:
    return mx.array(RNG.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 5, 200), (3, 2048)])
def test_rms_norm(shape):
    x, w = randn(*shape), randn(shape[-1])
    close(ext.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5))


def test_rms_norm_strided_input():
    x, w = randn(64, 6).T, randn(64)  # (6, 64), column-major
    close(ext.rms_norm(x, w, 1e-6), mx.fast.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("L,offset", [(1, 0), (7, 0), (1, 1000), (3, 130_000)])
def test_rope(L, offset):
    periods = mx.array((1.0 / inverse_frequencies(64, 500000.0, None)).astype(np.float32))
    x = randn(2, L, 4, 64)
    ref = mx.fast.rope(x.transpose(0, 2, 1, 3), 64, traditional=False, base=None, scale=1.0,
                       offset=offset, freqs=periods).transpose(0, 2, 1, 3)
    close(ext.rope(x, offset, periods), ref)


@pytest.mark.parametrize("n", (7, 4096, 3 * 16384 + 5))
def test_swiglu(n):
    gate, up = randn(n) * 6, randn(n)  # covers e^-g far out in both tails
    gate = mx.concatenate([gate[:-3], mx.array([-200.0, 200.0, 0.0])])
    close(ext.swiglu(gate, up), nn.silu(gate) * up)


def test_swiglu_on_halves_of_a_fused_projection():
    """Prefill slices a (B, L, 2I) gate/up output: row-strided inputs, unit stride within rows."""
    fused_out = randn(2, 5, 2 * 96) * 3
    gate, up = mx.split(fused_out, 2, axis=-1)
    close(ext.swiglu(gate, up), nn.silu(gate) * up)
    # ... and a last axis that is not unit-stride.
    gate, up = fused_out[..., ::2], fused_out[..., 1::2]
    close(ext.swiglu(gate, up), nn.silu(gate) * up)


@pytest.mark.parametrize("L,T,causal", [(1, 1, False), (1, 37, False), (5, 37, True), (4, 4, True), (3, 20, False),
                                         (40, 48, True), (33, 33, True)])  # prefill chunks take this kernel too
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("layout", ["view", "strided-d"])
def test_attention_on_cache_views(L, T, causal, heads, kv_heads, layout):
    """k/v are slices of a larger (B, Hkv, capacity, D) buffer, as the KV cache hands them, or have
    a strided D (read through a row-major copy)."""
    q = randn(2, L, heads, 64)
    if layout == "view":
        kbuf, vbuf = randn(2, kv_heads, 48, 64), randn(2, kv_heads, 48, 64)
        k, v = kbuf[:, :, :T, :], vbuf[:, :, :T, :]
    else:
        k, v = randn(2, kv_heads, 64, T).transpose(0, 1, 3, 2), randn(2, kv_heads, 64, T).transpose(0, 1, 3, 2)
    ref = mx.fast.scaled_dot_product_attention(
        q.transpose(0, 2, 1, 3), k, v, scale=0.125, mask="causal" if causal else None
    ).transpose(0, 2, 1, 3)
    close(ext.attention(q, k, v, scale=0.125, causal=causal), ref)


@pytest.mark.parametrize("L,T", [(1, 100), (9, 100), (64, 64)])
@pytest.mark.parametrize("D,heads,kv_heads", [(128, 12, 4), (80, 3, 1), (72, 4, 2), (16, 8, 1)])
def test_attention_head_sizes(L, T, D, heads, kv_heads):
    """Head sizes with one, two or a partial 64-float chunk of values (72: not a multiple of 16)."""
    q, k, v = randn(1, L, heads, D), randn(1, kv_heads, T, D), randn(1, kv_heads, T, D)
    ref = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), k, v, scale=D**-0.5,
                                               mask="causal" if L > 1 else None).transpose(0, 2, 1, 3)
    close(ext.attention(q, k, v, scale=D**-0.5, causal=L > 1), ref)


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 40), past=st.integers(0, 40), group=st.sampled_from([1, 3, 4, 8]),
       kv_heads=st.integers(1, 3), D=st.sampled_from([16, 64, 128]), threads=st.integers(1, 3))
def test_prefill_rows_equal_decode_rows(L, past, group, kv_heads, D, threads):
    """Row l of a causal chunk of L rows after `past` keys is bit-identical to that row alone
    over its own past + l + 1 keys: a row's attention does not depend on how the prompt was
    chunked (prefill chunks, decode steps, the engine's fixed chunk boundaries)."""
    rng = np.random.default_rng(L * 1000 + past)
    H, T = group * kv_heads, past + L
    q = mx.array(rng.standard_normal((1, L, H, D)).astype(np.float32))
    k, v = (mx.array(rng.standard_normal((1, kv_heads, T, D)).astype(np.float32)) for _ in range(2))
    before = ext.num_threads()
    ext.set_num_threads(threads)
    try:
        chunk = np.array(ext.attention(q, k, v, scale=D**-0.5, causal=True))
        for l in range(L):
            n = past + l + 1
            alone = ext.attention(q[:, l : l + 1], k[:, :, :n], v[:, :, :n], scale=D**-0.5, causal=False)
            np.testing.assert_array_equal(chunk[:, l : l + 1], np.array(alone))
    finally:
        ext.set_num_threads(before)


def test_backend_name_names_the_attention_kernel():
    assert ("AVX-512 attention" in extension.backend_name()) == ext.attention_avx512()
    if os.environ.get("MLX_LLAMA_NO_AVX512") or os.environ.get("MLX_LLAMA_FORCE_SCALAR"):
        assert not ext.attention_avx512()


def test_attention_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        ext.attention(randn(1, 1, 6, 64), randn(1, 4, 3, 64), randn(1, 4, 3, 64), scale=1.0, causal=False)


def test_mlx_mode_uses_mx_fast_with_the_same_layout():
    """With MLX_LLAMA_QMM=mlx the wrappers fall back to mx.fast; both paths agree."""
    periods = mx.array(np.linspace(1.0, 1e4, 32, dtype=np.float32))
    q, k, v, w = randn(1, 1, 8, 64), randn(1, 2, 9, 64), randn(1, 2, 9, 64), randn(64)
    outs = {}
    for mode in ("exact", "mlx"):
        with extension.using_mode(mode):
            outs[mode] = (fused.rms_norm(q, w, 1e-5), fused.rope(q, 5, periods), fused.attention(q, k, v, 0.125, None),
                          fused.swiglu(q, q * 2))
    for a, b in zip(outs["exact"], outs["mlx"]):
        close(a, b)


@pytest.mark.parametrize("flag", ["MLX_LLAMA_FORCE_SCALAR", "MLX_LLAMA_NO_AVX512"])
def test_other_cpu_paths_in_subprocess(flag):
    """The paths of a CPU without AVX2 (FORCE_SCALAR) or without AVX-512 (NO_AVX512) pass the same tests."""
    env = {**os.environ, flag: "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "not subprocess and not graph"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_decode_step_graph_is_small(make_checkpoint, exact_quantized_matmul, tmp_path: Path):
    """A decode step has one node per norm, RoPE and attention: no mx.fast expansions, no Contiguous copies.

    (MLX's CPU expansions made it ~140 per layer, and their bookkeeping was ~15 ms of
    a 1B model's token.)
    """
    model = load_model(make_checkpoint(num_hidden_layers=4))
    cache = model.make_cache()
    mx.eval(model(mx.array([[1, 2, 3]]), cache))
    out = model(mx.array([[4]]), cache, last_only=True)
    mx.export_to_dot(str(tmp_path / "g.dot"), out)
    nodes = Counter(re.findall(r'label ="([^"]*)"', (tmp_path / "g.dot").read_text()))
    assert nodes["MlxLlamaRMSNorm"] == 9 and nodes["MlxLlamaRoPE"] == 8 and nodes["MlxLlamaAttention"] == 4
    assert nodes["MlxLlamaSwiGLU"] == 4
    expansions = ("Contiguous", "Softmax", "Cos", "Rsqrt", "Broadcast", "Concatenate", "Sigmoid")
    assert not any(nodes[name] for name in expansions), nodes
