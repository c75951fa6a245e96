"""`mlx-llama bench`: prefill/decode tok/s, TTFT, memory and bandwidth, llama-bench style."""

from __future__ import annotations

import itertools
import json
from typing import Any

import click

from mlx_llama.cli.info import available_cores
from mlx_llama.cli.options import dtype_option, model_option
from mlx_llama.threads import thread_pools


class IntList(click.ParamType):
    """Comma-separated integers of at least `min`, as llama-bench takes for -p, -n and -t."""

    name = "N[,N...]"

    def __init__(self, min: int) -> None:
        self.min = min

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            numbers = [int(v) for v in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        low = [n for n in numbers if n < self.min]
        if low:
            self.fail(f"{low[0]} is below the minimum {self.min}", param, ctx)
        return list(dict.fromkeys(numbers))  # each value once, in the order given


@click.command("bench")
@model_option
@click.option("-p", "--n-prompt", type=IntList(min=1), default="512", show_default=True,
              help="Prompt tokens (random ids); a list like 16,32 runs each.")
@click.option("-n", "-g", "--n-gen", type=IntList(min=2), default="128", show_default=True,
              help="Tokens to generate; a list runs each.")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=3, show_default=True,
              help="Measured repetitions.")
@click.option("-t", "--threads", type=IntList(min=1), default=None,
              help="Threads for OpenBLAS and the quantized-matmul kernels; a list runs each [default: all cores].")
@dtype_option
@click.option("--prefill-step-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt tokens per forward pass.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed for the random prompt ids.")
@click.option("--no-warmup", is_flag=True, help="Skip the short warm-up run.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the results as JSON (one object; a list of them when -p/-n/-t list several).")
def bench_command(model_path: str, n_prompt: list[int], n_gen: list[int], repetitions: int,
                  threads: list[int] | None, dtype: str | None, prefill_step_size: int, seed: int,
                  no_warmup: bool, as_json: bool) -> None:
    """Measure prompt (pp) and generation (tg) throughput of a model on random token ids."""
    from mlx_llama.kernels import blas
    from mlx_llama.tools.bench import format_table, run_bench
    from mlx_llama.loader import load_model

    cores = available_cores()
    if threads is not None and max(threads) > cores:
        click.echo(f"[-t: this process may use {cores} cores; thread counts above it run as {cores}]", err=True)
        threads = list(dict.fromkeys(min(t, cores) for t in threads))
    model = load_model(model_path, dtype)
    results = []
    with thread_pools() as set_threads:
        for t, p, n in itertools.product(threads or [None], n_prompt, n_gen):
            if t is not None:
                set_threads(t)
            result = run_bench(model, p, n, repetitions, seed=seed, prefill_step=prefill_step_size,
                               warmup=not no_warmup)
            result["threads"] = t or blas.info().threads or None
            results.append(result)
    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        click.echo(format_table(results))
