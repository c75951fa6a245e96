"""Benchmark the CPU quantized-matmul kernels (not a test).

Prints, in one run:
* the machine's read bandwidth: NumPy sum over a 1 GiB array split across threads,
  and the extension's own AVX2 read loop over the same array;
* GEMV (M=1) time and GB/s (bytes of weights + scales + biases per call) for 4-
  and 8-bit weights, group size 64, on 8192x2048 and 128256x2048 matrices (ours
  cycles through copies of at least 256 MB in all, so weights come from memory):
  our int8-activation kernel (q8), for 8-bit weights our int16-activation
  kernel (q16, the default there), both also on weights in the panel layout
  the loader gives the AVX-512 kernels ("panels"), our float32 kernel (exact) and
  mx.quantized_matmul; ratio to the read bandwidth and speed-up over MLX. The
  host's bandwidth drifts (other tenants share its memory), so each kernel is
  timed in interleaved rounds, each right after a read-loop measurement, and
  "% of bw" is the median over rounds of its GB/s over that round's read loop;
* prefill (M=512, 8192x2048) GFLOP/s: our kernels vs dequantize + mx.matmul
  (whatever BLAS mx.matmul runs on: mlx_llama routes it to OpenBLAS when
  scipy-openblas32 is installed).

    python benchmarks/kernel_gemv.py [--quick] [--threads N] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Any

import numpy as np

import mlx.core as mx
import mlx_llama  # noqa: F401  (binds OpenBLAS under mx.matmul when available)
from mlx_llama.kernels import extension
from mlx_llama.kernels.qmatmul import to_panels


STREAM_BYTES = 256 * 2**20  # GEMV weights per timed call: well past the last-level cache


def timeit(fn, reps: int, warmup: int = 1) -> float:
    """Best wall time of `reps` evaluated calls (seconds)."""
    for _ in range(warmup):
        mx.eval(fn())
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t)
    return best


def numpy_read_bw(a: np.ndarray, threads: int, reps: int = 5) -> float:
    parts = np.array_split(a, threads)
    best = float("inf")
    for _ in range(reps):
        ts = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def ext_read_bw(ext, a: mx.array, reps: int = 5) -> float:
    ext.read_probe(a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        ext.read_probe(a)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def cpu_extension(threads: int | None) -> Any:
    """The extension module on MLX's CPU device, with `threads` kernel threads (None: its default);
    exits with a one-line message when it is not built."""
    mx.set_default_device(mx.cpu)
    ext = extension._ext
    if ext is None:
        raise SystemExit(f"extension not available: {extension.backend_name()}")
    if threads:
        ext.set_num_threads(threads)
    return ext


# Our kernels per bit width (q16 is for 8-bit weights only).
MODES = {4: ("q8", "exact"), 8: ("q16", "q8", "exact")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, skip the 128256-row matrix for MLX")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved GEMV rounds (default 5, --quick 3)")
    args = ap.parse_args()
    ext = cpu_extension(args.threads)
    nthreads = ext.num_threads()
    print(f"kernel: {extension.backend_name()}")
    try:
        load = os.getloadavg()
        print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    except OSError:
        pass

    # ---- read bandwidth
    a_np = np.ones(2**28, dtype=np.float32)  # 1 GiB
    bw_np = numpy_read_bw(a_np, nthreads)
    del a_np
    a_mx = mx.ones((2**28,), dtype=mx.float32)  # kept: every round re-measures the read loop
    mx.eval(a_mx)
    bw_ext = ext_read_bw(ext, a_mx)
    print(f"read bandwidth, {nthreads} threads: numpy sum {bw_np:.1f} GB/s, AVX2 read loop {bw_ext:.1f} GB/s")

    reps = 5 if args.quick else 20
    rounds = args.rounds or (3 if args.quick else 5)
    print(f"GEMV: {rounds} interleaved rounds; % of bw: median over rounds of GB/s / the round's read loop")
    print()
    print(f"{'GEMV M=1':<28}{'kernel':<22}{'time ms':>9}{'GB/s':>8}{'% of bw':>9}{'vs mx':>8}")
    for N, K in ((8192, 2048), (128256, 2048)):
        W = (mx.random.normal((N, K)) * 0.02).astype(mx.float32)
        mx.eval(W)
        for bits in (4, 8):
            w, s, b = mx.quantize(W, group_size=64, bits=bits)
            mx.eval(w, s, b)
            nbytes = w.nbytes + s.nbytes + b.nbytes
            x = mx.random.normal((1, K))
            mx.eval(x)
            big = N > 10000
            t_mx = timeit(
                lambda: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=bits),
                1 if big else (2 if args.quick else 3),
            )
            # Distinct copies, used in turn, so the weights stream from memory as in a model
            # (one 8192x2048 matrix fits this CPU's last-level cache).
            copies = [(w, s, b)] + [(w + 0, s + 0, b + 0) for _ in range(-(-STREAM_BYTES // nbytes) - 1)]
            mx.eval(copies)
            # The layout the loader gives the AVX-512 kernels (mlx_llama/model/panel_weights.py).
            panels = [tuple(map(to_panels, c)) for c in copies] if ext.panel_kernels() else []
            mx.eval(panels)
            kernels = []
            for mode in MODES[bits]:
                kernels.append((f"ours ({mode})", copies, mode))
                if panels and mode != "exact":
                    kernels.append((f"ours ({mode}, panels)", panels, mode))
            times: dict[str, list[float]] = {name: [] for name, _, _ in kernels}
            ratios: dict[str, list[float]] = {name: [] for name, _, _ in kernels}
            for _ in range(rounds):
                for name, weights, mode in kernels:
                    bw_round = ext_read_bw(ext, a_mx, reps=2)
                    t = timeit(
                        lambda: [ext.quantized_matmul(x, *c, group_size=64, bits=bits, mode=mode) for c in weights],
                        reps,
                    ) / len(weights)
                    times[name].append(t)
                    ratios[name].append(nbytes / t / 1e9 / bw_round)
            del copies, panels
            print(f"{f'{N}x{K} {bits}-bit':<28}{'mx.quantized_matmul':<22}{t_mx * 1e3:>9.3f}"
                  f"{nbytes / t_mx / 1e9:>8.1f}{'':>9}{1.0:>7.1f}x")
            for name, _, _ in kernels:
                t = min(times[name])
                print(
                    f"{f'{N}x{K} {bits}-bit':<28}{name:<22}{t * 1e3:>9.3f}{nbytes / t / 1e9:>8.1f}"
                    f"{100 * statistics.median(ratios[name]):>8.0f}%{t_mx / t:>7.1f}x"
                )
        del W
    del a_mx

    print()
    M, N, K = 512, 8192, 2048
    flops = 2 * M * N * K
    print(f"{'prefill M=512, 8192x2048':<28}{'kernel':<30}{'time ms':>9}{'GFLOP/s':>9}")
    W = mx.random.normal((N, K)) * 0.02
    x = mx.random.normal((M, K))
    mx.eval(W, x)
    for bits in (4, 8):
        w, s, b = mx.quantize(W, group_size=64, bits=bits)
        mx.eval(w, s, b)
        rows = []
        for mode in MODES[bits]:
            r = 1 if mode == "exact" else 3
            rows.append((f"ours ({mode})", timeit(lambda: ext.quantized_matmul(x, w, s, b, group_size=64, bits=bits, mode=mode), r)))
        rows.append(("ours dequantize + mx.matmul", timeit(lambda: x @ ext.dequantize(w, s, b, group_size=64, bits=bits).T, 3)))
        rows.append(("mx.dequantize + mx.matmul", timeit(lambda: x @ mx.dequantize(w, s, b, group_size=64, bits=bits).T, 3)))
        wf = mx.dequantize(w, s, b, group_size=64, bits=bits)
        mx.eval(wf)
        rows.append(("mx.matmul only (float W)", timeit(lambda: x @ wf.T, 3)))
        if not args.quick:
            rows.append(("mx.quantized_matmul", timeit(lambda: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=bits), 1, 0)))
        for name, t in rows:
            print(f"{f'{bits}-bit':<28}{name:<30}{t * 1e3:>9.1f}{flops / t / 1e9:>9.1f}")


if __name__ == "__main__":
    main()
