"""The AVX-VNNI tiles of the int8/int16-activation kernels give the AVX2 tiles' bits.

csrc/kernels.cpp runs VNNI dot products where the CPU has AVX-VNNI (the same
integer sums, see q8_tile); MLX_LLAMA_NO_VNNI=1 turns them off. Both run in
subprocesses (the choice is made once per process) on the same inputs and
must agree bit for bit, for every bit width, group size and scale dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_llama.cli.info import cpu_info
from mlx_llama.kernels import extension

pytestmark = [
    pytest.mark.skipif(extension.module() is None, reason="C++ extension not built"),
    pytest.mark.skipif("avx_vnni" not in cpu_info()["isa"], reason="this CPU has no AVX-VNNI"),
]

SCRIPT = """
import sys
import mlx.core as mx
import numpy as np
from mlx_llama.kernels import extension

ext = extension.module()
rng = np.random.default_rng(0)
out = []
for bits, modes in ((2, ("q8",)), (4, ("q8",)), (8, ("q8", "q16"))):
    for g in (32, 64, 128):
        N, K, M = 37, 3 * 256, 9
        x = rng.standard_normal((M, K)).astype(np.float32)
        x[3] *= 100.0
        W = rng.standard_normal((N, K)).astype(np.float32) * 0.05
        with mx.stream(mx.cpu):
            w, s, b = mx.quantize(mx.array(W), group_size=g, bits=bits)
            for sd in (mx.float32, mx.bfloat16, mx.float16):
                for mode in modes:
                    y = ext.quantized_matmul(
                        mx.array(x), w, s.astype(sd), b.astype(sd), group_size=g, bits=bits, mode=mode
                    )
                    out.append(np.array(y).ravel())
np.save(sys.argv[1], np.stack(out))
"""


def run(path: Path, vnni: bool) -> np.ndarray:
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_LLAMA_NO_VNNI", "MLX_LLAMA_FORCE_SCALAR")}
    if not vnni:
        env["MLX_LLAMA_NO_VNNI"] = "1"
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True, timeout=120)
    return np.load(path)


def test_vnni_tiles_match_avx2_tiles_bitwise(tmp_path: Path) -> None:
    with_vnni = run(tmp_path / "vnni.npy", vnni=True)
    without = run(tmp_path / "avx2.npy", vnni=False)
    assert with_vnni.shape == without.shape
    assert (with_vnni.view(np.uint32) == without.view(np.uint32)).all()
