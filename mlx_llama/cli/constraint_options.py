"""`--json`, `--json-schema`, `--regex`, `--grammar`, `--choice`: constrained output on the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click

from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.constraints import (
    Grammar,
    choice_grammar,
    json_object_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
)

_NAMES = ("json_object", "json_schema", "regex", "grammar", "choice")


def constraint_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The output-constraint options; `grammar_from_options` reads them."""
    path = click.Path(dir_okay=False, path_type=Path)
    for option in reversed([
        click.option("--json", "json_object", is_flag=True, help="Output one JSON object."),
        click.option("--json-schema", type=path, metavar="FILE", help="Output JSON matching this JSON schema."),
        click.option("--regex", metavar="PATTERN", help="Output matching this regular expression in full."),
        click.option("--grammar", type=path, metavar="FILE", help="Output in the language of this Lark grammar."),
        click.option("--choice", metavar="A,B,...", help="Output exactly one of these comma-separated options."),
    ]):
        f = option(f)
    return f


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MlxLlamaError(f"cannot read {path}: {e}") from None


def grammar_from_options(opts: dict[str, Any]) -> Grammar | None:
    """Pops the constraint options from `opts`; the grammar they ask for, or None.

    Everything that can be checked without the tokenizer is checked here, before
    the model loads; `ConstraintCompiler.constraint` checks the rest.
    """
    given = {name: opts.pop(name) for name in _NAMES}
    chosen = [name for name, value in given.items() if value]
    if len(chosen) > 1:
        flags = ", ".join("--" + ("json" if n == "json_object" else n.replace("_", "-")) for n in chosen)
        raise MlxLlamaError(f"give at most one output constraint (got {flags})")
    if not chosen:
        return None
    name, value = chosen[0], given[chosen[0]]
    if name == "json_object":
        return json_object_grammar()
    if name == "json_schema":
        try:
            schema = json.loads(_read(value))
        except json.JSONDecodeError as e:
            raise MlxLlamaError(f"{value} is not JSON: {e}") from None
        return json_schema_grammar(schema)
    if name == "regex":
        return regex_grammar(value)
    if name == "grammar":
        return lark_grammar(_read(value))
    return choice_grammar([option.strip() for option in value.split(",")])
