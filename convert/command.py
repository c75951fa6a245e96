"""The `mlx-llama convert` click command."""

from __future__ import annotations

import click

from mlx_llama.errors import MlxLlamaError
from mlx_llama.loader import DTYPES

from .pipeline import convert_with_report
from .quantize import BITS, GROUP_SIZES, RECIPES


@click.command("convert")
@click.argument("source")
@click.option("-o", "--out-dir", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output directory [default: ./<name>-<4bit|recipe|dtype>].")
@click.option("--bits", type=click.Choice([str(b) for b in BITS]), default=None,
              help="Bits per weight for affine quantization [default: 4].")
@click.option("--group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default="64",
              show_default=True, help="Weights sharing one scale and bias.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Float dtype of unquantized weights, scales and biases [default: the source's].")
@click.option("--no-quantize", is_flag=True, help="Write float weights (--dtype) only.")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
              help="Mixed precision in the spirit of llama.cpp's Q4_K_M: output layer and some "
                   "v_proj/down_proj at the higher bits, the rest at the lower.")
@click.option("--revision", default=None, help="Hub branch, tag or commit (hub repos only).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists (only once the new one is complete).")
def convert_command(source: str, out_dir: str | None, bits: str | None, group_size: str, dtype: str | None,
                    no_quantize: bool, recipe: str | None, revision: str | None, force: bool) -> None:
    """Convert SOURCE, a Hugging Face repo id or a local HF-layout directory, to MLX.

    Reads safetensors only (pickle checkpoints are refused), streams tensor by
    tensor with bounded memory, and writes mlx-lm's layout, which mlx-lm loads too.
    """
    def log(msg: str) -> None:
        click.echo(msg, err=True)

    try:
        if no_quantize and (bits or recipe):
            raise MlxLlamaError("--no-quantize writes float weights; drop --bits/--recipe")
        if bits and recipe:
            raise MlxLlamaError(f"--recipe {recipe} sets the bits itself; drop --bits")
        report = convert_with_report(
            source, out_dir, bits=int(bits or 4), group_size=int(group_size), dtype=dtype,
            quantize=not no_quantize, recipe=recipe, revision=revision, force=force, log=log,
        )
    except MlxLlamaError as e:  # the group does this too; kept so the command stands alone
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    for line in report.lines():
        click.echo(line)
