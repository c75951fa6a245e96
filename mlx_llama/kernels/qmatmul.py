"""Quantized matmul for MLX's affine 2-8 bit format, with fast CPU kernels.

`quantized_matmul(x, w, scales, biases, group_size=, bits=)` computes
``x @ dequantize(w, scales, biases).T`` — the same as
``mx.quantized_matmul(..., transpose=True)`` — using the C++ extension
`mlx_llama._qmm_ext` on CPU streams (multi-threaded AVX2 kernels with a scalar
fallback), and `mx.quantized_matmul` everywhere else (GPU, or when the
extension is missing: then a one-line warning is printed once).

Kernel choice, via the environment variable ``MLX_LLAMA_QMM``:

* ``q8`` (default): activations are quantized to int8 per block of 32 and
  multiplied with integer dot products, like llama.cpp's Q8_0 activations.
  For 2/4/8-bit weights with K a multiple of 32 (2/4/8 bits: of 128/64/32).
  Error of an output vs the exact float32 result: about 0.5% of the largest
  output (tests/test_qmatmul.py bounds it at 1.5%). Other bit widths use
  ``exact``. (8-bit GEMV took the exact path until the int8 one prefetched:
  now 13-15 vs 9-11 GB/s on one thread for a 128256x2048 matrix.)
* ``exact``: float32 activations and accumulation; agrees with
  `mx.quantized_matmul` to ~1e-6 relative.
* ``mlx``: always use `mx.quantized_matmul`.

The variable is read at each call (once per forward pass inside `resolved()`,
which the model uses); `set_mode()` overrides it.

Prefill (large M) uses the same kernels. Measured on the 2-core dev box for
M=512 on 8192x2048 (benchmarks/results/kernel_gemv-2threads.txt; two runs): 4-bit
q8 128-145 GFLOP/s vs 103-136 for our dequantize + `mx.matmul` on OpenBLAS
(mlx_llama.kernels.blas); 8-bit 100-105 vs 108-114, and MLX's reference BLAS (without
mlx_llama.kernels.blas) is ~1.5 GFLOP/s. As dequantize + sgemm also needs a float32
copy of the weight per call (1 GB for a 128256x2048 lm_head), the kernel is
used for every M by default;
``MLX_LLAMA_QMM_DEQUANT_M=<rows>`` sends calls with at least that many rows of
x to dequantize + `mx.matmul` instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import mlx.core as mx

try:  # mlx.core is imported first: the extension links against libmlx.
    from mlx_llama import _qmm_ext as _ext

    _import_error: str | None = None
except ImportError as e:  # not built, or built against another MLX
    _ext = None
    _import_error = str(e).splitlines()[0] if str(e) else type(e).__name__

MODES = ("q8", "exact", "mlx")
_warned = False


def _env_mode() -> str:
    mode = os.environ.get("MLX_LLAMA_QMM", "q8").strip().lower() or "q8"
    if mode not in MODES:
        raise ValueError(f"MLX_LLAMA_QMM={mode!r}: choose from {', '.join(MODES)}")
    return mode


def _dequant_threshold() -> int | None:
    if _snapshot is not None:
        return _snapshot[3]
    v = os.environ.get("MLX_LLAMA_QMM_DEQUANT_M", "").strip()
    return int(v) if v else None


_mode_override: str | None = None  # set_mode(); else $MLX_LLAMA_QMM, read at each call


def _warn_missing() -> None:
    global _warned
    if not _warned:
        _warned = True
        print(
            f"mlx-llama: warning: CPU quantized-matmul kernels unavailable ({_import_error}); "
            "using mx.quantized_matmul (slow on CPU)",
            file=sys.stderr,
        )


def available() -> bool:
    """Whether the C++ extension imported."""
    return _ext is not None


def set_mode(mode: str | None) -> None:
    """Pick the kernel: 'q8', 'exact' or 'mlx' (see the module docstring); None: $MLX_LLAMA_QMM again."""
    global _mode_override
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose from {', '.join(MODES)}")
    _mode_override = mode


# Inside `resolved()`: (override at entry, mode, whether the extension applies,
# $MLX_LLAMA_QMM_DEQUANT_M).
_snapshot: tuple[str | None, str, bool, int | None] | None = None


def get_mode() -> str:
    snap = _snapshot
    if snap is not None and snap[0] == _mode_override:
        return snap[1]
    return _mode_override or _env_mode()


@contextlib.contextmanager
def resolved() -> Iterator[None]:
    """Decide the mode and device once for a block of calls (a model's forward pass).

    A 1B decode step makes ~300 calls that would each read the environment
    (~1 ms of the Python graph building per token, which competes with the
    kernels for the cores); `set_mode()` inside the block still takes effect.
    """
    global _snapshot
    outer = _snapshot
    mode = get_mode()
    _snapshot = (_mode_override, mode, _use_ext(mode), _dequant_threshold())
    try:
        yield
    finally:
        _snapshot = outer


@contextlib.contextmanager
def using_mode(mode: str | None) -> Iterator[None]:
    """`set_mode(mode)` for a block, then restore the previous override (not the env-derived mode)."""
    previous = _mode_override
    set_mode(mode)
    try:
        yield
    finally:
        set_mode(previous)


def num_threads() -> int:
    return _ext.num_threads() if _ext is not None else 1


def set_num_threads(n: int) -> None:
    """Resize the kernels' thread pool (default: all cores, or $MLX_LLAMA_NUM_THREADS)."""
    if _ext is not None:
        _ext.set_num_threads(int(n))


def backend_name() -> str:
    """One line naming the quantized-matmul kernel in use on the CPU."""
    if _ext is None:
        return f"mx.quantized_matmul (mlx-llama kernels unavailable: {_import_error})"
    mode = get_mode()
    if mode == "mlx":
        return "mx.quantized_matmul (MLX_LLAMA_QMM=mlx)"
    kind = "int8 activations" if mode == "q8" else "float32 exact"
    return f"mlx-llama {_ext.isa()} kernels, {kind}, {_ext.num_threads()} threads"


def reads_half_scales() -> bool:
    """Whether quantized layers may keep bf16/f16 scales and biases next to float32 activations.

    Our CPU kernels read them as stored (converting exactly); other paths cast
    them per call.
    """
    return _ext is not None and mx.default_device() == mx.cpu


def _use_ext(mode: str) -> bool:
    snap = _snapshot
    if snap is not None and snap[1] == mode and snap[0] == _mode_override:
        return snap[2]
    if mode == "mlx":
        return False
    if mx.default_device() != mx.cpu:
        return False
    if _ext is None:
        _warn_missing()
        return False
    return True


def active_extension() -> Any:
    """The extension when the current mode and device use it (else None, with the missing-extension warning)."""
    return _ext if _use_ext(get_mode()) else None


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
    mode = get_mode()
    if group_size in (32, 64, 128) and bits in (2, 3, 4, 5, 6, 8) and _use_ext(mode):
        dequant_m = _dequant_threshold()
        if dequant_m is not None and x.size // max(x.shape[-1], 1) >= dequant_m:
            wf = _ext.dequantize(w, scales, biases, group_size=group_size, bits=bits)
            y = mx.matmul(x.astype(mx.float32), wf.T)
            return y.astype(x.dtype)
        return _ext.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits, mode=mode)
    if scales.dtype != x.dtype:  # half-precision scales kept for our kernels (see reads_half_scales)
        scales, biases = scales.astype(x.dtype), biases.astype(x.dtype)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int, bits: int) -> mx.array:
    """Dequantize the rows of a 2-D `w` to float32 (multi-threaded on the CPU), exactly whatever the scales' dtype."""
    if _use_ext(get_mode()) and group_size in (32, 64, 128):
        return _ext.dequantize(w, scales, biases, group_size=group_size, bits=bits)
    return mx.dequantize(
        w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits
    )
