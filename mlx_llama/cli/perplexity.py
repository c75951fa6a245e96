"""`mlx-llama perplexity`: perplexity over a file in sliding windows; with --base, KL divergence and top-1 agreement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import click

from mlx_llama.cli.options import model_options
from mlx_llama.errors import MlxLlamaError
from mlx_llama.model_dir import ModelDir

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MlxLlamaError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise MlxLlamaError(f"{path} is empty: no tokens to score")
    return text


@click.command("perplexity")
@model_options
@click.option("-f", "--file", "text_file", type=_FILE, help="Text file, tokenized with the model's tokenizer (BOS first).")
@click.option("--ids", "ids_file", type=_FILE, help="Token ids file: integers separated by spaces, commas or newlines.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per window (one forward pass each).")
@click.option("--stride", type=int, default=None,
              help="Tokens between window starts; each window scores only tokens no earlier one scored "
                   "[default: ctx/2, so every scored token has >= ctx/2 tokens of context].")
@click.option("--base", "base_path", help="Base model directory (e.g. the float model): adds KL(base || model), "
                                          "top-1 agreement and Δ-perplexity on the same tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def perplexity_command(model_path: str, backend: str, dtype: str | None, text_file: Path | None,
                       ids_file: Path | None, ctx: int, stride: int | None, base_path: str | None,
                       as_json: bool) -> None:
    """Perplexity of a model over a file (sliding windows, as llama-perplexity / mlx_lm.perplexity)."""
    from tqdm import tqdm

    from mlx_llama.backends import load_backend
    from mlx_llama.tools import perplexity as ppl

    if (text_file is None) == (ids_file is None):
        raise MlxLlamaError("give exactly one of -f/--file (text) and --ids (token ids)")
    stride = ctx // 2 if stride is None else stride
    source = text_file or ids_file
    text = _read(source)  # type: ignore[arg-type]
    ids = ppl.read_ids(text, str(source)) if ids_file is not None else None
    config = ModelDir.open(model_path).config
    if base_path is not None:
        base_vocab = ModelDir.open(base_path).config.vocab_size
        if base_vocab != config.vocab_size:
            raise MlxLlamaError(f"the base model's vocabulary ({base_vocab} tokens) is not this model's "
                                f"({config.vocab_size}): KL needs the same tokens")
    model, tokenizer = load_backend(backend, model_path, dtype)
    if ids is None:
        if tokenizer is None:
            raise MlxLlamaError(f"{model_path} has no tokenizer.json: give token ids with --ids")
        ids = tokenizer.encode(text, add_bos=True)
    ppl.validate(ids, config.vocab_size, ctx, stride, config.max_position_embeddings)
    base = load_backend(backend, base_path, dtype)[0] if base_path is not None else None

    def progress(windows: Iterator[ppl.Window], total: int) -> Iterator[ppl.Window]:
        return tqdm(windows, total=total, desc="windows", unit="window", leave=False, disable=None)

    scores = ppl.score(model, ids, ctx, stride, base=base, progress=progress)
    figures = ppl.summary(scores)
    kernel = None
    if backend == "mlx" and config.quantization:
        from mlx_llama.kernels import extension

        kernel = extension.backend_name()
    if as_json:
        click.echo(json.dumps({"model": model_path, "base": base_path, "backend": backend, "kernel": kernel,
                               "input": str(source), "tokens": len(ids), "ctx": ctx, "stride": stride, **figures},
                              indent=2))
        return
    click.echo(f"{model_path} ({backend}{f', {kernel}' if kernel else ''}) on {source}: {len(ids)} tokens, "
               f"windows of {ctx} every {stride}" + (f"; base {base_path}" if base_path else ""))
    click.echo(ppl.format_table(figures))
