"""`mlx-llama check`: run the MLX model and the NumPy reference on one prompt and compare.

By default the exact quantized-matmul kernel is compared at a float32
tolerance (a real bug shows), and the default kernel's extra deviation from it
is a separate line with its own bound; `--kernel default` compares the
default kernel with the reference directly, at that bound.
"""

from __future__ import annotations

import click
import numpy as np

from mlx_llama.kernels import extension
from mlx_llama.tools.check import KERNEL_DEVIATION_BOUND, TOLERANCES, compare
from mlx_llama.errors import MlxLlamaError
from mlx_llama.cli.options import cache_options, dtype_option, model_option, parse_ids
from mlx_llama.loader import default_dtype, load_model
from mlx_llama.reference.model import NUMPY_DTYPES, load_numpy_model
from mlx_llama.tokenizer import Tokenizer

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time,"


def _default_ids(vocab: int, bos: int | None, n: int = 24) -> list[int]:
    """A fixed pseudo-random prompt for models without a tokenizer."""
    ids = np.random.default_rng(0).integers(0, vocab, n).tolist()
    return ([bos] if bos is not None and 0 <= bos < vocab else []) + ids


@click.command("check")
@model_option
@click.option("-p", "--prompt", help="Prompt text (encoded raw, with BOS) [default: a fixed sentence].")
@click.option("--prompt-ids", help="Token ids instead of text, e.g. '1,5,9'.")
@click.option("--tokens", "-n", type=int, default=16, show_default=True,
              help="Greedy tokens to decode one at a time after the prompt.")
@cache_options
@dtype_option
@click.option("--reference-dtype", type=click.Choice(list(NUMPY_DTYPES)), default="float32", show_default=True,
              help="NumPy compute dtype (float64: a high-precision oracle).")
@click.option("--kernel", type=click.Choice(["exact", "default"]), default="exact", show_default=True,
              help="Quantized-matmul kernel compared with the reference: exact (float32 activations, at the "
                   "dtype's tolerance; then the default kernel's extra deviation is reported, bound "
                   f"{KERNEL_DEVIATION_BOUND:g}) or default ($MLX_LLAMA_QMM, else the built-in default; "
                   f"quantized models then get tolerance {KERNEL_DEVIATION_BOUND:g}).")
@click.option("--tolerance", type=float, default=None,
              help="Relative tolerance for logits and hidden states "
                   f"[default by MLX dtype: {', '.join(f'{k} {v:g}' for k, v in TOLERANCES.items())}].")
def check_command(model_path: str, prompt: str | None, prompt_ids: str | None, tokens: int,
                  max_kv_size: int | None, keep: int, prefill_step_size: int, dtype: str | None,
                  reference_dtype: str, kernel: str, tolerance: float | None) -> None:
    """Compare the MLX backend with the NumPy reference; exit 1 if they disagree beyond tolerance."""
    if prompt is not None and prompt_ids is not None:
        raise MlxLlamaError("give at most one of --prompt and --prompt-ids")
    if tokens < 0:
        raise MlxLlamaError("--tokens must be >= 0")
    if prefill_step_size < 1:
        raise MlxLlamaError("prefill step size must be >= 1")
    dtype = dtype or default_dtype()
    mlx_model = load_model(model_path, dtype)
    numpy_model = load_numpy_model(model_path, reference_dtype)
    cfg = mlx_model.config
    if prompt_ids is not None:
        ids = parse_ids(prompt_ids, cfg.vocab_size)
    else:
        tokenizer = Tokenizer.from_dir(mlx_model.path, cfg, mlx_model.generation_config)
        if tokenizer is None:
            if prompt is not None:
                raise MlxLlamaError(f"{model_path} has no tokenizer.json: use --prompt-ids")
            ids = _default_ids(cfg.vocab_size, cfg.bos_token_id)
        else:
            ids = tokenizer.encode(prompt if prompt is not None else DEFAULT_PROMPT, add_bos=True)
    if not ids:
        raise MlxLlamaError("the prompt is empty")
    if any(not 0 <= i < cfg.vocab_size for i in ids):
        raise MlxLlamaError(f"prompt ids must be in [0, {cfg.vocab_size})")
    quantized = bool(cfg.quantization)
    if tolerance is None:
        tolerance = TOLERANCES[dtype]
        if quantized and kernel == "default":
            tolerance = max(tolerance, KERNEL_DEVIATION_BOUND)
    # Float models run no quantized matmul: the kernel mode does not apply.
    deviation_bound = KERNEL_DEVIATION_BOUND if quantized and kernel == "exact" else None
    with extension.using_mode("exact" if kernel == "exact" else None):
        described = f", quantized matmul: {extension.backend_name()}" if quantized else ""
        report = compare(mlx_model, numpy_model, ids, tokens=tokens, max_kv_size=max_kv_size, keep=keep,
                         prefill_step_size=prefill_step_size, tolerance=tolerance,
                         default_kernel_bound=deviation_bound)
    click.echo(f"mlx ({dtype}{described}) vs numpy ({reference_dtype}) on {model_path}")
    for line in report.lines():
        click.echo(line)
    if not report.passed:
        raise SystemExit(1)
