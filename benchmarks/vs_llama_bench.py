"""Prefill (pp) and decode (tg) tok/s of `mlx-llama bench` vs llama.cpp's own `llama-bench`, in ONE run.

Same random weights on both sides: our 4/8-bit g64 MLX directories and the Q4_0/Q8_0 GGUFs that
benchmarks/batch_throughput.py (or throughput.py) wrote from the same checkpoint.  Rounds
interleave the peers (ours q4, llama.cpp Q4_0, ours q8, llama.cpp Q8_0, again), so drift in the
host's load hits both alike; the table gives medians and ours ÷ llama.cpp.  As llama-bench does, our
tg runs from an empty context (a 1-token prompt), separately from the pp prompt.

    python benchmarks/vs_llama_bench.py --work benchmarks/work/batch \\
        --llama-cpp-bin DIR_WITH_llama-bench -p 512 -n 32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

PAIRS = [("q4", "mlx-q4", "model-q4_0.gguf"), ("q8", "mlx-q8", "model-q8_0.gguf")]


def ours(model: Path, n_prompt: int, n_gen: int, reps: int) -> tuple[float, float]:
    """pp and tg as llama-bench measures them: tg from an empty context (a 1-token prompt), not after the
    pp prompt as `mlx-llama bench -p N -n M` does (at T = N its attention reads N cached positions a token)."""
    def bench(p: int, n: int) -> dict:
        out = subprocess.run([sys.executable, "-m", "mlx_llama", "bench", "-m", str(model), "-p", str(p),
                              "-n", str(n), "-r", str(reps), "--json"], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout)
        return result[0] if isinstance(result, list) else result

    return bench(n_prompt, 2)["pp_tps"]["mean"], bench(1, n_gen + 1)["tg_tps"]["mean"]


def llama_bench(binary: Path, gguf: Path, n_prompt: int, n_gen: int, reps: int, threads: int,
                poll: int) -> tuple[float, float]:
    out = subprocess.run([str(binary), "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps),
                          "-t", str(threads), "--poll", str(poll), "-o", "json"],
                         capture_output=True, text=True, check=True)
    tps = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in json.loads(out.stdout)}
    return tps["pp"], tps["tg"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder with mlx-q4/, mlx-q8/ and the GGUFs")
    ap.add_argument("--llama-cpp-bin", type=Path, default=None, help="folder holding llama-bench [default: PATH]")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-r", "--repetitions", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--poll", type=int, default=50, help="llama.cpp's --poll (its default 50)")
    args = ap.parse_args()
    found = shutil.which("llama-bench", path=str(args.llama_cpp_bin) if args.llama_cpp_bin else None)
    if found is None:
        print("llama-bench not found: pass --llama-cpp-bin", file=sys.stderr)
        return 2
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for rnd in range(args.rounds):
        for bits, mlx_dir, gguf in PAIRS:
            runs.setdefault((bits, "ours"), []).append(
                ours(args.work / mlx_dir, args.n_prompt, args.n_gen, args.repetitions))
            runs.setdefault((bits, "llama.cpp"), []).append(
                llama_bench(Path(found), args.work / gguf, args.n_prompt, args.n_gen, args.repetitions,
                            args.threads, args.poll))
            print(f"round {rnd + 1} {bits}: ours {runs[bits, 'ours'][-1]}, llama.cpp {runs[bits, 'llama.cpp'][-1]}",
                  file=sys.stderr, flush=True)
    print(f"| weights | ours pp{args.n_prompt} | llama.cpp pp{args.n_prompt} | ratio | ours tg{args.n_gen} "
          f"| llama.cpp tg{args.n_gen} | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for bits, _, gguf in PAIRS:
        o = [statistics.median(x) for x in zip(*runs[bits, "ours"])]
        c = [statistics.median(x) for x in zip(*runs[bits, "llama.cpp"])]
        print(f"| {bits} g64 vs {gguf.split('-')[1].split('.')[0].upper()} | {o[0]:.1f} | {c[0]:.1f} | "
              f"{o[0] / c[0]:.2f}× | {o[1]:.1f} | {c[1]:.1f} | {o[1] / c[1]:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
