"""OpenBLAS routing for MLX's CPU matmuls (mlx_llama/blas.py)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mlx_llama  # noqa: F401  (installs the BLAS hook)
import mlx.core as mx
from mlx_llama.kernels import blas

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenBLAS rebinding is Linux-only")


@linux_only
def test_openblas_is_bound_in_this_environment() -> None:
    if os.environ.get(blas.ENV_VAR, "").lower() in ("reference", "off", "none", "0", "false", "no"):
        pytest.skip(f"{blas.ENV_VAR} disables OpenBLAS")
    info = blas.info()
    assert info.name == "openblas", info.describe()
    assert "cblas_sgemm" in info.symbols
    assert info.library in blas.loaded_libraries()
    assert info.threads >= 1
    assert "OpenBLAS" in info.describe()


@pytest.mark.parametrize("shape", [(1, 64, 48), (7, 33, 129), (128, 256, 96), (300, 512, 1024)])
def test_float32_matmul_matches_numpy(shape: tuple[int, int, int]) -> None:
    m, k, n = shape
    rng = np.random.default_rng(m + k + n)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    got = np.array(mx.array(a) @ mx.array(b))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    # Transposed operands take other BLAS paths (MLX passes transpose flags).
    got_t = np.array(mx.array(a) @ mx.array(np.ascontiguousarray(b.T)).T)
    np.testing.assert_allclose(got_t, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_batched_and_addmm_match_numpy() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 17, 40), dtype=np.float32)
    b = rng.standard_normal((3, 40, 9), dtype=np.float32)
    c = rng.standard_normal((17, 9), dtype=np.float32)
    np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4, atol=1e-4)
    got = np.array(mx.addmm(mx.array(c), mx.array(a[0]), mx.array(b[0]), alpha=0.5, beta=2.0))
    np.testing.assert_allclose(got, 2.0 * c + 0.5 * (a[0] @ b[0]), rtol=1e-4, atol=1e-4)


@linux_only
def test_env_var_keeps_reference_blas_and_results_agree() -> None:
    code = textwrap.dedent("""
        import numpy as np, mlx_llama, mlx.core as mx
        from mlx_llama.kernels import blas
        a = np.random.default_rng(0).standard_normal((64, 80), dtype=np.float32)
        print(blas.info().name, float(np.abs(np.array(mx.array(a) @ mx.array(a.T)) - a @ a.T).max()))
    """)
    env = {**os.environ, blas.ENV_VAR: "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    name, err = out.stdout.split()
    assert name == "reference"
    assert float(err) < 1e-3


@linux_only
def test_hook_binds_when_mlx_core_is_imported_later() -> None:
    # install() must not import MLX itself (the NumPy backend runs without it), yet
    # bind as soon as anything imports mlx.core.
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("blas_alone", {blas.__file__!r})
        b = importlib.util.module_from_spec(spec); sys.modules["blas_alone"] = b; spec.loader.exec_module(b)
        b.install()
        before = "mlx.core" in sys.modules
        import mlx.core
        print(before, b._INFO.name if b._INFO else None)
    """)
    env = {k: v for k, v in os.environ.items() if k != blas.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "openblas"]


@pytest.mark.parametrize("m,k,n", [(1, 300, 257), (257, 300, 1), (1, 64, 1), (2, 64, 3)])
def test_one_row_and_one_column_products_match_numpy(m: int, k: int, n: int) -> None:
    # One-row/one-column products (what the sgemv forward takes), every transpose combination.
    rng = np.random.default_rng(m * 1000 + n)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    c = rng.standard_normal((m, n), dtype=np.float32)
    want = a.astype(np.float64) @ b
    for A in (mx.array(a), mx.array(np.ascontiguousarray(a.T)).T):
        for B in (mx.array(b), mx.array(np.ascontiguousarray(b.T)).T):
            np.testing.assert_allclose(np.array(A @ B), want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
            got = np.array(mx.addmm(mx.array(c), A, B, alpha=0.5, beta=2.0))
            np.testing.assert_allclose(got, 2.0 * c + 0.5 * want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    # Batched one-row products (decode attention) and a strided row of a bigger matrix.
    q = rng.standard_normal((4, 1, 32), dtype=np.float32)
    kk = rng.standard_normal((4, 50, 32), dtype=np.float32)
    got = np.array(mx.array(q) @ mx.array(kk).transpose(0, 2, 1))
    np.testing.assert_allclose(got, q @ kk.transpose(0, 2, 1), rtol=1e-4, atol=1e-4)


def _dispatcher():
    """The extension's cblas_sgemm dispatcher as a ctypes function (skips when it is not bound)."""
    if blas.info().name != "openblas" or not blas.info().gemv_forward:
        pytest.skip("the sgemv forward is not bound")
    from mlx_llama import _qmm_ext

    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    proto = ctypes.CFUNCTYPE(None, i, i, i, i, i, i, f, p, i, p, i, f, p, i)
    return proto(_qmm_ext.sgemm_dispatch_address())


def _stored(rng, rows: int, cols: int, ld: int, col_major: bool):
    """A rows×cols matrix in a padded buffer with leading dimension ld: (buffer, logical view)."""
    if col_major:
        buf = rng.standard_normal((cols, ld), dtype=np.float32)
        return buf, buf[:, :rows].T
    buf = rng.standard_normal((rows, ld), dtype=np.float32)
    return buf, buf[:, :cols]


@linux_only
@pytest.mark.parametrize("m,n,k", [(1, 37, 29), (41, 1, 29), (1, 1, 29), (3, 5, 7), (1, 300, 257), (257, 1, 300)])
@pytest.mark.parametrize("order", [101, 102])
def test_sgemm_dispatcher_matches_numpy(m: int, n: int, k: int, order: int) -> None:
    # Every transpose combination, padded leading dimensions, alpha/beta, both storage orders;
    # padding outside the logical matrices must stay untouched.
    sgemm = _dispatcher()
    col = order == 102
    rng = np.random.default_rng(m * 7 + n * 3 + k + order)
    before = blas.gemv_calls()
    for ta in (111, 112):
        for tb in (111, 112):
            a_rows, a_cols = (m, k) if ta == 111 else (k, m)
            b_rows, b_cols = (k, n) if tb == 111 else (n, k)
            lda = (a_rows if col else a_cols) + 3
            ldb = (b_rows if col else b_cols) + 5
            ldc = (m if col else n) + 2
            a_buf, a = _stored(rng, a_rows, a_cols, lda, col)
            b_buf, b = _stored(rng, b_rows, b_cols, ldb, col)
            c_buf, c = _stored(rng, m, n, ldc, col)
            op_a = a.T if ta == 112 else a
            op_b = b.T if tb == 112 else b
            alpha, beta = 0.75, -1.5
            want_buf = c_buf.copy()
            want_c = want_buf[:, :m].T if col else want_buf[:, :n]
            want_c[...] = alpha * (op_a.astype(np.float64) @ op_b) + beta * c
            sgemm(order, ta, tb, m, n, k, alpha, a_buf.ctypes.data, lda, b_buf.ctypes.data, ldb, beta,
                  c_buf.ctypes.data, ldc)
            np.testing.assert_allclose(c_buf, want_buf, rtol=1e-4, atol=1e-4 * np.sqrt(k),
                                       err_msg=f"order={order} ta={ta} tb={tb}")
    if (m == 1) != (n == 1):
        assert blas.gemv_calls() - before == 4  # each call went to sgemv
    else:
        assert blas.gemv_calls() == before


@linux_only
def test_gemv_forward_is_default_with_opt_out() -> None:
    if blas.info().name != "openblas":
        pytest.skip("OpenBLAS not bound")
    assert blas.verify()
    code = textwrap.dedent("""
        import numpy as np, mlx_llama, mlx.core as mx
        from mlx_llama.kernels import blas
        rng = np.random.default_rng(0)
        a = rng.standard_normal((1, 300), dtype=np.float32)
        b = rng.standard_normal((257, 300), dtype=np.float32)
        c = rng.standard_normal((300, 5), dtype=np.float32)
        err1 = np.abs(np.array(mx.array(a) @ mx.array(b).T) - a @ b.T).max()
        err2 = np.abs(np.array(mx.array(b) @ mx.array(c[:, :1])) - b @ c[:, :1]).max()
        print(blas.info().gemv_forward, blas.verify(), blas.gemv_calls() > 0, float(max(err1, err2)))
    """)
    env = {k: v for k, v in os.environ.items() if k not in (blas.ENV_VAR, blas.GEMV_ENV_VAR)}
    for value, want in ((None, "True"), ("0", "False")):
        if value is not None:
            env[blas.GEMV_ENV_VAR] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                             timeout=120)
        on, verified, called, err = out.stdout.split()
        assert (on, verified, called) == (want, "True", want)
        assert float(err) < 1e-3


@linux_only
def test_mlx_lm_stream_generate_does_not_deadlock(tiny_chat_model) -> None:
    # The old ctypes dispatcher needed the GIL on MLX's worker thread, so mlx-lm's
    # stream_generate (which waits on MLX while holding it) hung; the C dispatcher must not.
    pytest.importorskip("mlx_lm")
    code = textwrap.dedent(f"""
        import mlx_llama
        from mlx_llama.kernels import blas
        from mlx_lm import load, stream_generate
        model, tok = load({str(tiny_chat_model)!r})
        n = sum(1 for _ in stream_generate(model, tok, "Hello there", max_tokens=8))
        print(n, blas.info().gemv_forward, blas.gemv_calls() > 0)
    """)
    env = {k: v for k, v in os.environ.items() if k not in (blas.ENV_VAR, blas.GEMV_ENV_VAR)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    n, on, called = out.stdout.split()[-3:]
    assert int(n) >= 1
    assert on == called  # when the forward is bound, decoding went through it
