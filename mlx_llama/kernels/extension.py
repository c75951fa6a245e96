"""The C++ extension `mlx_llama._qmm_ext` and the kernel mode: the one place that imports it.

Kernel choice, via the environment variable ``MLX_LLAMA_QMM``:

* ``auto`` (default): per bit width, the fastest kernel that keeps the
  model's error within 5% of the exact kernel's (tests/test_kernel_fidelity.py):
  ``q16`` for 8-bit weights, ``q8`` for 2- and 4-bit weights (their own
  rounding dwarfs the int8 activations'), ``exact`` for 3/5/6 bits.
* ``q8``: activations are quantized to int8 per block of 32 and
  multiplied with integer dot products, like llama.cpp's Q8_0 activations
  (2/4/8-bit weights with K a multiple of 32; other bit widths use ``exact``).
  Error of an output vs the exact float32 result: about 0.5% of the largest
  output (tests/test_qmatmul.py bounds it at 1.5%). For 8-bit weights that
  doubles the model's error (issue 13), hence ``auto``.
* ``q16``: activations quantized to int16 per block of 32 (8-bit weights
  only; other bit widths use ``exact``): ~1/256 of q8's activation error at
  q8's speed (a GEMV is memory-bound, and vpmaddwd's 16 products per
  instruction match q8's maddubs + madd pair).
* ``exact``: float32 activations and accumulation; agrees with
  `mx.quantized_matmul` to ~1e-6 relative.
* ``mlx``: always use `mx.quantized_matmul` (and `mx.fast` for the fused ops).

Where the AVX-512 VNNI panel kernels run, the loader rearranges 4/8-bit
weights into their panel layout (mlx_llama.model.panel_weights);
``MLX_LLAMA_PANELS=0`` keeps the layout of the files.

The variable is read once per forward pass (`resolved()`, which the model
enters); `set_mode()` / `using_mode()` override it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import mlx.core as mx

from mlx_llama.errors import MlxLlamaError

try:  # mlx.core is imported first: the extension links against libmlx.
    from mlx_llama import _qmm_ext as _ext

    _import_error: str | None = None
except ImportError as e:  # not built, or built against another MLX
    _ext = None
    _import_error = str(e).splitlines()[0] if str(e) else type(e).__name__

MODES = ("auto", "q8", "q16", "exact", "mlx")
DEFAULT_MODE = "auto"
# What `auto` runs per bit width (bit widths not named: exact).
AUTO_KERNELS = {2: "q8", 4: "q8", 8: "q16"}
_warned = False


def kernel_for(mode: str, bits: int) -> str:
    """The extension's kernel ('q8', 'q16' or 'exact') that `mode` runs for `bits`-bit weights."""
    if mode == "auto":
        return AUTO_KERNELS.get(bits, "exact")
    return mode


def _env_mode() -> str:
    mode = os.environ.get("MLX_LLAMA_QMM", DEFAULT_MODE).strip().lower() or DEFAULT_MODE
    if mode not in MODES:
        raise MlxLlamaError(f"MLX_LLAMA_QMM={mode!r}: choose from {', '.join(MODES)}")
    return mode


def dequant_threshold() -> int | None:
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
    """Pick the kernel: one of MODES (see the module docstring); None: $MLX_LLAMA_QMM again."""
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
    _snapshot = (_mode_override, mode, use_ext(mode), dequant_threshold())
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


def backend_name() -> str:
    """One line naming the quantized-matmul kernel in use on the CPU."""
    if _ext is None:
        return f"mx.quantized_matmul (mlx-llama kernels unavailable: {_import_error})"
    mode = get_mode()
    if mode == "mlx":
        return "mx.quantized_matmul (MLX_LLAMA_QMM=mlx)"
    isa = _ext.isa()
    if isa == "avx2" and _ext.panel_kernels():  # 4/8-bit integer modes on the AVX-512 VNNI panel kernels
        isa = "avx512-vnni/avx2"
    if not isa.endswith("avx2"):  # the integer paths are AVX2/AVX-512 code: everything runs exact here
        kind = "float32 exact"
    elif mode == "auto":
        kind = "auto: int16 activations for 8-bit, int8 for 2/4-bit, float32 exact for other bit widths"
    else:
        kind = {"q8": "int8 activations", "q16": "int16 activations (8-bit weights)"}.get(mode, "float32 exact")
    layout = ", 4/8-bit weights in the panel layout" if panel_layout_enabled() else ""
    attention = ", AVX-512 attention" if _ext.attention_avx512() else ""
    return f"mlx-llama {isa} kernels, {kind}{layout}{attention}, {_ext.num_threads()} threads"


def panel_layout_enabled() -> bool:
    """Whether loading rearranges 4/8-bit weights into the panel layout (mlx_llama.model.panel_weights):
    the AVX-512 VNNI panel kernels run the current mode here, and not MLX_LLAMA_PANELS=0."""
    if os.environ.get("MLX_LLAMA_PANELS", "1").strip() == "0":
        return False
    return _ext is not None and _ext.panel_kernels() and use_ext(get_mode())


def reads_half_scales() -> bool:
    """Whether quantized layers may keep bf16/f16 scales and biases next to float32 activations.

    Our CPU kernels read them as stored (converting exactly); other paths cast
    them per call.
    """
    return _ext is not None and mx.default_device() == mx.cpu


def use_ext(mode: str) -> bool:
    """Whether `mode` runs on the extension here (CPU stream, extension built, mode not 'mlx')."""
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
    return _ext if use_ext(get_mode()) else None


def module() -> Any:
    """The extension module itself, or None when it did not import."""
    return _ext

