"""The one place that decides the constraint a chat answer follows: `response_format` or `tools`.

`response_format` {"type": "json_object"} and {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}} become a grammar constraint the
engine applies to every token (generation.constraints), so the answer parses
and validates, or ends with finish_reason "length"; `tools` become the grammar
of a tool call (server.tools).  A schema the matcher cannot enforce is a 400
before anything is generated; so is anything else asked of the output that we
cannot honour (the deprecated `functions` API).
"""

from __future__ import annotations

import threading
from typing import Any

from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.constraints import ConstraintCompiler, Grammar, json_object_grammar, json_schema_grammar
from mlx_llama.generation.requests import TokenConstraint
from mlx_llama.server.errors import ApiError, field_error
from mlx_llama.server.schemas import ChatCompletionRequest, CompletionRequest
from mlx_llama.server.tools import tool_grammar


def _bad_format(message: str) -> ApiError:
    return field_error("response_format", message)


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
    param = "tools"
    grammar = tool_grammar(request)
    if grammar is None and request.response_format is not None:
        param, grammar = "response_format", _grammar(request.response_format)
        if grammar is not None and request.stop:
            # A stop string could cut the JSON and still report finish_reason "stop".
            raise field_error("stop", "cannot be combined with a JSON response_format: a stop string could cut it")
    if grammar is None:
        return None
    if tokenizer is None:
        raise field_error(param, "this model has no tokenizer, which constrained output needs")
    try:
        return ConstraintCompiler(tokenizer, vocab_size).constraint(grammar)
    except MlxLlamaError as e:
        raise field_error(param, str(e)) from None
