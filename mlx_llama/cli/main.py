"""The `mlx-llama` command line: a click group whose commands live in their own modules.

Commands are imported when they run, so `mlx-llama --help` (and a typo) answers
without loading MLX.
"""

from __future__ import annotations

import importlib
import sys

import click

from mlx_llama.errors import MlxLlamaError
from mlx_llama.kernels import blas

# name → (module:attribute, the one-line help `mlx-llama --help` shows)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("mlx_llama.convert.command:convert_command",
                "Convert a Hugging Face checkpoint (repo id or folder) to MLX, quantized to 2-8 bits."),
    "generate": ("mlx_llama.cli.generate:generate_command",
                 "Generate text from a prompt, or answer every line of a prompts file."),
    "chat": ("mlx_llama.cli.chat:chat_command", "Chat with a model; the KV cache is kept between turns."),
    "check": ("mlx_llama.cli.check:check_command", "Compare the MLX model with the NumPy reference."),
    "perplexity": ("mlx_llama.cli.perplexity:perplexity_command",
                   "Perplexity over a file; with --base, KL divergence and top-1 agreement vs a base model."),
    "bench": ("mlx_llama.cli.bench:bench_command", "Measure prefill (pp) and decode (tg) tok/s, llama-bench style."),
    "info": ("mlx_llama.cli.info:info_command", "Show versions, device, BLAS, quantized-matmul kernel, CPU."),
    "demo": ("mlx_llama.cli.demo:demo_command",
             "Random checkpoint → convert → generate → cross-check, offline."),
    "serve": ("mlx_llama.cli.serve:serve_command",
              "Serve a model over the OpenAI API (chat and text completions, streaming)."),
}


class _Group(click.Group):
    """Loads commands on use; turns user errors into one-line messages and a non-zero exit."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in COMMANDS.items()])

    def invoke(self, ctx: click.Context):
        try:
            blas.check_env()
            return super().invoke(ctx)
        except click.UsageError as e:
            e.ctx = None  # one line, "Error: ...", without the usage block (exit status 2 stays)
            raise
        except MlxLlamaError as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except OSError as e:  # the file system refused something a check did not foresee (name too long, ...)
            name = str(e.filename) if e.filename is not None else ""
            name = name if len(name) <= 80 else name[:77] + "..."
            raise click.ClickException(f"{name + ': ' if name else ''}{e.strerror or e}") from None
        except MemoryError:
            raise click.ClickException("out of memory: the model (or its context) does not fit in RAM") from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-llama")
def main() -> None:
    """Run LLaMA-3 models locally with MLX: convert, generate, chat, benchmark."""
