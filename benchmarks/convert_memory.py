"""Peak memory and wall time of `mlx-llama convert` vs `mlx_lm.convert`, 4-bit, same inputs.

Random-weight bf16 checkpoints of real Llama-3 shapes are written once under
benchmarks/work/ (gitignored).  Each conversion runs in a fresh subprocess that
reports its own peak RSS (ru_maxrss), so runs cannot inherit each other's peaks.

    python benchmarks/convert_memory.py                  # 1B and 3B shapes
    python benchmarks/convert_memory.py --with-8b        # adds the 16 GB 8B shape
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys
tool, src, out = sys.argv[1:4]
if tool == "mlx-llama":
    from mlx_llama.convert import convert
    convert(src, out, bits=4, group_size=64, log=lambda m: None)
else:
    import contextlib, io
    from mlx_lm import convert
    with contextlib.redirect_stdout(io.StringIO()):
        convert(src, out, quantize=True, q_bits=4, q_group_size=64)
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
"""

# Linux carries ru_maxrss across fork+exec (a child starts with its parent's peak), so read
# the high-water mark of the process's own address space instead.
PEAK_RSS = r"""
import resource
def peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except OSError:  # macOS: ru_maxrss is in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
"""


def ensure_checkpoint(work: Path, preset: str) -> Path:
    path = work / f"{preset}-bf16"
    if not (path / "generation_config.json").is_file():  # the last file written
        print(f"writing random {preset} checkpoint to {path} ...", flush=True)
        shutil.rmtree(path, ignore_errors=True)
        # In a subprocess, to keep this process small; with the real tokenizer (vocab
        # 128256), which mlx_lm.convert insists on.
        code = ("import sys; from mlx_llama.tools.random_checkpoint import make_config, write_checkpoint; "
                "write_checkpoint(sys.argv[1], make_config(sys.argv[2]), dtype='bfloat16', tokenizer=True)")
        subprocess.run([sys.executable, "-c", code, str(path), preset], check=True)
    return path


def run(tool: str, src: Path, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS + CHILD, tool, str(src), str(out)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed on {src.name}:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    result["out_gb"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e9
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="llama-3.2-1b,llama-3.2-3b")
    ap.add_argument("--with-8b", action="store_true", help="also the llama-3-8b shape (16 GB of bf16)")
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--skip-mlx-lm", action="store_true")
    args = ap.parse_args()
    presets = args.presets.split(",") + (["llama-3-8b"] if args.with_8b else [])
    args.work.mkdir(parents=True, exist_ok=True)

    rows = []
    for preset in presets:
        src = ensure_checkpoint(args.work, preset)
        src_gb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9
        ours = run("mlx-llama", src, args.work / "out-mlx-llama")
        print(f"{preset}: mlx-llama {ours}", flush=True)
        theirs = None if args.skip_mlx_lm else run("mlx-lm", src, args.work / "out-mlx-lm")
        if theirs:
            print(f"{preset}: mlx-lm    {theirs}", flush=True)
        rows.append((preset, src_gb, ours, theirs))

    print()
    print(f"{'shape':<14} {'bf16 in':>8} {'4-bit out':>9} | {'ours s':>7} {'ours RSS':>9} | "
          f"{'mlx-lm s':>8} {'mlx-lm RSS':>10} | {'RSS ratio':>9}")
    for preset, src_gb, ours, theirs in rows:
        line = (f"{preset:<14} {src_gb:>6.2f}GB {ours['out_gb']:>7.2f}GB | {ours['wall_s']:>7.1f} "
                f"{ours['peak_rss_mb']:>7.0f}MB |")
        if theirs:
            line += (f" {theirs['wall_s']:>8.1f} {theirs['peak_rss_mb']:>8.0f}MB | "
                     f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:>9.3f}")
        print(line)


if __name__ == "__main__":
    main()
