#!/usr/bin/env python3
"""Benchmark the CPU attention kernel (not a test): prefill chunks and decode rows, 1B shape.

Prints, per (query rows L, keys T) shape, the time of one layer's attention
(32 query heads, 8 KV heads, head_dim 64, causal for prefill chunks) for our
kernel (`mlx_llama.kernels.ops.attention`: the extension's AVX-512 kernel where
the CPU has it, else its AVX2 one) and for MLX's own CPU
`mx.fast.scaled_dot_product_attention`, measured in the same interleaved
rounds, with GFLOP/s (2 * 2 * heads * D per (query, visible key)) and the
ratio. The decode rows are B=8 sequences of T keys each in one
`attention_rows_update` call (each row writing its key and value into slot
T - 1 of its own buffers first), against 8 `mx.fast` calls.

    python benchmarks/attention.py [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics

import mlx.core as mx
import numpy as np

from kernel_gemv import cpu_extension, timeit
from mlx_llama.kernels import extension
from mlx_llama.kernels import ops as fused

H, HKV, D = 32, 8, 64
PREFILL = [(128, 128), (512, 512), (512, 2048), (2048, 2048)]
DECODE_T = [160, 1024, 4096]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    args = ap.parse_args()
    cpu_extension(args.threads)
    print(f"kernel: {extension.backend_name()}; {args.rounds} interleaved rounds")
    rng = np.random.default_rng(0)

    def randn(*shape: int) -> mx.array:
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    cases = []
    for L, T in PREFILL:
        q, k, v = randn(1, L, H, D), randn(1, HKV, T, D), randn(1, HKV, T, D)
        flops = 4 * H * D * sum(T - L + l + 1 for l in range(L))
        ours = lambda q=q, k=k, v=v: fused.attention(q, k, v, D**-0.5, "causal")
        peer = lambda q=q, k=k, v=v: mx.fast.scaled_dot_product_attention(
            q.transpose(0, 2, 1, 3), k, v, scale=D**-0.5, mask="causal")
        cases.append((f"prefill L={L} T={T}", flops, ours, peer, 1 if L * T > 2**20 else 3))
    for T in DECODE_T:
        q, k, v = randn(1, 8, H, D), randn(1, 8, HKV, D), randn(1, 8, HKV, D)
        keys, values = [randn(1, HKV, T, D) for _ in range(8)], [randn(1, HKV, T, D) for _ in range(8)]
        buffers = [b for pair in zip(keys, values) for b in pair]
        ours = lambda q=q, k=k, v=v, buffers=buffers, T=T: fused.attention_rows_update(
            q, k, v, buffers, [T - 1] * 8, [T] * 8, D**-0.5)
        peer = lambda q=q, keys=keys, values=values: [
            mx.fast.scaled_dot_product_attention(q[:, i : i + 1].transpose(0, 2, 1, 3), keys[i], values[i],
                                                 scale=D**-0.5) for i in range(8)]
        cases.append((f"decode B=8 T={T}", 4 * H * D * T * 8, ours, peer, 5))
    times: dict[str, dict[str, list[float]]] = {c[0]: {"ours": [], "mx.fast": []} for c in cases}
    for name, _, ours, peer, reps in cases:  # warm-up
        mx.eval(ours()), mx.eval(peer())
    for _ in range(args.rounds):
        for name, _, ours, peer, reps in cases:
            times[name]["ours"].append(timeit(ours, reps, warmup=0))
            times[name]["mx.fast"].append(timeit(peer, reps, warmup=0))
    print()
    print(f"{'one layer':<24}{'ours ms':>10}{'GFLOP/s':>10}{'mx.fast ms':>12}{'GFLOP/s':>10}{'ours faster':>13}")
    for name, flops, *_ in cases:
        o, p = (statistics.median(times[name][k]) for k in ("ours", "mx.fast"))
        print(f"{name:<24}{o * 1e3:>10.2f}{flops / o / 1e9:>10.1f}{p * 1e3:>12.2f}{flops / p / 1e9:>10.1f}"
              f"{p / o:>12.2f}x")


if __name__ == "__main__":
    main()
