"""The standalone kernel driver (tests/native/) built for this machine: the SIMD kernels
(AVX2 here) against the scalar ones (MLX_LLAMA_FORCE_SCALAR=1) and a double-precision
reference, for all bit widths, group sizes and modes. .ci/arm64.sh runs the same driver
for aarch64 under qemu (NEON vs scalar)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from mlx_llama.cli.info import cpu_info

ROOT = Path(__file__).resolve().parent.parent


def expected_isa() -> str:
    """The SIMD level csrc/kernels.cpp picks on this CPU (see cpu_has_avx2 and isa())."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "neon"
    isa = set(cpu_info()["isa"])
    return "avx2" if {"avx2", "fma", "f16c"} <= isa else "scalar"


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build tests/native/kernel_driver.cpp")
def test_simd_kernels_agree_with_scalar_and_reference(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLX_LLAMA_FORCE_SCALAR"}
    r = subprocess.run(
        ["bash", str(ROOT / "tests/native/run.sh"), str(tmp_path), expected_isa()],
        env={**env, "CXX": "g++"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    summaries = [line for line in r.stdout.splitlines() if line.startswith("kernel_driver")]
    assert len(summaries) == 2 and all(" 0 failed" in s for s in summaries), r.stdout
