"""`mlx-llama generate`: one prompt streamed to the terminal, or a prompts file to JSON."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from mlx_llama.backends import load_backend
from mlx_llama.cli.options import cache_kwargs, model_options, parse_ids, sampling_options, sampling_params
from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.loop import GenerationStats, generate_tokens
from mlx_llama.generation.sampler import Sampler
from mlx_llama.generation.prompt_cache import PromptCacheFile, refuse_foreign_file
from mlx_llama.generation.text import stream_text


def _prompt_ids(tokenizer: Any, prompt: str, system: str | None, raw: bool) -> list[int]:
    if raw:
        return tokenizer.encode(prompt, add_bos=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.encode_chat(messages)


def _write_json_atomically(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Batch mode: write [{input, output}, ...] here.")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@click.option("--system", help="System prompt.")
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
@click.option("--stop", "stop_strings", multiple=True, help="Stop at this string (repeatable).")
@click.option("--prompt-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Reuse the KV cache of the longest prompt prefix stored in this file, and store the prompt there.")
@sampling_options
@click.option("--verbose", "-v", is_flag=True, help="Print speed and memory statistics.")
def generate_command(model_path: str, backend: str, dtype: str | None, prompt: str | None,
                     prompt_ids: str | None, prompts_file: Path | None, output: Path | None, force: bool,
                     system: str | None, raw: bool, stop_strings: tuple[str, ...], verbose: bool,
                     prompt_cache: Path | None, **opts: Any) -> None:
    """Generate text from a prompt, or answer every line of a prompts file."""
    given = [x for x in (prompt, prompt_ids, prompts_file) if x is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --prompt, --prompt-ids or --prompts-file")
    if (output is None) != (prompts_file is None):
        raise MlxLlamaError("--prompts-file and --output go together")
    if output is not None and output.exists() and not force:
        raise MlxLlamaError(f"{output} exists; pass --force to overwrite it")
    if prompts_file is not None:
        try:
            prompts = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise MlxLlamaError(f"cannot read {prompts_file}: {e}") from None
        prompts = [p for p in prompts if p]
        if not prompts:
            raise MlxLlamaError(f"{prompts_file} holds no prompts")

    if prompt_cache is not None and (backend != "mlx" or prompt is None):
        raise click.UsageError("--prompt-cache works with --prompt on the mlx backend")
    if raw and system is not None:
        raise click.UsageError("--raw sends the prompt without the chat template, so it has no place for --system")
    if prompt_cache is not None:
        refuse_foreign_file(prompt_cache)

    model, tokenizer = load_backend(backend, model_path, dtype)
    params = sampling_params(opts, model.generation_config)
    max_tokens, cache_opts = opts["max_tokens"], cache_kwargs(opts)
    stats = GenerationStats()
    pc = PromptCacheFile(prompt_cache, model_path, model, lambda m: click.echo(m, err=True)) if prompt_cache else None

    if prompt_ids is not None:
        stop = tokenizer.stop_ids if tokenizer else model.config.eos_token_id
        tokens = generate_tokens(model, parse_ids(prompt_ids, model.config.vocab_size), max_tokens=max_tokens,
                                 sampler=Sampler(params), stop_ids=stop, stats=stats, **cache_opts)
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
                                     stop_ids=tokenizer.stop_ids, stats=stats, cache=cache, **cache_opts)
            yield from stream_text(tokens, tokenizer, stop_strings)
            if pc:
                pc.store(cache, ids)  # the cache's first len(ids) positions hold the prompt

        if prompts_file is None:
            for piece in answer(prompt):
                click.echo(piece, nl=False)
            click.echo()
            _notice_context_end(stats, max_tokens, model.config.max_position_embeddings)
        else:
            results = []
            with click.progressbar(prompts, label="generating", file=sys.stderr) as bar:
                for text in bar:
                    results.append({"input": text, "output": "".join(answer(text))})
            _write_json_atomically(output, results)
            click.echo(f"wrote {len(results)} predictions to {output}", err=True)
    if verbose:
        _print_stats(stats, backend)
