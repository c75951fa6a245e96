"""Options shared by the commands, declared once: the model, the compute dtype, the KV cache, sampling."""

from __future__ import annotations

import math
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


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite: click.FloatRange lets NaN through (every comparison is False)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


# --max-kv-size, --keep, --prefill-step-size: how the KV cache is built and filled.
cache_options = _stack(
    click.option("--max-kv-size", type=click.IntRange(min=2), default=None,
                 help="Bound the KV cache to this many tokens (rotating cache)."),
    click.option("--keep", type=click.IntRange(min=0), default=4, show_default=True,
                 help="With --max-kv-size: leading tokens that are never evicted."),
    click.option("--prefill-step-size", type=click.IntRange(min=1), default=512, show_default=True,
                 help="Prompt tokens processed per forward pass."),
)

# Sampling flags, named as in mlx-lm and llama.cpp, plus the cache options.
sampling_options = _stack(
    click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=256, show_default=True,
                 help="Most tokens to generate per answer."),
    click.option("--temp", "temperature", type=FiniteFloat(min=0), default=None,
                 help="Sampling temperature; 0 is greedy [default: the model's generation_config, else 0]."),
    click.option("--top-p", type=FiniteFloat(min=0, max=1, min_open=True), default=None,
                 help="Nucleus sampling mass [default: generation_config, else 1]."),
    click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Keep the k most likely tokens (0: all)."),
    click.option("--min-p", type=FiniteFloat(min=0, max=1, max_open=True), default=0.0, show_default=True,
                 help="Drop tokens below min-p × the top probability."),
    click.option("--repetition-penalty", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True),
    click.option("--repetition-context-size", type=click.IntRange(min=1), default=20, show_default=True,
                 help="How many recent tokens the repetition penalty looks at."),
    click.option("--presence-penalty", type=FiniteFloat(min=-2, max=2), default=0.0, show_default=True,
                 help="OpenAI's: subtract this from the logit of every token already generated."),
    click.option("--frequency-penalty", type=FiniteFloat(min=-2, max=2), default=0.0, show_default=True,
                 help="OpenAI's: subtract this per time a token was already generated."),
    click.option("--seed", type=click.IntRange(min=0), default=None,
                 help="Seed for reproducible sampling (any non-negative integer: NumPy's generator takes them all)."),
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
        presence_penalty=opts["presence_penalty"], frequency_penalty=opts["frequency_penalty"], seed=opts["seed"],
    )
    params.validate()
    return params


def cache_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """max_kv_size, keep and prefill_step_size for `generate_tokens` / `ChatSession`."""
    return {k: opts[k] for k in ("max_kv_size", "keep", "prefill_step_size")}


def parse_ids(text: str, vocab_size: int) -> list[int]:
    """--prompt-ids: integers separated by commas or spaces, each a token of the model's vocabulary."""
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise MlxLlamaError(f"--prompt-ids must be integers separated by commas or spaces: {text!r}") from None
    if not ids:
        raise MlxLlamaError("--prompt-ids is empty")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise MlxLlamaError(f"--prompt-ids: {bad[0]} is not a token id of this model (ids run from 0 to {vocab_size - 1})")
    return ids
