"""Options shared by the commands, declared once: the model, the compute dtype, the KV cache, sampling."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import click

from mlx_llama.backends import BACKENDS
from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.sampler import SamplingParams
from mlx_llama.loader import DTYPES


def _stack(*options: Callable) -> Callable[[Callable], Callable]:
    def apply(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f
    return apply


model_option = click.option("-m", "--model", "model_path", required=True, help="Model directory (HF or MLX layout).")
dtype_option = click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
                            help="Compute dtype [default: float32 on CPU, bfloat16 on GPU].")
backend_option = click.option("--backend", type=click.Choice(BACKENDS), default="mlx", show_default=True,
                              help="Implementation that runs the model.")

# -m/--model, --backend, --dtype
model_options = _stack(model_option, backend_option, dtype_option)

# --max-kv-size, --keep, --prefill-step-size: how the KV cache is built and filled.
cache_options = _stack(
    click.option("--max-kv-size", type=int, default=None,
                 help="Bound the KV cache to this many tokens (rotating cache)."),
    click.option("--keep", type=int, default=4, show_default=True,
                 help="With --max-kv-size: leading tokens that are never evicted."),
    click.option("--prefill-step-size", type=int, default=512, show_default=True,
                 help="Prompt tokens processed per forward pass."),
)

# Sampling flags, named as in mlx-lm and llama.cpp, plus the cache options.
sampling_options = _stack(
    click.option("--max-tokens", "-n", type=int, default=256, show_default=True,
                 help="Most tokens to generate per answer."),
    click.option("--temp", "temperature", type=float, default=None,
                 help="Sampling temperature; 0 is greedy [default: the model's generation_config, else 0]."),
    click.option("--top-p", type=float, default=None, help="Nucleus sampling mass [default: generation_config, else 1]."),
    click.option("--top-k", type=int, default=0, show_default=True, help="Keep the k most likely tokens (0: all)."),
    click.option("--min-p", type=float, default=0.0, show_default=True,
                 help="Drop tokens below min-p × the top probability."),
    click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
    click.option("--repetition-context-size", type=int, default=20, show_default=True,
                 help="How many recent tokens the repetition penalty looks at."),
    click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
    cache_options,
)


def sampling_params(opts: dict[str, Any], generation_config: Mapping[str, Any]) -> SamplingParams:
    """The sampling spec from the flags, filling unset --temp/--top-p from generation_config.json."""
    sample = bool(generation_config.get("do_sample", False))
    temperature = opts["temperature"]
    if temperature is None:
        temperature = float(generation_config.get("temperature", 1.0)) if sample else 0.0
    top_p = opts["top_p"]
    if top_p is None:
        top_p = float(generation_config.get("top_p", 1.0)) if sample else 1.0
    params = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=opts["top_k"], min_p=opts["min_p"],
        repetition_penalty=opts["repetition_penalty"], repetition_context_size=opts["repetition_context_size"],
        seed=opts["seed"],
    )
    params.validate()
    return params


def cache_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """max_kv_size, keep and prefill_step_size for `generate_tokens` / `ChatSession`."""
    return {k: opts[k] for k in ("max_kv_size", "keep", "prefill_step_size")}


def parse_ids(text: str) -> list[int]:
    """--prompt-ids: integers separated by commas or spaces."""
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise MlxLlamaError(f"--prompt-ids must be integers separated by commas or spaces: {text!r}") from None
