"""`--pipeline` for the commands that run a model (generate, chat, serve): the options, and joining the pipeline."""

from __future__ import annotations

import sys
from typing import Any, Callable

import click

from mlx_llama.interfaces import TokenizerLike


def pipeline_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--pipeline` and `--pipeline-timeout`."""
    f = click.option("--pipeline-timeout", type=click.FloatRange(min=1), default=120, show_default=True,
                     help="With --pipeline: exit with an error when the other ranks are silent this many seconds.")(f)
    return click.option("--pipeline", is_flag=True,
                        help="Split the layers across the ranks of `mlx.launch` (pipeline parallelism); "
                             "rank 0 alone reads the input and answers.")(f)


def join_pipeline(model_path: str, dtype: str | None, timeout: float, verbose: bool,
                  wait_idle: bool = False) -> tuple[Any, TokenizerLike | None] | None:
    """Rank 0: `(model, tokenizer)` that run through the whole pipeline.  Other ranks: serve, then None.

    Call it before reading any input file: only rank 0 reads them (the other hosts need not have them).
    `wait_idle`: the other ranks wait for rank 0 without a time limit between steps (chat, serve).
    """
    from mlx_llama.distributed.pipeline import PipelineModel, start_pipeline

    pipe, checkpoint, tokenizer = start_pipeline(model_path, dtype, timeout)
    report = (lambda: click.echo(pipe.describe(), err=True)) if verbose else (lambda: None)
    if pipe.group.rank > 0:
        pipe.serve(wait_idle)
        report()
        return None
    ctx = click.get_current_context()
    ctx.call_on_close(report)
    # Runs first (last registered), also when the command fails: click closes the context while the
    # exception propagates, so sys.exc_info() tells the other ranks whether to exit with an error.
    ctx.call_on_close(lambda: pipe.stop(aborted=sys.exc_info()[0] is not None))
    model_dir = checkpoint.model_dir
    model = PipelineModel(pipe, model_dir.path, model_dir.generation_config)
    return model, tokenizer
