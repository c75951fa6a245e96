#!/usr/bin/env python3
"""Batched decode throughput of the engine vs llama.cpp's llama-batched-bench, in ONE run.

For B = 1, 2, 4, 8, 16 sequences of `-p` random prompt tokens each generating
`-g` tokens: aggregate decode tok/s (B × tokens per step ÷ time of the steps in
which every sequence decodes), per-sequence tok/s, prefill tok/s and peak
memory, for the 4-bit and 8-bit MLX weights of one random checkpoint and for
llama.cpp on the same weights as GGUF Q4_0 / Q8_0 (written by
benchmarks/throughput.py's code).  Rounds interleave the peers, so a busy
machine slows both alike; figures are medians over rounds.  Also measured for
B = 8: the worst inter-token gap of running streams while a new prompt is
prefilled in chunks, vs a plain decode step.

    python benchmarks/batch_throughput.py                       # llama-3.2-1b, p128 g32, 2 rounds
    python benchmarks/batch_throughput.py -p 32 -g 16 --rounds 1 --batch-sizes 1,4,8
    python benchmarks/batch_throughput.py --peers mlx-llama,llamacpp,mlx-lm
    python benchmarks/batch_throughput.py --peers mlx-llama,mlx-llama-per-sequence,llamacpp

Peer `mlx-llama-per-sequence` is our engine with one RoPE and one attention
call per sequence (the path without the extension's row ops), for a paired
A/B of the batched row ops in the same rounds.

llama.cpp's tools are looked up in --llama-cpp-bin, then $LLAMA_CPP_BIN, then PATH.
Writes benchmarks/results/batch-throughput-<preset>.{json,md}; weights go to benchmarks/work/batch/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput  # noqa: E402  (the checkpoint / MLX / GGUF preparation, reused)

log = throughput.log


# --------------------------------------------------------------------------- our engine (a subprocess)


def engine_worker(spec: dict[str, Any]) -> None:
    from engine_profile import PATHS, attention_path

    with attention_path(PATHS[spec["attention"]]):
        _engine_batches(spec)


def _engine_batches(spec: dict[str, Any]) -> None:
    import resource

    import mlx.core as mx
    import numpy as np

    from mlx_llama.generation.engine import Engine, EngineConfig
    from mlx_llama.generation.requests import GenerationRequest
    from mlx_llama.loader import load_model

    model = load_model(spec["weights"])
    rng = np.random.default_rng(spec["seed"])
    n_prompt, n_gen, chunk = spec["n_prompt"], spec["n_gen"], spec["chunk"]
    out: dict[str, Any] = {"batches": {}}
    for B in spec["batch_sizes"]:
        mx.reset_peak_memory()
        engine = Engine(model, EngineConfig(max_batch=B, prefill_chunk=chunk, prefill_tokens_per_step=chunk * B,
                                            gap_target_ms=None))  # prefill at full speed: nobody waits
        for _ in range(B):
            engine.submit(GenerationRequest(list(map(int, rng.integers(0, 128000, n_prompt))), n_gen))
        t0 = time.perf_counter()
        produced = 0
        while produced < B:  # prefill: until every sequence has its first token
            produced += sum(e.token is not None for e in engine.step())
        t1 = time.perf_counter()
        steps = []
        while engine.has_work:
            s = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - s)
        t2 = time.perf_counter()
        out["batches"][str(B)] = dict(
            prefill_tps=B * n_prompt / (t1 - t0), decode_tps=B * len(steps) / (t2 - t1),
            per_seq_tps=len(steps) / (t2 - t1), step_ms=1e3 * statistics.median(steps),
            peak_mem_gb=mx.get_peak_memory() / 1e9,
        )
        log(f"  {spec['name']} B={B}: {out['batches'][str(B)]}")
    if spec["gap_batch"]:
        out["gap"] = _join_gap(model, spec, rng)
    out["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps(out))


def _join_gap(model: Any, spec: dict[str, Any], rng: Any) -> dict[str, float]:
    """Step times of B-1 decoding streams, alone and while one `gap_prompt`-token prompt joins
    (the engine's default prefill policy), and that prompt's time to its first token."""
    from mlx_llama.generation.engine import Engine, EngineConfig
    from mlx_llama.generation.requests import GenerationRequest

    B, chunk = spec["gap_batch"], spec["chunk"]
    engine = Engine(model, EngineConfig(max_batch=B, prefill_chunk=chunk))
    ids = lambda n: list(map(int, rng.integers(0, 128000, n)))  # noqa: E731
    for _ in range(B - 1):
        engine.submit(GenerationRequest(ids(16), 64))
    while engine.running < B - 1 or any(s.prefilling for s in engine._running):
        engine.step()

    def timed(n: int) -> list[float]:
        times = []
        for _ in range(n):
            s = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - s)
        return times

    plain = timed(4)
    joining, first = [], None
    rid = engine.submit(GenerationRequest(ids(spec["gap_prompt"]), 1))
    t0 = time.perf_counter()
    while first is None:
        s = time.perf_counter()
        events = engine.step()
        joining.append(time.perf_counter() - s)
        if any(e.request_id == rid and e.token is not None for e in events):
            first = time.perf_counter() - t0
    return dict(decode_step_ms=1e3 * statistics.median(plain), worst_gap_ms=1e3 * max(joining),
                ttft_ms=1e3 * first, join_steps=len(joining), chunk=chunk, prompt=spec["gap_prompt"],
                streams=B - 1)


def run_engine(name: str, weights: Path, args: argparse.Namespace, gap: bool,
               attention: str = "batched row ops") -> dict[str, Any]:
    spec = dict(name=name, weights=str(weights), attention=attention, n_prompt=args.n_prompt, n_gen=args.n_gen,
                seed=args.seed,
                batch_sizes=args.batch_sizes, chunk=args.chunk, gap_batch=8 if gap else 0,
                gap_prompt=args.gap_prompt or 2 * args.chunk)
    r = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    sys.stderr.write(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- llama.cpp


def find_llama_cpp(option: str | None) -> Path | None:
    for d in (option, os.environ.get("LLAMA_CPP_BIN")):
        if d and (Path(d) / "llama-batched-bench").exists():
            return Path(d)
    found = shutil.which("llama-batched-bench")
    return Path(found).parent if found else None


def gguf(hf: Path, work: Path, kind: str, bin_dir: Path, threads: int) -> Path:
    """GGUF `kind` (q4_0, q8_0): throughput.py's F16 GGUF, quantized by the llama-quantize tool
    (throughput.py quantizes through llama-cpp-python, which the tool's folder does not need)."""
    out = work / f"model-{kind}.gguf"
    if not out.exists():
        f16 = throughput.prepare_gguf_f16(hf, work)
        log(f"quantizing → {out.name}")
        subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(out), kind.upper(), str(threads)],
                       check=True, capture_output=True, env=_lib_env(bin_dir))
    return out


def _lib_env(bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{bin_dir}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


def run_llama_cpp(model: Path, bin_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    ctx = max(args.batch_sizes) * (args.n_prompt + args.n_gen) + 64
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c", str(ctx), "-b", "2048", "-ub", "512",
           "-npp", str(args.n_prompt), "-ntg", str(args.n_gen), "-npl", ",".join(map(str, args.batch_sizes)),
           "-t", str(args.threads), "--output-format", "jsonl"]
    if args.llama_cpp_poll is not None:
        cmd += ["--poll", str(args.llama_cpp_poll)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_lib_env(bin_dir))
    if r.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed:\n{r.stderr[-3000:]}")
    batches = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            B = int(d["pl"])
            batches[str(B)] = dict(prefill_tps=d["speed_pp"], decode_tps=d["speed_tg"],
                                   per_seq_tps=d["speed_tg"] / B)
    mem = re.findall(r"CPU KV buffer size =\s*([\d.]+) MiB", r.stderr)
    return {"batches": batches, "kv_mib": float(mem[0]) if mem else None}


# --------------------------------------------------------------------------- mlx-lm (optional)


def mlx_lm_worker(spec: dict[str, Any]) -> None:
    from mlx_llama.kernels import blas

    blas.install()  # OpenBLAS under MLX's CPU matmuls, before MLX loads (as throughput.py runs mlx-lm)
    import mlx.core as mx
    import numpy as np
    from mlx_lm import batch_generate, load

    model, tokenizer = load(spec["weights"])
    model.set_dtype(mx.float32)  # its best CPU setting: float32 compute
    rng = np.random.default_rng(spec["seed"])
    out: dict[str, Any] = {"batches": {}}
    for B in spec["batch_sizes"]:
        prompts = [list(map(int, rng.integers(0, 128000, spec["n_prompt"]))) for _ in range(B)]
        r = batch_generate(model, tokenizer, prompts, max_tokens=spec["n_gen"], prefill_batch_size=B,
                           completion_batch_size=B)
        s = r.stats
        out["batches"][str(B)] = dict(prefill_tps=s.prompt_tps, decode_tps=s.generation_tps,
                                      per_seq_tps=s.generation_tps / B, peak_mem_gb=s.peak_memory)
        log(f"  mlx-lm B={B}: {out['batches'][str(B)]}")
    print(json.dumps(out))


def run_mlx_lm(weights: Path, args: argparse.Namespace) -> dict[str, Any]:
    spec = dict(weights=str(weights), n_prompt=args.n_prompt, n_gen=args.n_gen, seed=args.seed,
                batch_sizes=args.batch_sizes)
    env = dict(os.environ, MLX_LLAMA_BLAS="openblas")
    r = subprocess.run([sys.executable, __file__, "--_mlx_lm_worker", json.dumps(spec)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"mlx-lm failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"batches": {}}
    for B in runs[0]["batches"]:
        keys = runs[0]["batches"][B]
        out["batches"][B] = {k: statistics.median(r["batches"][B][k] for r in runs) for k in keys
                             if all(isinstance(r["batches"][B][k], (int, float)) for r in runs)}
    for extra in ("gap", "max_rss_gb", "kv_mib"):  # measured in some rounds only: the latest one
        found = [r[extra] for r in runs if extra in r]
        if found:
            out[extra] = found[-1]
    out["rounds"] = len(runs)
    return out


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [f"# Batched decode, {a['preset']} random weights, p{a['n_prompt']} g{a['n_gen']}, "
             f"{a['threads']} threads, {result['rounds']} interleaved round(s)", "",
             f"Command: `{result['command']}`", "", f"Machine: {result['machine']}", "",
             f"llama.cpp --poll: {a['llama_cpp_poll'] if a['llama_cpp_poll'] is not None else 'its default (50)'}", ""]
    for bits in a["bits"]:
        ours = result["peers"].get(f"mlx-llama-q{bits}")
        if not ours:
            continue
        lcpp = result["peers"].get(f"llamacpp-q{bits}_0")
        mlm = result["peers"].get("mlx-lm-f32")
        perseq = result["peers"].get(f"mlx-llama-per-sequence-q{bits}")
        lines += [f"## {bits}-bit (ours: MLX affine g64; llama.cpp: Q{bits}_0)", "",
                  "| B | ours aggregate tok/s | ours per-seq | ours prefill | ours peak GB | "
                  "llama.cpp aggregate | llama.cpp prefill | ours ÷ llama.cpp | mlx-lm float32 aggregate | "
                  "ours, per-sequence RoPE/attention | ours ÷ that |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for B, o in ours["batches"].items():
            l = (lcpp or {}).get("batches", {}).get(B)
            m = (mlm or {}).get("batches", {}).get(B)
            ps = (perseq or {}).get("batches", {}).get(B)
            cells = [B, f"{o['decode_tps']:.1f}", f"{o['per_seq_tps']:.1f}", f"{o['prefill_tps']:.1f}",
                     f"{o['peak_mem_gb']:.2f}"]
            cells += ([f"{l['decode_tps']:.1f}", f"{l['prefill_tps']:.1f}", f"{o['decode_tps'] / l['decode_tps']:.2f}×"]
                      if l else ["–"] * 3)
            cells.append(f"{m['decode_tps']:.1f}" if m else "–")
            cells += ([f"{ps['decode_tps']:.1f}", f"{o['decode_tps'] / ps['decode_tps']:.2f}×"] if ps else ["–"] * 2)
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        b = ours["batches"]
        if "1" in b and "8" in b:
            best_prefill = max(x["prefill_tps"] for x in b.values())
            lines += ["", f"B=8 aggregate ÷ B=1: {b['8']['decode_tps'] / b['1']['decode_tps']:.2f}× (target ≥ 2.5×); "
                      f"÷ our best prefill tok/s: {b['8']['decode_tps'] / best_prefill:.2f} (target ≥ 0.8)"]
        if "gap" in ours:
            g = ours["gap"]
            lines += ["", f"Inter-token gap, B=8: {g['streams']} decoding streams step in {g['decode_step_ms']:.0f} ms; "
                      f"while a {g['prompt']}-token prompt joins in chunks of {g['chunk']} (the engine's default "
                      f"prefill policy), the worst step is {g['worst_gap_ms']:.0f} ms and the prompt's first token "
                      f"comes after {g['ttft_ms']:.0f} ms ({g['join_steps']} steps)."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-g", "--n-gen", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,2,4,8,16")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--chunk", type=int, default=64, help="the engine's prefill chunk")
    ap.add_argument("--gap-prompt", type=int, help="tokens of the prompt joining B=8 streams (default: 2 chunks)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--peers", default="mlx-llama,llamacpp",
                    help="from mlx-llama, mlx-llama-per-sequence, llamacpp, mlx-lm")
    ap.add_argument("--llama-cpp-bin", help="folder holding llama-batched-bench and llama-quantize")
    ap.add_argument("--llama-cpp-poll", type=int, default=None,
                    help="llama.cpp's --poll (0: its threads sleep instead of spinning; fairer on a busy machine)")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "batch")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_mlx_lm_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        engine_worker(json.loads(args._worker))
        return 0
    if args._mlx_lm_worker:
        mlx_lm_worker(json.loads(args._mlx_lm_worker))
        return 0
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.bits = [int(b) for b in args.bits.split(",")]
    peers = args.peers.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    hf = throughput.prepare_hf(args.work, args.preset)
    mlx_dirs = {bits: throughput.prepare_mlx(hf, args.work, bits) for bits in args.bits}
    mlx_lm_f32 = throughput.prepare_mlx_lm_float32(hf, args.work) if "mlx-lm" in peers else None
    bin_dir = find_llama_cpp(args.llama_cpp_bin) if "llamacpp" in peers else None
    if "llamacpp" in peers and bin_dir is None:
        log("llama-batched-bench not found (--llama-cpp-bin, $LLAMA_CPP_BIN, PATH): llama.cpp skipped")
    ggufs = {bits: gguf(hf, args.work, f"q{bits}_0", bin_dir, args.threads) for bits in args.bits} if bin_dir else {}
    runs: dict[str, list[dict[str, Any]]] = {}
    load_before = os.getloadavg()[0]
    for rnd in range(args.rounds):
        for bits in args.bits:
            if "mlx-llama" in peers:
                log(f"round {rnd + 1}: mlx-llama q{bits}")
                runs.setdefault(f"mlx-llama-q{bits}", []).append(
                    run_engine(f"mlx-llama-q{bits}", mlx_dirs[bits], args, gap=rnd == 0))
            if "mlx-llama-per-sequence" in peers:
                log(f"round {rnd + 1}: mlx-llama q{bits}, per-sequence RoPE and attention")
                runs.setdefault(f"mlx-llama-per-sequence-q{bits}", []).append(
                    run_engine(f"mlx-llama-per-sequence-q{bits}", mlx_dirs[bits], args, gap=False,
                               attention="per-sequence ops"))
            if bits in ggufs:
                log(f"round {rnd + 1}: llama-batched-bench Q{bits}_0")
                runs.setdefault(f"llamacpp-q{bits}_0", []).append(run_llama_cpp(ggufs[bits], bin_dir, args))
                log(f"  {runs[f'llamacpp-q{bits}_0'][-1]}")
        if "mlx-lm" in peers:  # its best CPU setting, whatever our bit width: float32 weights
            log(f"round {rnd + 1}: mlx-lm float32")
            runs.setdefault("mlx-lm-f32", []).append(run_mlx_lm(mlx_lm_f32, args))
    result = dict(args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if not k.startswith("_")},
                  command="python benchmarks/batch_throughput.py " + " ".join(argv or sys.argv[1:]),
                  machine=f"{throughput._cpu_name()}, {os.cpu_count()} cores, load average {load_before:.1f} "
                          f"at the start, {os.getloadavg()[0]:.1f} at the end",
                  rounds=args.rounds, peers={name: median_runs(r) for name, r in runs.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    poll = "" if args.llama_cpp_poll is None else f"-poll{args.llama_cpp_poll}"
    stem = f"batch-throughput-{args.preset}{poll}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
