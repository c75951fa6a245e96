"""`mlx-llama generate`: one prompt streamed to the terminal, or a prompts file to JSON."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from mlx_llama.backends import load_backend
from mlx_llama.cli.batch_output import BatchOutput
from mlx_llama.cli.constraint_options import constraint_options, grammar_from_options
from mlx_llama.cli.pipeline_options import join_pipeline, pipeline_options
from mlx_llama.cli.options import cache_kwargs, model_options, parse_ids, sampling_options, sampling_params
from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.batch import DEFAULT_BATCH_SIZE, BatchResult, batch_generate
from mlx_llama.generation.constraints import ConstraintCompiler
from mlx_llama.generation.engine import EngineConfig
from mlx_llama.generation.loop import GenerationStats, generate_tokens
from mlx_llama.generation.sampler import Sampler
from mlx_llama.generation.prompt_cache import PromptCacheFile, refuse_foreign_file
from mlx_llama.generation.text import stream_text


def _prompt_ids(tokenizer: Any, prompt: str, system: str | None, raw: bool) -> list[int]:
    if raw:
        return tokenizer.encode(prompt, add_bos=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.encode_chat(messages)


def _print_stats(stats: GenerationStats, backend: str) -> None:
    if backend == "mlx":
        memory = f"peak memory: {stats.peak_memory_bytes / 1e9:.3f} GB"
    else:  # NumPy allocations are not counted by MLX: report what the process holds
        from mlx_llama.tools.bench import rss_bytes

        memory = f"peak RSS: {rss_bytes()[1] / 1e9:.3f} GB"
    click.echo(
        f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.2f} tok/s | "
        f"generation: {stats.generation_tokens} tokens, {stats.generation_tps:.2f} tok/s | {memory}",
        err=True,
    )


def _notice_context_end(stats: GenerationStats, max_tokens: int, context: int) -> None:
    """Say so when the answer stopped because the model's context was full, not at -n."""
    if stats.finish_reason == "length" and stats.generation_tokens < max_tokens:
        click.echo(f"[stopped after {stats.generation_tokens} tokens: the model's context ({context} tokens) "
                   "is full; --max-kv-size N allows longer outputs]", err=True)


@click.command("generate")
@model_options
@click.option("-p", "--prompt", help="The prompt (chat-templated unless --raw).")
@click.option("--prompt-ids", help="Token ids instead of text, e.g. '1,5,9' (for models without a tokenizer).")
@click.option("--prompts-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Batch mode: one prompt per line.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Batch mode: write [{input, output}, ...] here ('-': stdout).")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Batch mode: prompts decoded together.")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@click.option("--system", help="System prompt.")
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
@click.option("--stop", "stop_strings", multiple=True, help="Stop at this string (repeatable).")
@click.option("--prompt-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Reuse the KV cache of the longest prompt prefix stored in this file, and store the prompt there.")
@sampling_options
@pipeline_options
@constraint_options
@click.option("--verbose", "-v", is_flag=True, help="Print speed and memory statistics.")
def generate_command(model_path: str, backend: str, dtype: str | None, prompt: str | None,
                     prompt_ids: str | None, prompts_file: Path | None, output: Path | None, batch_size: int,
                     force: bool,
                     system: str | None, raw: bool, stop_strings: tuple[str, ...], verbose: bool,
                     prompt_cache: Path | None, pipeline: bool, pipeline_timeout: float, **opts: Any) -> None:
    """Generate text from a prompt, or answer every line of a prompts file."""
    given = [x for x in (prompt, prompt_ids, prompts_file) if x is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --prompt, --prompt-ids or --prompts-file")
    if (output is None) != (prompts_file is None):
        raise MlxLlamaError("--prompts-file and --output go together")
    if prompts_file is not None and backend != "mlx":
        raise MlxLlamaError("batch mode (--prompts-file) runs on the mlx backend")
    if prompt_cache is not None and (backend != "mlx" or prompt is None):
        raise click.UsageError("--prompt-cache works with --prompt on the mlx backend")
    if raw and system is not None:
        raise click.UsageError("--raw sends the prompt without the chat template, so it has no place for --system")

    loaded = None
    if pipeline:
        if backend != "mlx" or prompt_cache is not None:
            raise MlxLlamaError("--pipeline works with --prompt, --prompt-ids or --prompts-file on the mlx backend")
        loaded = join_pipeline(model_path, dtype, pipeline_timeout, verbose)
        if loaded is None:
            return  # a rank > 0: it served its layers until rank 0 finished

    if prompts_file is not None:
        batch_out = BatchOutput(output, force)
        try:
            # Lines are kept as written (no stripping) and in place: an empty line gets an empty answer.
            prompts = prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise MlxLlamaError(f"cannot read {prompts_file}: {e}") from None
        if not any(prompts):
            raise MlxLlamaError(f"{prompts_file} holds no prompts")
    if prompt_cache is not None:
        refuse_foreign_file(prompt_cache)
    grammar = grammar_from_options(opts)
    if grammar is not None and prompts_file is not None:
        raise MlxLlamaError("output constraints (--json, --regex, ...) work with --prompt or --prompt-ids")

    model, tokenizer = loaded if loaded is not None else load_backend(backend, model_path, dtype)
    params = sampling_params(opts, model.generation_config)
    max_tokens, cache_opts = opts["max_tokens"], cache_kwargs(opts)
    stats = GenerationStats()
    pc = PromptCacheFile(prompt_cache, model_path, model, lambda m: click.echo(m, err=True)) if prompt_cache else None
    if grammar is not None and tokenizer is None:
        raise MlxLlamaError(f"{model_path} has no tokenizer.json, which output constraints need")
    # Built (and refused, if it cannot be enforced) before any token is generated.
    constraint = ConstraintCompiler(tokenizer, model.config.vocab_size).constraint(grammar) if grammar else None

    if prompt_ids is not None:
        stop = tokenizer.stop_ids if tokenizer else model.config.eos_token_id
        tokens = generate_tokens(model, parse_ids(prompt_ids, model.config.vocab_size), max_tokens=max_tokens,
                                 sampler=Sampler(params), stop_ids=stop, stats=stats, constraint=constraint,
                                 **cache_opts)
        for tok in tokens:
            click.echo(tok)
        _notice_context_end(stats, max_tokens, model.config.max_position_embeddings)
    else:
        if tokenizer is None:
            raise MlxLlamaError(f"{model_path} has no tokenizer.json: use --prompt-ids")

        def answer(text: str) -> Any:
            ids = _prompt_ids(tokenizer, text, system, raw)
            cache, feed = pc.start(ids, cache_opts["max_kv_size"], cache_opts["keep"]) if pc else (None, ids)
            tokens = generate_tokens(model, feed, max_tokens=max_tokens, sampler=Sampler(params),
                                     stop_ids=tokenizer.stop_ids, stats=stats, cache=cache, constraint=constraint,
                                     **cache_opts)
            yield from stream_text(tokens, tokenizer, stop_strings)
            if pc:
                pc.store(cache, ids)  # the cache's first len(ids) positions hold the prompt

        if prompts_file is None:
            for piece in answer(prompt):
                click.echo(piece, nl=False)
            click.echo()
            _notice_context_end(stats, max_tokens, model.config.max_position_embeddings)
            if constraint is not None and stats.finish_reason == "length":
                click.echo("the output was cut at --max-tokens before the constraint was complete", err=True)
        else:
            ids = [_prompt_ids(tokenizer, text, system, raw) if text else [] for text in prompts]
            # Chunks of --prefill-step-size, as `generate -p` feeds them: an answer here is the one
            # `generate -p` gives for that prompt (bit for bit where the kernels are batch-invariant).
            step = cache_opts["prefill_step_size"]
            engine = EngineConfig(max_batch=batch_size, max_queue=len(prompts), max_kv_size=cache_opts["max_kv_size"],
                                  keep=cache_opts["keep"], prefill_chunk=step,
                                  prefill_tokens_per_step=max(step, EngineConfig.prefill_tokens_per_step),
                                  gap_target_ms=None)  # offline: prompts load at full speed
            _run_batch(model, tokenizer, prompts, ids, batch_out, engine,
                       max_tokens=max_tokens, sampling=params, stop_strings=stop_strings)
    if verbose and prompts_file is None:
        _print_stats(stats, backend)


def _run_batch(model: Any, tokenizer: Any, prompts: list[str], ids: list[list[int]], out: BatchOutput,
               engine: EngineConfig, **kw: Any) -> None:
    """Answer every prompt on the batched engine, with a progress bar and tok/s on stderr."""
    bar = tqdm(total=len(prompts), unit="prompt", file=sys.stderr, dynamic_ncols=True)
    start, produced = time.perf_counter(), 0

    def on_result(i: int, result: BatchResult) -> None:
        out.add(i, prompts[i], result.text or "")
        bar.update(1)

    def on_tokens(n: int) -> None:
        nonlocal produced
        produced += n
        bar.set_postfix_str(f"{produced / (time.perf_counter() - start):.1f} tok/s", refresh=False)

    try:
        results = batch_generate(model, ids, tokenizer=tokenizer, config=engine, on_result=on_result,
                                 on_tokens=on_tokens, **kw)
    except BaseException:
        bar.close()
        click.echo(out.failed(len(prompts)), err=True)
        raise
    bar.close()
    seconds = time.perf_counter() - start
    out.finish([{"input": text, "output": r.text or ""} for text, r in zip(prompts, results)])
    where = "" if out.to_stdout else f"wrote {len(results)} predictions to {out.path}; "
    click.echo(f"{where}{produced} tokens in {seconds:.1f} s ({produced / seconds:.1f} tok/s)", err=True)
