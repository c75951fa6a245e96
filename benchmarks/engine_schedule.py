#!/usr/bin/env python3
"""Prefill policies of the engine compared on serve_load's workload, in one process, interleaved.

The load of benchmarks/serve_load.py without HTTP: C clients each send
`--requests` completions one after another (prompts of mixed lengths of random
token ids, `--max-tokens` greedy tokens), straight into one `Engine`.  Per
policy and client count: time to first token p50/p95 (submit → first token
event), inter-token gap p50/p95/max, aggregate tok/s.  The policies run
alternately in the same process, so a busy machine slows them alike; figures
are medians over rounds.

    python benchmarks/engine_schedule.py                           # clients 4,8, 2 rounds
    python benchmarks/engine_schedule.py --clients 1,4,8 --gap-targets 400,1500 --rounds 3

Policies: `fixed32` (the engine before: 32 prompt tokens per step, no gap
target) and `gap<ms>` for each of `--gap-targets` (EngineConfig's defaults:
measured step cost, that gap target).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import engine_profile  # noqa: E402  (the model options, shared)
import throughput  # noqa: E402  (the prompt vocabulary and the log, reused)

import numpy as np  # noqa: E402

from mlx_llama.generation.engine import Engine, EngineConfig  # noqa: E402
from mlx_llama.generation.requests import GenerationRequest  # noqa: E402

FIXED32 = dict(prefill_chunk=32, prefill_tokens_per_step=32, gap_target_ms=None)  # the engine before


def run_load(model: Any, policy: dict[str, Any], prompts: list[list[int]], clients: int, requests: int,
             max_tokens: int, parallel: int) -> dict[str, float]:
    engine = Engine(model, EngineConfig(max_batch=parallel, **policy))
    engine.submit(GenerationRequest(prompts[0][:16], 4))  # warm-up, as serve_load does
    while engine.has_work:
        engine.step()
    todo = {k: [prompts[(k * requests + i) % len(prompts)] for i in range(requests)] for k in range(clients)}
    owner, sent, stamps = {}, {}, {}

    def send(k: int) -> None:
        rid = engine.submit(GenerationRequest(todo[k].pop(0), max_tokens))
        owner[rid], sent[rid], stamps[rid] = k, time.perf_counter(), []

    t0 = time.perf_counter()
    for k in range(clients):
        send(k)
    while engine.has_work:
        events = engine.step()
        now = time.perf_counter()
        for ev in events:
            if ev.token is not None:
                stamps[ev.request_id].append(now)
            if ev.finish_reason is not None and todo[owner[ev.request_id]]:
                send(owner[ev.request_id])
    wall = time.perf_counter() - t0
    ttft = [stamps[r][0] - sent[r] for r in stamps]
    gaps = [g for r in stamps for g in np.diff(stamps[r])]
    return dict(tok_s=sum(map(len, stamps.values())) / wall, ttft_p50=float(np.percentile(ttft, 50)),
                ttft_p95=float(np.percentile(ttft, 95)), gap_p50=float(np.percentile(gaps, 50)),
                gap_p95=float(np.percentile(gaps, 95)), gap_max=float(max(gaps)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    engine_profile.add_model_options(ap)
    ap.add_argument("--clients", default="4,8")
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-lengths", default="16,64,128")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--gap-targets", default="400", help="gap targets (ms) of the measured-cost policy")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    model = engine_profile.load_benchmark_model(args)
    clients = [int(c) for c in args.clients.split(",")]
    lengths = [int(n) for n in args.prompt_lengths.split(",")]
    rng = np.random.default_rng(args.seed)  # the prompts serve_load sends for the same seed
    prompts = [rng.integers(0, throughput.PROMPT_VOCAB, lengths[i % len(lengths)]).tolist()
               for i in range(max(clients) * args.requests)]
    policies = {"fixed32": FIXED32, **{f"gap{g}": dict(gap_target_ms=float(g)) for g in args.gap_targets.split(",")}}
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    load_before = os.getloadavg()[0]
    for rnd in range(args.rounds):
        for c in clients:
            for name in policies if rnd % 2 == 0 else list(policies)[::-1]:
                r = run_load(model, policies[name], prompts, c, args.requests, args.max_tokens, args.parallel)
                runs.setdefault((name, c), []).append(r)
                throughput.log(f"round {rnd + 1} {name:8s} {c} clients: " +
                               ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    lines = [f"# Engine prefill policies on serve_load's workload ({args.preset} 4-bit random weights)", "",
             f"Command: `python benchmarks/engine_schedule.py {' '.join(argv or sys.argv[1:])}`; "
             f"{throughput._cpu_name()}, {os.cpu_count()} cores, load average {load_before:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end; {args.parallel} slots, {args.requests} requests per client, "
             f"prompts {lengths} tokens, {args.max_tokens} greedy tokens, medians of {args.rounds} interleaved rounds.",
             "", "| policy | clients | tok/s | TTFT p50 | TTFT p95 | gap p50 | gap p95 | gap max |",
             "|---|---|---|---|---|---|---|---|"]
    med = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
    for c in clients:
        for name in policies:
            m = med[(name, c)]
            lines.append(f"| {name} | {c} | {m['tok_s']:.1f} | {m['ttft_p50']:.2f} s | {m['ttft_p95']:.2f} s | "
                         f"{1e3 * m['gap_p50']:.0f} ms | {1e3 * m['gap_p95']:.0f} ms | {1e3 * m['gap_max']:.0f} ms |")
    lines += ["", "| policy | clients | TTFT p95 ÷ fixed32 | gap max ÷ fixed32 | tok/s ÷ fixed32 |",
              "|---|---|---|---|---|"]
    for c in clients:
        b = med[("fixed32", c)]
        for name in list(policies)[1:]:
            a = med[(name, c)]
            lines.append(f"| {name} | {c} | {a['ttft_p95'] / b['ttft_p95']:.2f}× | {a['gap_max'] / b['gap_max']:.2f}× | "
                         f"{a['tok_s'] / b['tok_s']:.2f}× |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
