"""`mlx-llama bench`: prefill/decode tok/s, TTFT, memory and bandwidth, llama-bench style."""

from __future__ import annotations

import json

import click

from mlx_llama.cli.options import dtype_option, model_option


@click.command("bench")
@model_option
@click.option("-p", "--n-prompt", type=int, default=512, show_default=True, help="Prompt tokens (random ids).")
@click.option("-g", "--n-gen", type=int, default=128, show_default=True, help="Tokens to generate.")
@click.option("-r", "--repetitions", type=int, default=3, show_default=True, help="Measured repetitions.")
@click.option("-t", "--threads", type=int, default=None, help="OpenBLAS threads [default: all cores].")
@dtype_option
@click.option("--prefill-step-size", type=int, default=512, show_default=True,
              help="Prompt tokens per forward pass.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random prompt ids.")
@click.option("--no-warmup", is_flag=True, help="Skip the short warm-up run.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_command(model_path: str, n_prompt: int, n_gen: int, repetitions: int, threads: int | None,
                  dtype: str | None, prefill_step_size: int, seed: int, no_warmup: bool, as_json: bool) -> None:
    """Measure prompt (pp) and generation (tg) throughput of a model on random token ids."""
    from mlx_llama.kernels import blas
    from mlx_llama.tools.bench import format_table, run_bench
    from mlx_llama.loader import load_model

    if threads is not None:
        if threads < 1:
            raise click.BadParameter("must be >= 1", param_hint="--threads")
        blas.set_threads(threads)
    model = load_model(model_path, dtype)
    result = run_bench(model, n_prompt, n_gen, repetitions, seed=seed, prefill_step=prefill_step_size,
                       warmup=not no_warmup)
    result["threads"] = threads or blas.info().threads or None
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_table(result, threads))
