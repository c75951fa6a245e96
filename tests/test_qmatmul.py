"""The C++ quantized-matmul kernels (mlx_llama._qmm_ext) against MLX and NumPy.

Error bounds checked here:
* mode "exact": |y - y_ref| <= 1e-5 * (|x| @ |w_hat|.T) elementwise, i.e. float32
  accumulation error relative to the sum of magnitudes, vs a float64 NumPy
  dequantization and vs mx.quantized_matmul.
* mode "q8" (int8 activations; the default for 2/4-bit weights): equal to a float64 NumPy model of the
  exact algorithm (x rounded to int8 per 32-block, centred weights, exact bias
  term) within the same 1e-5 bound, and within 1.5% of max|y| of the exact
  result (measured: 0.4-0.8% on Gaussian data).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.errors import MlxLlamaError
from mlx_llama.kernels import extension, qmatmul

ext = pytest.importorskip("mlx_llama._qmm_ext", reason="C++ extension not built")

ALL_BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)


@pytest.fixture(autouse=True)
def _cpu():
    with mx.stream(mx.cpu):
        yield


def unpack_np(w: np.ndarray, bits: int, K: int) -> np.ndarray:
    """q[n, k] from uint32 words: value k sits at bit k*bits of the row's little-endian bit stream."""
    w = np.ascontiguousarray(w, dtype=np.uint32)
    out = np.empty((w.shape[0], K), dtype=np.int64)
    words = w.astype(np.uint64)
    for k in range(K):
        bit = k * bits
        i, off = divmod(bit, 32)
        v = words[:, i] >> np.uint64(off)
        if off + bits > 32:  # straddles two words
            v |= words[:, i + 1] << np.uint64(32 - off)
        out[:, k] = (v & np.uint64((1 << bits) - 1)).astype(np.int64)
    return out


def make_case(rng, M, N, K, bits, g, batch=()):
    x = rng.standard_normal((*batch, M, K)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    w, s, b = mx.quantize(mx.array(W), group_size=g, bits=bits)
    return mx.array(x), w, s, b


def dequant_np(w, s, b, bits, g, K):
    q = unpack_np(np.array(w), bits, K).astype(np.float64)
    sn = np.repeat(np.array(s, dtype=np.float64), g, axis=1)
    bn = np.repeat(np.array(b, dtype=np.float64), g, axis=1)
    return q, sn, bn


def bound(x64, what):
    return 1e-5 * (np.abs(x64) @ np.abs(what).T) + 1e-30


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("g", GROUPS)
def test_exact_vs_numpy_and_mlx(bits, g):
    rng = np.random.default_rng(bits * 1000 + g)
    for M, N, K in ((1, 37, 4 * g), (3, 67, 2 * g), (7, 13, 8 * g)):
        x, w, s, b = make_case(rng, M, N, K, bits, g)
        q, sn, bn = dequant_np(w, s, b, bits, g, K)
        what = sn * q + bn
        x64 = np.array(x, dtype=np.float64)
        ref = x64 @ what.T
        y = np.array(ext.quantized_matmul(x, w, s, b, group_size=g, bits=bits, mode="exact"))
        assert np.all(np.abs(y - ref) <= bound(x64, what)), (bits, g, M, N, K)
        y_mx = np.array(mx.quantized_matmul(x, w, s, b, transpose=True, group_size=g, bits=bits), dtype=np.float64)
        assert np.all(np.abs(y - y_mx) <= 2 * bound(x64, what)), (bits, g, M, N, K)
        # Our NumPy unpacking agrees with MLX's own dequantization.
        np.testing.assert_allclose(np.array(mx.dequantize(w, s, b, group_size=g, bits=bits)), what, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.array(ext.dequantize(w, s, b, group_size=g, bits=bits)), what, rtol=1e-6, atol=1e-6)


def q8_model_np(x, q, sn, bn, bits, g):
    """Float64 model of the q8 kernel: x -> int8 per 32-block, centred weights, exact bias terms."""
    M, K = x.shape
    xb = x.reshape(M, K // 32, 32)
    d = np.abs(xb).max(-1, keepdims=True) / 127.0
    xt = (np.round(xb / np.where(d > 0, d, 1.0)) * d).reshape(M, K)
    c = 2 ** (bits - 1)
    # y = sum s (q - c) xt + (b + c s) x
    return xt @ (sn * (q - c)).T + x @ (bn + c * sn).T


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("g", GROUPS)
def test_q8_matches_its_model_and_error_bound(bits, g, kernel_family):
    rng = np.random.default_rng(7 * bits + g)
    shapes = [(1, 37, 256), (5, 45, 512), (9, 11, 384 if bits != 2 else 512)]
    if ext.panel_kernels() and bits != 2 and 96 % g == 0:
        shapes.append((3, 21, 96))  # K not a multiple of 64: panels only (the AVX2 tiles need 256 / bits)
    for M, N, K in shapes:
        assert ext.q8_supported(K, g, bits)
        x, w, s, b = make_case(rng, M, N, K, bits, g)
        q, sn, bn = dequant_np(w, s, b, bits, g, K)
        what = sn * q + bn
        x64 = np.array(x, dtype=np.float64)
        y = np.array(ext.quantized_matmul(x, w, s, b, group_size=g, bits=bits, mode="q8"))
        model = q8_model_np(x64, q, sn, bn, bits, g)
        assert np.all(np.abs(y - model) <= bound(x64, what)), (bits, g, M, N, K)
        exact = x64 @ what.T
        rel = np.abs(y - exact).max() / np.abs(exact).max()
        assert rel < 0.015, rel


@pytest.mark.parametrize("g", GROUPS)
def test_q16_is_within_int16_rounding_of_exact(g, kernel_family):
    """int16 activations (8-bit weights): error ~1/256 of q8's, far below the weights' own rounding."""
    rng = np.random.default_rng(g)
    for M, N, K in ((1, 37, 256), (6, 45, 384)):
        assert ext.q16_supported(K, g, 8) and not ext.q16_supported(K, g, 4)
        x, w, s, b = make_case(rng, M, N, K, 8, g)
        q, sn, bn = dequant_np(w, s, b, 8, g, K)
        exact = np.array(x, dtype=np.float64) @ (sn * q + bn).T
        y = np.array(ext.quantized_matmul(x, w, s, b, group_size=g, bits=8, mode="q16"))
        y8 = np.array(ext.quantized_matmul(x, w, s, b, group_size=g, bits=8, mode="q8"))
        rel16 = np.abs(y - exact).max() / np.abs(exact).max()
        rel8 = np.abs(y8 - exact).max() / np.abs(exact).max()
        assert rel16 < 5e-5 and rel16 < rel8 / 50, (rel16, rel8)


def test_auto_mode_picks_a_kernel_per_bit_width():
    rng = np.random.default_rng(3)
    with extension.using_mode("auto"):
        assert "int16 activations for 8-bit" in extension.backend_name()
        for bits, kernel in ((8, "q16"), (4, "q8"), (2, "q8"), (6, "exact")):
            assert extension.kernel_for("auto", bits) == kernel
            x, w, s, b = make_case(rng, 3, 16, 256, bits, 64)
            np.testing.assert_array_equal(
                np.array(qmatmul.quantized_matmul(x, w, s, b, group_size=64, bits=bits)),
                np.array(ext.quantized_matmul(x, w, s, b, group_size=64, bits=bits, mode=kernel)),
            )


@pytest.mark.parametrize("dtype", ("bfloat16", "float16"))
@pytest.mark.parametrize("bits", (3, 4, 8))
def test_half_precision_scales_are_read_exactly(dtype, bits):
    """bf16/f16 scales and biases (as checkpoints store them) give bit-identical results to their float32 values."""
    rng = np.random.default_rng(bits)
    x, w, s, b = make_case(rng, 5, 37, 256, bits, 64)
    sh, bh = s.astype(getattr(mx, dtype)), b.astype(getattr(mx, dtype))
    sf, bf = sh.astype(mx.float32), bh.astype(mx.float32)
    for M in (1, 5):
        for mode in ("q8", "exact"):
            y_half = ext.quantized_matmul(x[:M], w, sh, bh, group_size=64, bits=bits, mode=mode)
            y_f32 = ext.quantized_matmul(x[:M], w, sf, bf, group_size=64, bits=bits, mode=mode)
            np.testing.assert_array_equal(np.array(y_half), np.array(y_f32))
    np.testing.assert_array_equal(
        np.array(ext.dequantize(w, sh, bh, group_size=64, bits=bits)),
        np.array(ext.dequantize(w, sf, bf, group_size=64, bits=bits)),
    )
    if bits != 3:
        # Rows with more groups than the q8 tiles widen on the stack: read in place.
        x, w, s, b = make_case(rng, 5, 9, 16448, bits, 32)
        sh, bh = s.astype(getattr(mx, dtype)), b.astype(getattr(mx, dtype))
        for M in (1, 5):
            y_half = ext.quantized_matmul(x[:M], w, sh, bh, group_size=32, bits=bits, mode="q8")
            y_f32 = ext.quantized_matmul(
                x[:M], w, sh.astype(mx.float32), bh.astype(mx.float32), group_size=32, bits=bits, mode="q8"
            )
            np.testing.assert_array_equal(np.array(y_half), np.array(y_f32))


def test_other_bits_fall_back_to_exact_in_q8_mode():
    rng = np.random.default_rng(1)
    x, w, s, b = make_case(rng, 3, 19, 256, 6, 64)
    assert not ext.q8_supported(256, 64, 6)
    a = np.array(ext.quantized_matmul(x, w, s, b, group_size=64, bits=6, mode="q8"))
    e = np.array(ext.quantized_matmul(x, w, s, b, group_size=64, bits=6, mode="exact"))
    np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("mode", ("q8", "exact"))
def test_batch_dims_and_dtypes(mode):
    rng = np.random.default_rng(3)
    x, w, s, b = make_case(rng, 3, 40, 256, 4, 64, batch=(2,))
    y = ext.quantized_matmul(x, w, s, b, group_size=64, bits=4, mode=mode)
    assert y.shape == (2, 3, 40) and y.dtype == mx.float32
    flat = ext.quantized_matmul(x.reshape(6, 256), w, s, b, group_size=64, bits=4, mode=mode)
    np.testing.assert_array_equal(np.array(y).reshape(6, 40), np.array(flat))
    # bf16/f16 scales and biases are converted to float32.
    for dt in (mx.bfloat16, mx.float16):
        s2, b2 = s.astype(dt), b.astype(dt)
        y2 = ext.quantized_matmul(x, w, s2, b2, group_size=64, bits=4, mode=mode)
        ref = ext.quantized_matmul(x, w, s2.astype(mx.float32), b2.astype(mx.float32), group_size=64, bits=4, mode=mode)
        np.testing.assert_array_equal(np.array(y2), np.array(ref))
    # bf16 activations come back in bf16.
    yb = ext.quantized_matmul(x.astype(mx.bfloat16), w, s, b, group_size=64, bits=4, mode=mode)
    assert yb.dtype == mx.bfloat16


def test_non_contiguous_inputs():
    rng = np.random.default_rng(4)
    x, w, s, b = make_case(rng, 4, 24, 256, 8, 32)
    xt = mx.array(np.array(x).T.copy()).T  # transposed view
    for mode in ("q8", "exact"):
        a = np.array(ext.quantized_matmul(xt, w, s, b, group_size=32, bits=8, mode=mode))
        e = np.array(ext.quantized_matmul(x, w, s, b, group_size=32, bits=8, mode=mode))
        np.testing.assert_array_equal(a, e)


def test_bad_shapes_raise():
    rng = np.random.default_rng(5)
    x, w, s, b = make_case(rng, 2, 8, 128, 4, 64)
    with pytest.raises(ValueError):
        ext.quantized_matmul(x[:, :64], w, s, b, group_size=64, bits=4)
    with pytest.raises(ValueError):
        ext.quantized_matmul(x, w, s, b, group_size=32, bits=4)
    with pytest.raises(ValueError):
        ext.quantized_matmul(x, w, s, b, group_size=64, bits=7)


@pytest.mark.parametrize("mode", ("q8", "exact"))
@pytest.mark.parametrize("M,N", [(70, 1000), (1, 2001)])
def test_bit_identical_across_thread_counts(mode, M, N):
    rng = np.random.default_rng(6)
    # Several tasks in both N and M; a GEMV's row blocks depend on the thread count.
    x, w, s, b = make_case(rng, M, N, 512, 4, 64)
    before = ext.num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            ext.set_num_threads(n)
            assert ext.num_threads() == n
            outs.append(np.array(ext.quantized_matmul(x, w, s, b, group_size=64, bits=4, mode=mode)))
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])
    finally:
        ext.set_num_threads(before)


def test_wrapper_dispatch_and_fallback(monkeypatch, capsys):
    rng = np.random.default_rng(8)
    x, w, s, b = make_case(rng, 2, 16, 128, 4, 64)
    ref = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4)
    assert extension.available()
    assert "kernels" in extension.backend_name()
    np.testing.assert_allclose(np.array(qmatmul.quantized_matmul(x, w, s, b, group_size=64, bits=4)), np.array(ref), rtol=0.05, atol=0.05)
    # Without the extension: mx.quantized_matmul and one warning line per process.
    monkeypatch.setattr(extension, "_ext", None)
    monkeypatch.setattr(extension, "_warned", False)
    monkeypatch.setattr(extension, "_import_error", "test")
    y1 = qmatmul.quantized_matmul(x, w, s, b, group_size=64, bits=4)
    y2 = qmatmul.quantized_matmul(x, w, s, b, group_size=64, bits=4)
    np.testing.assert_array_equal(np.array(y1), np.array(ref))
    np.testing.assert_array_equal(np.array(y2), np.array(ref))
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "mx.quantized_matmul" in err
    assert "unavailable" in extension.backend_name()


# --------------------------------------------------------------------------- end to end


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache)
    out = []
    for _ in range(n):
        tok = int(mx.argmax(logits[0, -1]).item())
        out.append(tok)
        logits = model(mx.array([[tok]]), cache)
    return out


@pytest.mark.parametrize("bits", (4, 8))
def test_greedy_tokens_match_mlx(make_quantized_dir, bits):
    from mlx_llama.loader import load_model
    from mlx_llama.model.quantized import QuantizedEmbedding, QuantizedLinear

    qdir = make_quantized_dir(bits, 64)
    model = load_model(qdir, dtype="float32")
    layer = model.layers[0]
    assert isinstance(layer.mlp.down_proj, QuantizedLinear)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    prompts = ([1, 17, 33, 5, 200], [1, 99], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    saved = extension._mode_override
    try:
        extension.set_mode("mlx")
        want = [_greedy(model, p, 12) for p in prompts]
        ref_logits = model(mx.array([prompts[0]]))
        for mode in ("exact", "q8"):
            extension.set_mode(mode)
            got = [_greedy(model, p, 12) for p in prompts]
            assert got == want, mode
            logits = model(mx.array([prompts[0]]))
            tol = 1e-4 if mode == "exact" else 0.02
            scale = float(mx.abs(ref_logits).max())
            assert float(mx.abs(logits - ref_logits).max()) <= tol * scale, mode
    finally:
        extension.set_mode(saved)


def test_half_precision_scales_stay_half_on_load(make_quantized_dir, monkeypatch):
    """A checkpoint's bf16 scales/biases are kept (not widened to float32) and give the same logits."""
    from mlx_llama.loader import load_model

    qdir = make_quantized_dir(4, 64)
    f = qdir / "model.safetensors"
    params = mx.load(str(f))
    half = {k: v.astype(mx.bfloat16) if k.endswith((".scales", ".biases")) else v for k, v in params.items()}
    mx.save_safetensors(str(f), half)
    kept = load_model(qdir, dtype="float32")
    assert kept.layers[0].mlp.down_proj.scales.dtype == mx.bfloat16
    assert kept.model.embed_tokens.biases.dtype == mx.bfloat16
    monkeypatch.setattr(extension, "reads_half_scales", lambda: False)
    widened = load_model(qdir, dtype="float32")
    assert widened.layers[0].mlp.down_proj.scales.dtype == mx.float32
    tokens = mx.array([[1, 17, 33, 5, 200]])
    for mode in ("exact", "q8", "mlx"):
        with extension.using_mode(mode):
            a, b = kept(tokens), widened(tokens)
            assert a.dtype == mx.float32
            np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=mode)


def test_mode_from_environment_at_call_time(monkeypatch):
    rng = np.random.default_rng(9)
    x, w, s, b = make_case(rng, 2, 16, 128, 4, 64)
    ref = np.array(mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4))
    monkeypatch.setattr(extension, "_mode_override", None)
    monkeypatch.setenv("MLX_LLAMA_QMM", "mlx")
    np.testing.assert_array_equal(np.array(qmatmul.quantized_matmul(x, w, s, b, group_size=64, bits=4)), ref)
    monkeypatch.setenv("MLX_LLAMA_QMM", "exact")
    exact = np.array(ext.quantized_matmul(x, w, s, b, group_size=64, bits=4, mode="exact"))
    np.testing.assert_array_equal(np.array(qmatmul.quantized_matmul(x, w, s, b, group_size=64, bits=4)), exact)
    assert "float32 exact" in extension.backend_name()
    monkeypatch.setenv("MLX_LLAMA_QMM", "bogus")
    with pytest.raises(MlxLlamaError, match="MLX_LLAMA_QMM"):  # a user error: one line from the CLI
        qmatmul.quantized_matmul(x, w, s, b, group_size=64, bits=4)


def test_scalar_fallback_in_subprocess():
    """MLX_LLAMA_FORCE_SCALAR=1 takes the path a CPU without AVX2 takes: same exact results."""
    import subprocess
    import sys

    code = r"""
import numpy as np, mlx.core as mx
from mlx_llama import _qmm_ext as ext
assert ext.isa() == "scalar", ext.isa()
rng = np.random.default_rng(0)
for bits in (3, 4, 8):
    x = mx.array(rng.standard_normal((3, 256)).astype(np.float32))
    w, s, b = mx.quantize(mx.array(rng.standard_normal((21, 256)).astype(np.float32)), group_size=64, bits=bits)
    assert not ext.q8_supported(256, 64, bits)
    half = mx.float16 if bits == 4 else mx.bfloat16  # the scalar half -> float conversions
    s, b = s.astype(half), b.astype(half)
    for mode in ("q8", "q16", "exact"):
        y = np.array(ext.quantized_matmul(x, w, s, b, group_size=64, bits=bits, mode=mode))
        sf, bf = s.astype(mx.float32), b.astype(mx.float32)
        ref = np.array(x, dtype=np.float64) @ np.array(mx.dequantize(w, sf, bf, group_size=64, bits=bits), dtype=np.float64).T
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), (bits, mode)
print("ok")
"""
    env = {**__import__("os").environ, "MLX_LLAMA_FORCE_SCALAR": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
