"""The one place that decides what `response_format`, `tools` and `functions` do.

`response_format` {"type": "json_object"} and {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}} become a grammar constraint the
engine applies to every token (generation.constraints), so the answer parses
and validates, or ends with finish_reason "length".  A schema the matcher cannot
enforce is a 400 before anything is generated; so is anything else asked of the
output that we cannot honour (tool calling is not built yet).
"""

from __future__ import annotations

import threading
from typing import Any

from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.constraints import ConstraintCompiler, Grammar, json_object_grammar, json_schema_grammar
from mlx_llama.generation.requests import TokenConstraint
from mlx_llama.server.errors import ApiError
from mlx_llama.server.schemas import ChatCompletionRequest, CompletionRequest

_NOT_YET = "structured output is not supported yet"


def _bad_format(message: str) -> ApiError:
    return ApiError(400, f"response_format: {message}", param="response_format", code="invalid_value")


def _grammar(fmt: dict[str, Any]) -> Grammar | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar()
    if kind != "json_schema":
        raise _bad_format(f"unknown type {kind!r} (text, json_object or json_schema)")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise _bad_format("json_schema needs a name and a schema")
    if not isinstance(spec.get("strict", False), bool):
        raise _bad_format("json_schema.strict must be a boolean")
    if "schema" not in spec:
        raise _bad_format("json_schema needs a schema")
    try:
        # Every schema is enforced exactly, strict or not: never answered with output that ignores it.
        return json_schema_grammar(spec["schema"])
    except MlxLlamaError as e:
        raise _bad_format(str(e)) from None


def prepare(tokenizer: Any, vocab_size: int) -> None:
    """Build the matcher's token trie in the background (seconds), so no request waits for it."""
    if tokenizer is not None:
        threading.Thread(target=ConstraintCompiler, args=(tokenizer, vocab_size), daemon=True,
                         name="mlx-llama-constraints").start()


def constraint_for(request: ChatCompletionRequest | CompletionRequest, tokenizer: Any,
                   vocab_size: int) -> TokenConstraint | None:
    """The constraint a request's output must follow; None for free text."""
    if not isinstance(request, ChatCompletionRequest):
        return None
    for name in ("tools", "functions"):
        if getattr(request, name):
            raise ApiError(400, f"{_NOT_YET}: {name} (tool calling) cannot be honoured", param=name,
                           code="unsupported_parameter")
    if request.tool_choice not in (None, "none"):
        raise ApiError(400, f"{_NOT_YET}: tool_choice cannot be honoured", param="tool_choice",
                       code="unsupported_parameter")
    grammar = _grammar(request.response_format) if request.response_format is not None else None
    if grammar is None:
        return None
    if tokenizer is None:
        raise _bad_format("this model has no tokenizer, which constrained output needs")
    try:
        return ConstraintCompiler(tokenizer, vocab_size).constraint(grammar)
    except MlxLlamaError as e:
        raise _bad_format(str(e)) from None
