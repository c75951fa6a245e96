#!/usr/bin/env python3
"""Decode tok/s with and without a JSON-schema constraint, in ONE run (batch 1 and batch 8).

Batch 1 runs `generate_tokens` (the single-sequence loop, which computes each
mask while the forward pass runs); batch 8 runs the batched engine with every
row constrained or none.  Rounds interleave the plain and constrained runs, so
a busy machine slows both alike; figures are medians over rounds.  Also
reported: the matcher's own time per token (mask + advance), measured inside
the constrained batch-1 runs, as a share of a plain decode step.

The weights are random (benchmarks/throughput.py prepares them), so the text
is noise: the schema below keeps the constrained output long, and the plain
runs ignore stop tokens, so both generate `-g` tokens.

    python benchmarks/constrained_decode.py                 # llama-3.2-1b 4-bit, g64, 3 rounds
    python benchmarks/constrained_decode.py --preset tiny -g 32 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput  # noqa: E402  (the checkpoint and MLX preparation, reused)

from mlx_llama.generation.constraints import ConstraintCompiler, GrammarConstraint, json_schema_grammar  # noqa: E402
from mlx_llama.generation.engine import Engine, EngineConfig  # noqa: E402
from mlx_llama.generation.loop import GenerationStats, generate_tokens  # noqa: E402
from mlx_llama.generation.requests import GenerationRequest  # noqa: E402
from mlx_llama.generation.sampler import Sampler, SamplingParams  # noqa: E402
from mlx_llama.loader import load  # noqa: E402

# Long strings keep noise from closing the object early; the other fields make
# the matcher walk numbers, enums and nesting.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "kind": {"enum": ["report", "memo", "letter"]},
        "meta": {
            "type": "object",
            "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}, "ok": {"type": "boolean"}},
            "required": ["score", "ok"],
            "additionalProperties": False,
        },
        "notes": {
            "type": "array",
            "items": {"type": "string", "minLength": 200, "maxLength": 400},
            "minItems": 2,
            "maxItems": 4,
        },
    },
    "required": ["id", "kind", "meta", "notes"],
    "additionalProperties": False,
}


class TimedConstraint:
    """Wraps a constraint and adds up the time its methods take (the matcher's cost)."""

    def __init__(self, inner: GrammarConstraint) -> None:
        self.inner, self.seconds, self.steps = inner, 0.0, 0

    def allowed(self) -> np.ndarray:
        t = time.perf_counter()
        mask = self.inner.allowed()
        self.seconds += time.perf_counter() - t
        self.steps += 1
        return mask

    def advance(self, token: int) -> None:
        t = time.perf_counter()
        self.inner.advance(token)
        self.seconds += time.perf_counter() - t

    def is_done(self) -> bool:
        return self.inner.is_done()


def batch1(model: Any, prompt: list[int], n_gen: int, seed: int, constraint: Any, stop_ids: frozenset[int]) -> float:
    stats = GenerationStats()
    sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
    n = sum(1 for _ in generate_tokens(model, prompt, max_tokens=n_gen, sampler=sampler, stats=stats,
                                       stop_ids=stop_ids, constraint=constraint))
    # The first token comes from the prefill: decode time is the rest.
    return (n - 1) / stats.generation_seconds if n > 1 else float("nan")


def batch8(model: Any, prompts: list[list[int]], n_gen: int, seed: int, constraints: list[Any],
           stop_ids: frozenset[int]) -> float:
    engine = Engine(model, EngineConfig(max_batch=len(prompts)))
    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(p, n_gen, SamplingParams(temperature=1.0, seed=seed + i),
                                        stop_ids=stop_ids, constraint=constraints[i]))
    # Time only the steps in which every row decodes (the prompts are in by then).
    decoded, seconds, started = 0, 0.0, False
    while engine.has_work:
        t = time.perf_counter()
        events = engine.step()
        dt = time.perf_counter() - t
        decoding = len(events) == len(prompts) and all(e.token is not None for e in events)
        if decoding and started:
            decoded, seconds = decoded + len(events), seconds + dt
        started = started or decoding
    return decoded / seconds if seconds else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("-g", "--n-gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="engine batch size (0: skip the batched runs)")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "constrained")
    args = ap.parse_args(argv)

    hf = throughput.prepare_hf(args.work, args.preset)
    model, tokenizer = load(throughput.prepare_mlx(hf, args.work, args.bits))
    t = time.perf_counter()
    compiler = ConstraintCompiler(tokenizer, model.config.vocab_size)
    print(f"tokenizer for the matcher built in {time.perf_counter() - t:.2f} s (once per process)")
    grammar = json_schema_grammar(SCHEMA)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Write the report as JSON."}])
    prompts = [tokenizer.encode_chat([{"role": "user", "content": f"Write report {i} as JSON."}])
               for i in range(args.batch)]
    stops = tokenizer.stop_ids
    batch1(model, prompt, 8, 0, None, frozenset())  # warm-up

    rows: dict[str, list[float]] = {k: [] for k in ("b1 plain", "b1 schema", "b8 plain", "b8 schema")}
    matcher_ms: list[float] = []
    for r in range(args.rounds):
        order = ("plain", "schema") if r % 2 == 0 else ("schema", "plain")
        for kind in order:
            if kind == "plain":
                # No stop tokens: noise would end some runs early.
                rows["b1 plain"].append(batch1(model, prompt, args.n_gen, r, None, frozenset()))
            else:
                timed = TimedConstraint(compiler.constraint(grammar))
                rows["b1 schema"].append(batch1(model, prompt, args.n_gen, r, timed, stops))
                matcher_ms.append(1e3 * timed.seconds / timed.steps)
            if args.batch:
                constraints = [compiler.constraint(grammar) if kind == "schema" else None for _ in prompts]
                rows[f"b8 {kind}"].append(batch8(model, prompts, args.n_gen, 100 * r, constraints,
                                                 stops if kind == "schema" else frozenset()))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items() if v), flush=True)

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    print(f"\n{args.preset} {args.bits}-bit, g{args.n_gen}, {args.rounds} interleaved rounds (median decode tok/s)")
    print("| batch | plain tok/s | JSON schema tok/s | schema / plain |")
    print("|---|---|---|---|")
    for b in ("b1", "b8"):
        if f"{b} plain" in med:
            print(f"| {b[1:]} | {med[b + ' plain']:.2f} | {med[b + ' schema']:.2f} | "
                  f"{med[b + ' schema'] / med[b + ' plain']:.3f} |")
    step_ms = 1e3 / med["b1 plain"]
    mm = statistics.median(matcher_ms)
    print(f"\nmatcher (mask + advance) per token: {mm:.3f} ms = {100 * mm / step_ms:.1f}% of a plain "
          f"batch-1 decode step ({step_ms:.1f} ms); batch 1 computes it while the forward pass runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
