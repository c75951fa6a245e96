"""`mlx-llama serve`: the OpenAI-compatible HTTP server (mlx_llama.server) on the batched engine."""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from mlx_llama.cli.pipeline_options import join_pipeline, pipeline_options
from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.engine import EngineConfig

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class ByteSize(click.ParamType):
    """A byte count: 1073741824, 1G, 512M, 64K (powers of 1024)."""

    name = "bytes"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removesuffix("b").removesuffix("i")
        number, unit = (text[:-1], text[-1]) if text and text[-1] in _UNITS else (text, "")
        try:
            size = int(float(number) * _UNITS[unit])
        except (ValueError, OverflowError):  # not a number; infinity
            self.fail(f"{value!r} is not a byte size (e.g. 1073741824, 512M, 2G)", param, ctx)
        if size < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return size


def _api_key(key: str | None, key_file: Path | None) -> str | None:
    if key is not None and key_file is not None:
        raise MlxLlamaError("give --api-key or --api-key-file, not both")
    if key_file is not None:
        try:
            key = key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise MlxLlamaError(f"cannot read the API key file {key_file}: {e}") from None
        if not key:
            raise MlxLlamaError(f"the API key file {key_file} is empty")
    if key is not None and not key.strip():
        raise MlxLlamaError("--api-key is empty")
    return key


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command("serve")
@click.option("-m", "--model", "model_path", required=True, help="Model directory (HF or MLX layout).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Compute dtype [default: float32 on CPU, bfloat16 on GPU].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network: use --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--model-name", default=None, help="The model id clients send [default: the directory name].")
@click.option("--parallel", type=click.IntRange(1), default=4, show_default=True,
              help="Requests decoded together in one batch.")
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True,
              help="Requests that may wait for a slot; beyond them the server answers 429.")
@click.option("--max-tokens", "default_max_tokens", type=click.IntRange(1), default=2048, show_default=True,
              help="Tokens generated for a request that does not set max_tokens.")
@click.option("--max-kv-size", type=click.IntRange(1), default=None,
              help="Give each sequence a rotating KV cache of this many tokens (default: growing).")
@click.option("--kv-budget", type=ByteSize(), default="2G", show_default=True,
              help="KV cache bytes all running sequences may reserve together (each reserves prompt + max_tokens).")
@click.option("--prompt-cache-bytes", type=ByteSize(), default="512M", show_default=True,
              help="Bytes of prefix KV kept across requests (least recently used evicted; 0 disables).")
@click.option("--gap-target-ms", type=click.FloatRange(min=0), default=EngineConfig.gap_target_ms, show_default=True,
              help="Longest step (ms) a joining prompt may cause for the streams already decoding: "
                   "long prompts are prefilled in chunks that fit; 0: no limit (faster prefill, longer gaps).")
@click.option("--api-key", default=None, help="Require `Authorization: Bearer KEY` on every endpoint but /health.")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Read the API key from this file (keeps it out of the process list).")
@click.option("--cors-origins", multiple=True,
              help="Browser origins allowed to call the API, e.g. http://localhost:3000 (repeatable; * for any).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@pipeline_options
def serve_command(model_path: str, dtype: str | None, host: str, port: int, model_name: str | None,
                  parallel: int, max_queue: int, default_max_tokens: int, max_kv_size: int | None, kv_budget: int,
                  prompt_cache_bytes: int, gap_target_ms: float, api_key: str | None, api_key_file: Path | None,
                  cors_origins: tuple[str, ...], log_level: str, pipeline: bool, pipeline_timeout: float) -> None:
    """Serve a model over the OpenAI API (chat and text completions, streaming)."""
    import uvicorn

    from mlx_llama.generation.engine import Engine
    from mlx_llama.loader import load
    from mlx_llama.server.app import create_app
    from mlx_llama.server.metrics import ServerMetrics
    from mlx_llama.server.prompts import ServedModel
    from mlx_llama.server import structured
    from mlx_llama.server.worker import EngineWorker

    loaded = None
    if pipeline:
        # The other ranks hold no copies of rank 0's cached prefixes: no prefix cache (yet) over a pipeline.
        source = click.get_current_context().get_parameter_source("prompt_cache_bytes")
        if source is not ParameterSource.DEFAULT and prompt_cache_bytes:
            raise MlxLlamaError("--prompt-cache-bytes does not work with --pipeline")
        prompt_cache_bytes = 0
    config = EngineConfig(max_batch=parallel, kv_budget_bytes=kv_budget, max_queue=max_queue,
                          max_kv_size=max_kv_size, prefix_cache_bytes=prompt_cache_bytes,
                          gap_target_ms=gap_target_ms or None)
    config.validate()
    if pipeline:
        # Joined before the key file is read: only rank 0 serves HTTP.
        loaded = join_pipeline(model_path, dtype, pipeline_timeout, verbose=False, wait_idle=True)
        if loaded is None:
            return  # a rank > 0: it ran its layers until rank 0 stopped
    key = _api_key(api_key, api_key_file)
    if key is None and not _is_loopback(host):
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it",
                   err=True)
    model, tokenizer = loaded if loaded is not None else load(model_path, dtype)
    served = ServedModel(
        name=model_name or Path(model_path).resolve().name, tokenizer=tokenizer,
        context_length=model.config.max_position_embeddings, default_max_tokens=default_max_tokens,
        vocab_size=model.config.vocab_size,
        eos_ids=frozenset(model.config.eos_token_id), created=int(time.time()),
        generation_config=model.generation_config,
        shared_prefix=config.prefill_chunk if prompt_cache_bytes > 0 else None,
    )
    structured.prepare(tokenizer, model.config.vocab_size)  # response_format's matcher, built meanwhile
    metrics = ServerMetrics()
    if pipeline:
        from mlx_llama.distributed.serving import PipelineEngineWorker

        worker: EngineWorker = PipelineEngineWorker(Engine(model, config), model.pipeline, on_step=metrics.on_step)
    else:
        worker = EngineWorker(Engine(model, config), on_step=metrics.on_step)
    app = create_app(served, worker, metrics, api_key=key, cors_origins=cors_origins)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s")
    click.echo(f"serving {served.name} at http://{host}:{port}/v1 ({parallel} in parallel)", err=True)
    # uvicorn owns SIGINT/SIGTERM: it stops accepting, lets open requests finish (up to
    # the grace period), then the app's lifespan stops the engine thread.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
