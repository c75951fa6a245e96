#!/usr/bin/env python3
"""Pipeline parallelism on 2 local ranks (`mlx.launch -n 2 --backend ring`) against one process, in ONE run.

Both run `mlx-llama generate --prompt-ids … -v` on the same random-weight 4-bit
checkpoint and prompt, in interleaved rounds (single, pipeline, single, …), and
report prefill and decode tok/s, each process's peak RSS (target: each rank
≤ 0.6× the single process) and the pipeline's per-token time in communication.
Ranks on one host size their thread pools to their share of its cores;
`--all-cores` adds a third peer to each round, the pipeline with every core per
rank ($MLX_LLAMA_NUM_THREADS set), to measure what the sharing buys.
`--batch N` adds batch mode (`generate --prompts-file`, N prompts decoded together
on the batched engine) in one process and on the pipeline: aggregate tok/s and,
per rank, the share of the decode time it computed (the rest: waiting for the
other rank, at step boundaries too); the pipeline runs with its micro-batches
(default: prompt chunks cut), without (0) and with the N-row decode steps cut too
($MLX_LLAMA_PIPELINE_MICRO_TOKENS=4).
Per rank it also prints the bytes of tensors read, the RSS once loaded and the peak.

    python benchmarks/pipeline.py                          # llama-3.2-1b 4-bit, p128 g32, 2 rounds
    python benchmarks/pipeline.py --preset llama-3.2-3b --rounds 3 --all-cores --batch 8

Both ranks share this machine's cores, and a single stream keeps one rank busy
at a time, so the pipeline can only lose speed here: what it buys is memory.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import log, prepare_hf, prepare_mlx  # noqa: E402  (the checkpoint recipe, shared)

BIN = Path(sys.executable).parent
_STATS = re.compile(r"prompt: (\d+) tokens, ([\d.]+) tok/s \| generation: (\d+) tokens, ([\d.]+) tok/s")
_BATCH = re.compile(r"(\d+) tokens in ([\d.]+) s \(([\d.]+) tok/s\)")
_RANK = re.compile(r"rank (\d+) \(.*?\): layers (\d+)-(\d+) \(\d+ tensors, ([\d.]+) MB read.*?peak RSS ([\d.]+) GB "
                   r"\(([\d.]+) GB once loaded\).*?per token: compute ([\d.]+) ms, send ([\d.]+) ms, "
                   r"waiting for peers ([\d.]+) ms, between steps ([\d.]+) ms")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _speeds(stderr: str) -> dict[str, float]:
    m = _STATS.search(stderr)
    if not m:
        raise SystemExit(f"no statistics in the output:\n{stderr}")
    return {"prefill_tps": float(m.group(2)), "decode_tps": float(m.group(4)), "generated": int(m.group(3))}


def run_single(generate: list[str]) -> dict[str, Any]:
    proc = subprocess.Popen([str(BIN / "mlx-llama"), *generate], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"single process failed:\n{stderr}")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {**_speeds(stderr), "peak_rss_gb": [rss / 1e9]}


def _ranks(stderr: str) -> list[dict[str, Any]]:
    """Each rank's `-v` line: its layers, memory and per-token time; `busy`: the share of its decode
    time it computed (rank 0's work between steps, sampling, counts as busy; the others idle then)."""
    ranks = sorted((int(m.group(1)), m) for m in _RANK.finditer(stderr))
    if len(ranks) != 2:
        raise SystemExit(f"no per-rank statistics in the output:\n{stderr}")
    per_rank = []
    for rank, m in ranks:
        compute, send, wait, between = (float(m.group(i)) for i in range(7, 11))
        busy = compute + (between if rank == 0 else 0.0)
        per_rank.append({"layers": f"{m.group(2)}-{m.group(3)}", "tensors_gb": float(m.group(4)) / 1e3,
                         "peak_rss_gb": float(m.group(5)), "loaded_rss_gb": float(m.group(6)),
                         "compute_ms": compute, "send_ms": send, "wait_ms": wait, "between_ms": between,
                         "busy": busy / max(compute + send + wait + between, 1e-9)})
    return per_rank


def _launch(port: int) -> list[str]:
    return [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "--starting-port", str(port), "--"]


def run_pipeline(generate: list[str], threads: int | None = None) -> dict[str, Any]:
    """Two local ranks; `threads`: each rank's thread pools (None: the ranks' share of the cores)."""
    cmd = [*_launch(_free_port()), str(BIN / "mlx-llama"), *generate, "--pipeline"]
    env = {**os.environ, "MLX_LLAMA_NUM_THREADS": str(threads)} if threads else None
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{run.stderr}")
    per_rank = _ranks(run.stderr)
    # Rank 0 waits for the logits while rank 1 computes: what it waits beyond that is the two hops.
    hop_ms = per_rank[0]["wait_ms"] - per_rank[1]["compute_ms"]
    return {**_speeds(run.stderr), "peak_rss_gb": [r["peak_rss_gb"] for r in per_rank], "ranks": per_rank,
            "comm_ms_per_token": hop_ms + per_rank[0]["send_ms"] + per_rank[1]["send_ms"]}


def run_batch(generate: list[str], pipeline: bool, micro_tokens: int | None = None) -> dict[str, Any]:
    """Batch mode (`generate` given --prompts-file), in one process or on two local ranks: aggregate tok/s
    (and on the pipeline each rank's figures).  `micro_tokens`: $MLX_LLAMA_PIPELINE_MICRO_TOKENS for the
    pipeline (None: its default)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*(_launch(_free_port()) if pipeline else []), str(BIN / "mlx-llama"), *generate, "-o", f"{tmp}/out.json",
               *(["--pipeline", "-v"] if pipeline else [])]
        env = None if micro_tokens is None else {**os.environ, "MLX_LLAMA_PIPELINE_MICRO_TOKENS": str(micro_tokens)}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    m = _BATCH.search(run.stderr)
    if run.returncode != 0 or not m:
        raise SystemExit(f"batch mode failed:\n{run.stderr}")
    return {"batch_tps": float(m.group(3)), "batch_tokens": int(m.group(1)),
            **({"ranks": _ranks(run.stderr)} if pipeline else {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="Checkpoint directory [benchmarks/work/<preset>].")
    ap.add_argument("--all-cores", action="store_true",
                    help="Also run the pipeline with every core per rank (no sharing of the host's cores).")
    ap.add_argument("--batch", type=int, default=0, metavar="N",
                    help="Also run batch mode with N prompts decoded together, in one process and on the pipeline.")
    args = ap.parse_args(argv)
    work = args.work or HERE / "work" / args.preset
    work.mkdir(parents=True, exist_ok=True)
    model = prepare_mlx(prepare_hf(work, args.preset), work, args.bits)
    ids = np.random.default_rng(0).integers(0, 128000, args.prompt_tokens)
    generate = ["generate", "-m", str(model), "--prompt-ids", ",".join(map(str, ids)), "-n", str(args.gen_tokens),
                "--temp", "0", "-v"]
    cores = len(os.sched_getaffinity(0))
    peers = {"single": run_single, "pipeline": run_pipeline}
    if args.all_cores:
        peers["all-cores"] = lambda g: run_pipeline(g, threads=cores)
    if args.batch:
        prompts = work / f"prompts-{args.batch}.txt"
        # About --prompt-tokens tokens each (one per repeated word), so that prefill weighs as in the single runs.
        prompts.write_text("".join(f"Prompt {i}:" + " story" * args.prompt_tokens + "\n" for i in range(args.batch)))
        batch = ["generate", "-m", str(model), "--prompts-file", str(prompts), "-n", str(args.gen_tokens),
                 "--batch-size", str(args.batch), "--temp", "0"]
        peers["batch single"] = lambda g: run_batch(batch, pipeline=False)
        peers["batch pipeline"] = lambda g: run_batch(batch, pipeline=True)
        peers["batch no micro"] = lambda g: run_batch(batch, pipeline=True, micro_tokens=0)
        peers["batch micro 4"] = lambda g: run_batch(batch, pipeline=True, micro_tokens=4)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in peers}
    for r in range(args.rounds):
        for name, run in peers.items():
            log(f"round {r + 1}/{args.rounds}: {name}")
            results[name].append(run(generate))

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    def rss(name: str) -> list[float]:
        return [statistics.median(x["peak_rss_gb"][i] for x in results[name])
                for i in range(len(results[name][0]["peak_rss_gb"]))]

    def rank_med(name: str, rank: int, key: str) -> float:
        return statistics.median(x["ranks"][rank][key] for x in results[name])

    def describe_ranks(name: str) -> str:
        return "; ".join(
            f"rank {i} busy {100 * rank_med(name, i, 'busy'):.0f}% (per token: compute "
            f"{rank_med(name, i, 'compute_ms'):.2f}, send {rank_med(name, i, 'send_ms'):.2f}, waiting "
            f"{rank_med(name, i, 'wait_ms'):.2f}, between steps {rank_med(name, i, 'between_ms'):.2f} ms)"
            for i in range(2))

    single_rss = rss("single")[0]
    print(f"{args.preset} {args.bits}-bit, prompt {args.prompt_tokens}, generate {args.gen_tokens}, "
          f"{args.rounds} interleaved rounds (medians)")
    print(f"{'':10} {'prefill tok/s':>14} {'decode tok/s':>13}  peak RSS GB")
    for name in (n for n in results if not n.startswith("batch")):
        print(f"{name:10} {med(name, 'prefill_tps'):14.2f} {med(name, 'decode_tps'):13.2f}  "
              + " / ".join(f"{x:.3f}" for x in rss(name)))
    print(f"pipeline / single: prefill {med('pipeline', 'prefill_tps') / med('single', 'prefill_tps'):.2f}x, "
          f"decode {med('pipeline', 'decode_tps') / med('single', 'decode_tps'):.2f}x, "
          "peak RSS per rank " + " / ".join(f"{x / single_rss:.2f}x" for x in rss("pipeline")) + " (target ≤ 0.60x)")
    for i, r in enumerate(results["pipeline"][-1]["ranks"]):
        print(f"  rank {i}, layers {r['layers']}: tensors read {rank_med('pipeline', i, 'tensors_gb'):.3f} GB, "
              f"RSS once loaded {rank_med('pipeline', i, 'loaded_rss_gb'):.3f} GB, "
              f"peak {rank_med('pipeline', i, 'peak_rss_gb'):.3f} GB")
    if args.batch:
        single, piped = med("batch single", "batch_tps"), med("batch pipeline", "batch_tps")
        print(f"batch mode, {args.batch} prompts of ~{args.prompt_tokens} tokens, {args.gen_tokens} generated: "
              f"single {single:.2f} tok/s, pipeline {piped:.2f} tok/s ({piped / single:.2f}x); pipeline without "
              f"micro-batches {med('batch no micro', 'batch_tps'):.2f} tok/s, with {args.batch}-row steps cut too "
              f"{med('batch micro 4', 'batch_tps'):.2f} tok/s")
        for name in ("batch pipeline", "batch no micro", "batch micro 4"):
            print(f"  {name}, decode steps: {describe_ranks(name)}")
    if args.all_cores:
        print(f"pipeline with {cores // 2} / {cores} threads per rank: prefill "
              f"{med('pipeline', 'prefill_tps') / med('all-cores', 'prefill_tps'):.2f}x, "
              f"decode {med('pipeline', 'decode_tps') / med('all-cores', 'decode_tps'):.2f}x")
    print(f"communication per token (two hops + sends): {med('pipeline', 'comm_ms_per_token'):.2f} ms; "
          "layers per rank: " + ", ".join(r["layers"] for r in results["pipeline"][-1]["ranks"]))
    print(f"  single stream: {describe_ranks('pipeline')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
