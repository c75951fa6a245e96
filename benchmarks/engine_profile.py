#!/usr/bin/env python3
"""Where one engine step spends its time: a B-sequence decode step and a mixed prefill + decode step.

Two views of the same steps (1B shape, 4-bit random weights by default):

* the step as the engine runs it (lazy graph, one `mx.eval`): planning,
  Python graph building (`Model.forward_packed` returns before anything runs),
  the eval itself, the logits' copy to NumPy, and sampling;
* the same step run eagerly, split by op class: every quantized matmul,
  attention call, RoPE, norm, SwiGLU and KV-cache write is evaluated on its own
  and timed in CPU time of all the process's threads, which a busy machine
  disturbs far less than wall time (time spent waiting for a core is not
  counted).  An eager eval has a fixed cost of its own (dispatch, thread
  wake-up), measured on a trivial op and subtracted from each call; shares are
  of the eager step (the rest: Python, embedding, residual adds,
  concatenations, the rows' gather, sampling);
* the step's graph: its node count by primitive.

With `--compare`, each step is also run with the per-sequence RoPE and
attention calls (the path without the extension's row ops), interleaved step
by step with the batched one, so the two are measured under the same load.

    python benchmarks/engine_profile.py                         # B=8, prompts 128, chunk 32
    python benchmarks/engine_profile.py --batch 8 --chunk 64 --steps 10
    python benchmarks/engine_profile.py --compare               # batched row ops vs per-sequence ops

Prints a markdown report; `--out FILE` also writes it (benchmarks/results/engine-step-profile.md).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput  # noqa: E402  (the random checkpoint and its MLX conversion, reused)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_llama.generation import engine as engine_mod  # noqa: E402
from mlx_llama.generation.engine import Engine, EngineConfig  # noqa: E402
from mlx_llama.generation.requests import GenerationRequest  # noqa: E402
from mlx_llama.kernels import extension  # noqa: E402
from mlx_llama.kernels import ops as fused  # noqa: E402
from mlx_llama.loader import load_model  # noqa: E402
from mlx_llama.model import cache as cache_mod  # noqa: E402
from mlx_llama.model import llama, quantized  # noqa: E402

# (module, attribute, op class) of every op the eager view times.
TIMED_OPS = [
    (quantized, "quantized_matmul", "quantized matmuls"),
    (llama.fused, "attention", "attention (per sequence)"),
    (llama.fused, "attention_rows_update", "attention + KV writes (decode rows, one call)"),
    (llama.fused, "rope", "RoPE"),
    (llama.fused, "rope_rows", "RoPE"),
    (llama.fused, "rms_norm", "RMSNorm"),
    (llama.fused, "swiglu", "SwiGLU"),
]


def busy_engine(model: Any, args: argparse.Namespace, rng: np.random.Generator) -> Engine:
    """An engine whose `args.batch` sequences have read `args.prompt`-token prompts and decode."""
    engine = Engine(model, EngineConfig(max_batch=args.batch + 1, prefill_chunk=args.chunk,
                                        prefill_tokens_per_step=args.chunk * args.batch, gap_target_ms=None))
    for _ in range(args.batch):  # enough tokens that none finishes during the profile
        engine.submit(GenerationRequest(prompt(rng, args.prompt), 8 * args.steps + 64))
    while any(s.prefilling for s in engine._running) or not engine._running:
        engine.step()
    engine.step()
    return engine


def prompt(rng: np.random.Generator, n: int) -> list[int]:
    return list(map(int, rng.integers(0, throughput.PROMPT_VOCAB, n)))


def graph_nodes(engine: Engine) -> Counter[str]:
    """The primitives of one step's graph, by name (the step is then evaluated as usual)."""
    engine._admit([])
    segments, tokens, rows, sampled = engine._plan()
    logits = engine.model.forward_packed(mx.array(np.asarray(tokens, dtype=np.int32))[None], segments, rows)
    outputs = [logits, *[c.state[0] for _, cache in segments for c in cache]]
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    mx.eval(outputs)
    for seq, row in zip(sampled, np.array(logits.astype(mx.float32))):
        engine._sample(seq, row)
    return Counter(re.findall(r'label ="([A-Za-z]+)', dot.getvalue()))


def lazy_step(engine: Engine) -> dict[str, float]:
    """One `Engine.step`, cut into its phases (the same calls in the same order)."""
    cpu = time.process_time()
    t = [time.perf_counter()]
    events: list[Any] = []
    engine._admit(events)
    segments, tokens, rows, sampled = engine._plan()
    t.append(time.perf_counter())
    logits = engine.model.forward_packed(mx.array(np.asarray(tokens, dtype=np.int32))[None], segments, rows)
    t.append(time.perf_counter())
    mx.eval(logits, *[c.state[0] for _, cache in segments for c in cache])
    t.append(time.perf_counter())
    table = np.array(logits.astype(mx.float32))
    t.append(time.perf_counter())
    for seq, row in zip(sampled, table):
        engine._sample(seq, row)
    t.append(time.perf_counter())
    names = ("plan", "graph building (Python)", "mx.eval", "logits to NumPy", "sampling (NumPy)")
    out = {n: 1e3 * (b - a) for n, a, b in zip(names, t, t[1:])}
    out["rows"] = len(tokens)
    out["cpu"] = 1e3 * (time.process_time() - cpu)  # all threads; with --threads 1, the step's own work
    return out


@contextlib.contextmanager
def eager_ops(totals: dict[str, float], eval_cost: float) -> Iterator[None]:
    """Evaluate each timed op on its own and add its time (less one eval's fixed cost) to `totals`."""
    saved = []

    def timed(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def run(*a: Any, **kw: Any) -> Any:
            mx.eval([x for x in a if isinstance(x, mx.array)])
            s = time.process_time()
            y = fn(*a, **kw)
            mx.eval(y)
            totals[name] += 1e3 * (time.process_time() - s) - eval_cost
            return y
        return run

    for mod, attr, name in TIMED_OPS:
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, timed(getattr(mod, attr), name))
    for cls in (cache_mod.KVCache, cache_mod.RotatingKVCache):
        saved.append((cls, "update_and_fetch", cls.update_and_fetch))

        def update(self: Any, k: mx.array, v: mx.array, _orig: Callable[..., Any] = cls.update_and_fetch) -> Any:
            mx.eval(k, v)
            s = time.process_time()
            out = _orig(self, k, v)
            mx.eval(out)
            totals["KV cache writes"] += 1e3 * (time.process_time() - s) - eval_cost
            return out
        setattr(cls, "update_and_fetch", update)
    try:
        yield
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)


def eval_fixed_cost() -> float:
    """CPU ms of one `mx.eval` of a trivial op (the eager view's per-call overhead)."""
    x = mx.zeros((8,))
    mx.eval(x)
    times = []
    for _ in range(200):
        s = time.process_time()
        mx.eval(x + 1)
        times.append(time.process_time() - s)
    return 1e3 * statistics.median(times)


# How a step runs RoPE and the decode rows' attention: the extension's row ops
# (one call per layer) or one call per sequence (as without the extension).
PATHS = {"batched row ops": True, "per-sequence ops": False}


@contextlib.contextmanager
def attention_path(row_ops: bool) -> Iterator[None]:
    saved = fused.has_row_ops
    if not row_ops:
        fused.has_row_ops = lambda dtype: False
    try:
        yield
    finally:
        fused.has_row_ops = saved


def profile(engine: Engine, steps: int, join: Callable[[], None] | None, eval_cost: float,
            paths: list[str]) -> dict[str, dict[str, Any]]:
    """Per path, median lazy phases and median eager op-class times over `steps` steps
    (lazy and eager alternating, the paths interleaved step by step)."""
    lazy: dict[str, dict[str, list[float]]] = {p: defaultdict(list) for p in paths}
    eager: dict[str, dict[str, list[float]]] = {p: defaultdict(list) for p in paths}
    for _ in range(steps):
        for path in paths:
            with attention_path(PATHS[path]):
                if join:
                    join()
                for k, v in lazy_step(engine).items():
                    lazy[path][k].append(v)
                if join:
                    join()
                totals: dict[str, float] = defaultdict(float)
                s = time.process_time()
                with eager_ops(totals, eval_cost):
                    lazy_step(engine)
                totals["eager step"] = 1e3 * (time.process_time() - s)
                for k, v in totals.items():
                    eager[path][k].append(v)
    out = {}
    for path in paths:
        with attention_path(PATHS[path]):
            if join:
                join()
            out[path] = {"lazy": {k: statistics.median(v) for k, v in lazy[path].items()},
                         "eager": {k: statistics.median(v) for k, v in eager[path].items()},
                         "nodes": graph_nodes(engine)}
    return out


NOT_PHASES = ("rows", "cpu")


def lazy_total(r: dict[str, Any]) -> float:
    return sum(v for k, v in r["lazy"].items() if k not in NOT_PHASES)


def table(title: str, r: dict[str, Any]) -> list[str]:
    lz, eg = r["lazy"], r["eager"]
    total = lazy_total(r)
    lines = [f"### {title} ({lz['rows']:.0f} packed rows)", "",
             f"Lazy step (as the engine runs it): {total:.1f} ms", "", "| phase | ms | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / total:.0%} |" for k, v in lz.items() if k not in NOT_PHASES]
    classes = list(dict.fromkeys(name for _, _, name in TIMED_OPS)) + ["KV cache writes"]
    step = eg["eager step"]
    rest = step - sum(eg.get(c, 0.0) for c in classes)
    lines += ["", f"The same step run eagerly, op by op, in CPU time of all threads (each op's less one eval's "
              f"fixed cost): {step:.1f} CPU ms", "", "| op class | CPU ms | share |", "|---|---|---|"]
    lines += [f"| {c} | {eg.get(c, 0.0):.1f} | {eg.get(c, 0.0) / step:.0%} |" for c in classes]
    lines += [f"| rest (Python, embedding, adds, concatenations, gather, sampling; eval dispatch) | "
              f"{rest:.1f} | {rest / step:.0%} |", "",
              f"Graph: {sum(r['nodes'].values())} nodes: " +
              ", ".join(f"{n} {k}" for k, n in r["nodes"].most_common(8)) + ".", ""]
    return lines


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """--preset, --weights, --work: which model the engine benchmarks load (`load_benchmark_model`)."""
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--weights", type=Path, help="an MLX model directory (default: the preset's 4-bit random weights)")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "batch")


def load_benchmark_model(args: argparse.Namespace) -> Any:
    """The model named by `add_model_options`' arguments (random weights are written on first use)."""
    weights = args.weights or throughput.prepare_mlx(throughput.prepare_hf(args.work, args.preset), args.work, 4)
    return load_model(weights)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(ap)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens of each decoding sequence")
    ap.add_argument("--chunk", type=int, default=32, help="prefill chunk (the mixed step adds one)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="kernel threads (default: the extension's; 1 makes the lazy "
                    "step's CPU time its own work, which a busy host does not inflate)")
    ap.add_argument("--compare", action="store_true",
                    help="also run each step with per-sequence RoPE and attention, interleaved")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    model = load_benchmark_model(args)
    if args.threads is not None:
        extension.module().set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    eval_cost = eval_fixed_cost()
    engine = busy_engine(model, args, rng)
    paths = list(PATHS) if args.compare else list(PATHS)[:1]
    for path in paths:  # warm-up
        with attention_path(PATHS[path]):
            lazy_step(engine)
            lazy_step(engine)
    decode = profile(engine, args.steps, None, eval_cost, paths)

    def join() -> None:  # a fresh request whose first chunk rides along in the next step
        for seq in [s for s in engine._running if s.prefilling]:
            engine.cancel(seq.id)
        engine._events.clear()
        engine.submit(GenerationRequest(prompt(rng, args.chunk), 1))

    mixed = profile(engine, args.steps, join, eval_cost, paths)
    threads = extension_threads()
    lines = [f"# One engine step, {args.preset} 4-bit random weights, B={args.batch} decoding "
             f"(prompts {args.prompt}), chunk {args.chunk}", "",
             f"Command: `python benchmarks/engine_profile.py {' '.join(argv or sys.argv[1:])}`; "
             f"{throughput._cpu_name()}, {os.cpu_count()} cores, kernel threads {threads}, "
             f"load average {os.getloadavg()[0]:.1f}; medians of {args.steps} steps"
             f"{' per path, the paths interleaved step by step' if args.compare else ''}; "
             f"one eager eval's fixed cost {eval_cost * 1e3:.0f} CPU µs.", ""]
    if args.compare:
        lines += comparison(args.batch, args.chunk, decode, mixed)
    for path in paths:
        label = f" — {path}" if args.compare else ""
        lines += table(f"Decode step, B={args.batch}{label}", decode[path])
        lines += table(f"Mixed step, B={args.batch} decoding + one {args.chunk}-token prefill chunk{label}",
                       mixed[path])
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


def comparison(batch: int, chunk: int, decode: dict[str, Any], mixed: dict[str, Any]) -> list[str]:
    """The two paths side by side: lazy step ms, eager CPU ms, graph nodes, and the ratios."""
    new, old = list(PATHS)
    lines = ["| step | path | lazy step ms | lazy step CPU ms | eager CPU ms | graph nodes |",
             "|---|---|---|---|---|---|"]
    for name, r in ((f"decode B={batch}", decode), (f"decode B={batch} + {chunk}-token chunk", mixed)):
        figures = {path: (lazy_total(r[path]), r[path]["lazy"]["cpu"], r[path]["eager"]["eager step"],
                          sum(r[path]["nodes"].values())) for path in (old, new)}
        for path, (wall, cpu, eager, nodes) in figures.items():
            lines.append(f"| {name} | {path} | {wall:.1f} | {cpu:.1f} | {eager:.1f} | {nodes} |")
        ratios = " | ".join(f"{a / b:.2f}x" for a, b in zip(figures[old], figures[new]))
        lines.append(f"| {name} | per-sequence / batched | {ratios} |")
    return lines + [""]


def extension_threads() -> str:
    ext = extension.module()
    return str(ext.num_threads()) if ext is not None else "n/a (no extension)"


if __name__ == "__main__":
    sys.exit(main())
