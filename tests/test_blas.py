"""OpenBLAS routing for MLX's CPU matmuls (mlx_llama/blas.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mlx_llama  # noqa: F401  (installs the BLAS hook)
import mlx.core as mx
from mlx_llama import blas

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
        from mlx_llama import blas
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
    # One-row/one-column products (what the opt-in sgemv forward takes), every transpose combination.
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


@linux_only
def test_gemv_forward_is_opt_in_and_correct() -> None:
    if blas.info().name != "openblas":
        pytest.skip("OpenBLAS not bound")
    assert blas.verify()
    code = textwrap.dedent("""
        import numpy as np, mlx_llama, mlx.core as mx
        from mlx_llama import blas
        rng = np.random.default_rng(0)
        a = rng.standard_normal((1, 300), dtype=np.float32)
        b = rng.standard_normal((257, 300), dtype=np.float32)
        c = rng.standard_normal((300, 5), dtype=np.float32)
        err1 = np.abs(np.array(mx.array(a) @ mx.array(b).T) - a @ b.T).max()
        err2 = np.abs(np.array(mx.array(b) @ mx.array(c[:, :1])) - b @ c[:, :1]).max()
        print(blas.info().gemv_forward, blas.verify(), float(max(err1, err2)))
    """)
    env = {**os.environ, blas.GEMV_ENV_VAR: "1"}
    env.pop(blas.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=120)
    on, verified, err = out.stdout.split()
    assert (on, verified) == ("True", "True")
    assert float(err) < 1e-3
