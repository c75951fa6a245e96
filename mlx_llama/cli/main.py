"""The `mlx-llama` command line: a click group whose commands live in their own modules."""

from __future__ import annotations

import sys

import click

from mlx_llama.errors import MlxLlamaError


class _Group(click.Group):
    """Turns user errors into one-line messages and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MlxLlamaError as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-llama")
def main() -> None:
    """Run LLaMA-3 models locally with MLX: convert, generate, chat, benchmark."""


# Each command lives in its own module; importing them here registers them.
from mlx_llama.cli.bench import bench_command  # noqa: E402
from mlx_llama.cli.chat import chat_command  # noqa: E402
from mlx_llama.cli.check import check_command  # noqa: E402
from mlx_llama.convert.command import convert_command  # noqa: E402
from mlx_llama.cli.demo import demo_command  # noqa: E402
from mlx_llama.cli.generate import generate_command  # noqa: E402
from mlx_llama.cli.info import info_command  # noqa: E402
from mlx_llama.cli.serve import serve_command  # noqa: E402

for _command in (convert_command, generate_command, chat_command, check_command, bench_command,
                 info_command, demo_command, serve_command):
    main.add_command(_command)
