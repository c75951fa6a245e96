"""Token-throughput measurement, llama-bench style: pp (prefill) and tg (decode) tok/s.

One repetition = a fresh cache, a random prompt of `n_prompt` ids fed through our
generation loop (`generate_tokens`, greedy), then `n_gen` decoded tokens:

- pp tok/s: prompt tokens ÷ (prefill + first-token sample) time,
- ttft: that same time, i.e. time to the first generated token,
- tg tok/s: (n_gen - 1) ÷ time from the first to the last generated token (each
  of those tokens costs exactly one forward pass at context n_prompt + i),
- bytes/token: the weight bytes one decode step must read (every linear layer,
  the LM head; the embedding table only when it is the tied LM head), so
  bytes/token × tg tok/s is the weight bandwidth achieved.

A short warm-up run precedes the measured repetitions.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.loop import generate_tokens


def mean_std(values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals) if vals else 0.0,
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals) if vals else 0.0,
        "max": max(vals) if vals else 0.0,
        "values": vals,
    }


def _nbytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in nn.utils.tree_flatten(module.parameters()))


def weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of the weights held, and of those read per decoded token."""
    total = _nbytes(model)
    embed = _nbytes(model.model.embed_tokens)
    # Untied: one embedding row is read, the separate lm_head fully (counted in total).
    # Tied: the embedding table doubles as the LM head and is read in full.
    per_token = total if model.config.tie_word_embeddings else total - embed
    return {"total": total, "per_token": per_token}


def count_params(model: Any) -> int:
    """Logical parameter count (quantized matrices counted unpacked, scales not counted)."""
    # Any quantized layer (mlx's or our own) carries `bits` and packed `weight` + `scales`.
    bits = {name: mod.bits for name, mod in model.named_modules()
            if isinstance(getattr(mod, "bits", None), int) and "scales" in mod}
    n = 0
    for name, v in nn.utils.tree_flatten(model.parameters()):
        owner, _, leaf = name.rpartition(".")
        if owner in bits:
            if leaf == "weight":
                n += v.size * 32 // bits[owner]
            elif leaf not in ("scales", "biases"):
                n += v.size
        else:
            n += v.size
    return n


def describe_quantization(model: Any) -> str:
    q = model.config.quantization
    dtype = str(getattr(model, "dtype", mx.float32)).replace("mlx.core.", "")
    if not q:
        return dtype
    return f"q{q.get('bits')} g{q.get('group_size')} ({dtype} compute)"


def qmatmul_backend() -> str:
    """The quantized-matmul kernel our runtime uses."""
    from mlx_llama.kernels import extension

    return extension.backend_name()


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process."""
    try:  # VmHWM belongs to this program's address space (ru_maxrss survives exec)
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024
        return peak, peak


def environment() -> dict[str, Any]:
    from mlx_llama.kernels import blas

    info = blas.info()
    return {
        "mlx": mx.__version__,
        "device": "cpu" if mx.default_device() == mx.cpu else "gpu",
        "blas": info.describe(),
        "blas_name": info.name,
        "blas_threads": info.threads,
        "qmatmul": qmatmul_backend(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def _one_run(model: Any, prompt: list[int], n_gen: int, prefill_step: int) -> dict[str, float]:
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    times: list[float] = []
    gen = generate_tokens(model, prompt, max_tokens=n_gen, prefill_step_size=prefill_step)
    try:
        for _ in gen:
            times.append(time.perf_counter())
    finally:
        gen.close()
    if len(times) < min(n_gen, 1):
        raise MlxLlamaError("generation stopped early")
    ttft = times[0] - t0 if times else time.perf_counter() - t0
    decode = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "ttft_s": ttft,
        "pp_tps": len(prompt) / ttft,
        "tg_tps": (len(times) - 1) / decode if decode > 0 else 0.0,
        "peak_memory_bytes": mx.get_peak_memory(),
    }


def run_bench(
    model: Any,
    n_prompt: int = 512,
    n_gen: int = 128,
    repetitions: int = 3,
    *,
    seed: int = 0,
    prefill_step: int = 512,
    warmup: bool = True,
) -> dict[str, Any]:
    """Measure `model`; returns a JSON-ready dict (see the module docstring)."""
    if n_prompt < 1:
        raise MlxLlamaError("the prompt length (-p) must be >= 1")
    if n_gen < 2:
        raise MlxLlamaError("the generation length (-g) must be >= 2 to time decoding")
    if repetitions < 1:
        raise MlxLlamaError("repetitions (-r) must be >= 1")
    limit = model.config.max_position_embeddings
    if n_prompt + n_gen > limit:
        raise MlxLlamaError(f"-p + -g = {n_prompt + n_gen} exceeds the model's context ({limit})")
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size

    def prompt() -> list[int]:
        return rng.integers(0, vocab, size=n_prompt).tolist()

    if warmup:
        _one_run(model, prompt()[: min(n_prompt, 16)], 4, prefill_step)
    runs = [_one_run(model, prompt(), n_gen, prefill_step) for _ in range(repetitions)]
    wb = weight_bytes(model)
    tg = mean_std([r["tg_tps"] for r in runs])
    rss_now, rss_peak = rss_bytes()
    return {
        "model": str(getattr(model, "path", "")),
        "quantization": describe_quantization(model),
        "params": count_params(model),
        "weight_bytes": wb["total"],
        "bytes_per_token": wb["per_token"],
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "repetitions": repetitions,
        "prefill_step": prefill_step,
        "pp_tps": mean_std([r["pp_tps"] for r in runs]),
        "tg_tps": tg,
        "ttft_s": mean_std([r["ttft_s"] for r in runs]),
        "bandwidth_gbs": mean_std([wb["per_token"] * v / 1e9 for v in tg["values"]]),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
        "rss_bytes": rss_now,
        "rss_peak_bytes": rss_peak,
        "env": environment(),
    }


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A llama-bench-like markdown table for `run_bench` results (one pp and one tg row each).

    A result's "threads" entry, when set, is the thread count it ran with.
    """
    head = "| model | quant | size | params | backend | threads | test | t/s |"
    rows = [head, "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    notes = []

    def ms(d: dict[str, float], fmt: str = "{:.2f}") -> str:
        return f"{fmt.format(d['mean'])} ± {fmt.format(d['std'])}"

    for result in results:
        env = result["env"]
        name = os.path.basename(result["model"].rstrip("/")) or "model"
        size = f"{result['weight_bytes'] / 2**30:.2f} GiB"
        params = f"{result['params'] / 1e9:.2f} B"
        backend = f"MLX {env['device']} + {env['blas_name']}"
        th = result.get("threads") or env.get("blas_threads") or env["cores"]
        tests = (f"pp{result['n_prompt']}", "pp_tps"), (f"tg{result['n_gen']}", "tg_tps")
        for test, key in tests:
            rows.append(f"| {name} | {result['quantization']} | {size} | {params} | {backend} | {th} | {test} | "
                        f"{ms(result[key])} |")
        label = f"pp{result['n_prompt']}/tg{result['n_gen']}, {th} threads: " if len(results) > 1 else ""
        notes.append(
            f"{label}time to first token {ms(result['ttft_s'], '{:.3f}')} s | "
            f"weights read per token {result['bytes_per_token'] / 1e6:.1f} MB → "
            f"{ms(result['bandwidth_gbs'])} GB/s | peak MLX memory {result['peak_memory_bytes'] / 1e9:.3f} GB | "
            f"RSS {result['rss_bytes'] / 1e9:.3f} GB (peak {result['rss_peak_bytes'] / 1e9:.3f} GB)"
        )
    env = results[-1]["env"]
    rows.append("")
    rows += notes
    rows.append(f"BLAS: {env['blas']} | quantized matmul: {env['qmatmul']} | MLX {env['mlx']}")
    return "\n".join(rows)
