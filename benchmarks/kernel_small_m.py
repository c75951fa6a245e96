"""Benchmark the CPU quantized matmul at small M (batched decode: M = batch size), not a test.

The batched engine decodes B sequences per step as one matmul with M = B rows
of x. A GEMV is memory-bound, so for small M the weights should stream from
memory once per call and every further row should cost only its arithmetic:
this prints, per matrix shape and bit width (group size 64, bfloat16 scales
as the converter writes them), the time per call and per row of x for each M,
and the ratio to M=1 measured in the same interleaved rounds (each round times
every M once, so load from other processes hits all of them alike).

Weights come from memory as in a model: each timed call cycles through copies
of at least 256 MB in all (a 16384x2048 4-bit matrix fits this CPU's L3).

    python benchmarks/kernel_small_m.py [--rounds N] [--threads N] [--mode auto|q8|q16|exact]
        [--shapes 2048x2048,16384x2048,2048x8192,128256x2048] [--bits 4,8] [--m 1,2,4,8,16]
        [--layout panels,rows]

`--layout`: the weights in the panel layout the loader gives the AVX-512
kernels (mlx_llama/model/panel_weights.py), in MLX's row layout, or both
(interleaved in the same rounds; the ratio rows ÷ panels is printed).

`--ext PATH` times another build of the extension instead (e.g. a copy of
the previous `_qmm_ext*.so`): for before/after ratios, alternate runs of the
two builds (two builds in one process would run two thread pools whose idle
workers spin against each other).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics
import time
from types import ModuleType

import mlx.core as mx

from mlx_llama.kernels import extension
from mlx_llama.kernels.qmatmul import to_panels

STREAM_BYTES = 256 * 2**20


def load_build(path: str) -> ModuleType:
    """Import the extension built at `path` (its init symbol is still PyInit__qmm_ext)."""
    loader = importlib.machinery.ExtensionFileLoader("other_build._qmm_ext", path)
    spec = importlib.util.spec_from_file_location("other_build._qmm_ext", path, loader=loader)
    if spec is None:
        raise SystemExit(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def parse_shape(s: str) -> tuple[int, int]:
    n, k = s.lower().split("x")
    return int(n), int(k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the median is reported)")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    ap.add_argument("--mode", default="auto", help="kernel mode: auto (q8 for 2/4-bit, q16 for 8-bit), q8, q16, exact")
    ap.add_argument("--shapes", default="2048x2048,16384x2048,2048x8192,128256x2048", help="NxK list")
    ap.add_argument("--bits", default="4,8", help="bit widths")
    ap.add_argument("--m", default="1,2,4,8,16", help="rows of x")
    ap.add_argument("--ext", default=None, help="time this build of _qmm_ext instead of the installed one")
    ap.add_argument("--layout", default="panels,rows", help="weight layouts: panels (as loaded), rows (MLX's), or both")
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)

    ext = load_build(args.ext) if args.ext else extension.module()
    if ext is None:
        raise SystemExit(f"extension not available: {extension.backend_name()}")
    if args.threads:
        ext.set_num_threads(args.threads)
    ms = [int(v) for v in args.m.split(",")]
    layouts = [v.strip() for v in args.layout.split(",")]
    if "panels" in layouts and not ext.panel_kernels():
        print("no AVX-512 VNNI panel kernels here: rows layout only")
        layouts = ["rows"]
    build = args.ext or "installed"
    print(f"build: {build}, threads {ext.num_threads()}, mode {args.mode}, rounds {args.rounds}")
    print(f"{'shape':<30}" + "".join(f"{f'M={m} ms':>11}" for m in ms) + "".join(
        f"{f'{m}/1':>7}" for m in ms[1:]) + f"{'ms/row M=' + str(ms[-1]):>14}")
    for shape in args.shapes.split(","):
        N, K = parse_shape(shape)
        W = (mx.random.normal((N, K)) * 0.02).astype(mx.float32)
        mx.eval(W)
        for bits in (int(b) for b in args.bits.split(",")):
            mode = args.mode if args.mode != "auto" else ("q16" if bits == 8 else "q8")
            w, s, b = mx.quantize(W, group_size=64, bits=bits)
            s, b = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
            mx.eval(w, s, b)
            nbytes = w.nbytes + s.nbytes + b.nbytes
            rows = [(w, s, b)] + [(w + 0, s + 0, b + 0) for _ in range(-(-STREAM_BYTES // nbytes) - 1)]
            copies = {"rows": rows, "panels": [tuple(map(to_panels, c)) for c in rows]}
            copies = {k: copies[k] for k in layouts}
            mx.eval(list(copies.values()))
            xs = {m: mx.random.normal((m, K)) for m in ms}
            mx.eval(list(xs.values()))
            times: dict[tuple[str, int], list[float]] = {(k, m): [] for k in layouts for m in ms}
            for r in range(args.rounds + 1):  # round 0 warms up
                for k in layouts if r % 2 else layouts[::-1]:
                    for m in ms:
                        t = time.perf_counter()
                        mx.eval([ext.quantized_matmul(xs[m], *c, group_size=64, bits=bits, mode=mode)
                                 for c in copies[k]])
                        if r:
                            times[k, m].append((time.perf_counter() - t) / len(copies[k]))
            med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
            for k in layouts:
                print(
                    f"{f'{N}x{K} {bits}-bit {k}':<30}"
                    + "".join(f"{med[k, m]:>11.3f}" for m in ms)
                    + "".join(f"{med[k, m] / med[k, ms[0]]:>7.2f}" for m in ms[1:])
                    + f"{med[k, ms[-1]] / ms[-1]:>14.3f}"
                )
            if len(layouts) == 2:
                print(f"{'  rows / panels':<30}" + "".join(f"{med['rows', m] / med['panels', m]:>11.2f}" for m in ms))
            del copies, rows
        del W


if __name__ == "__main__":
    main()
