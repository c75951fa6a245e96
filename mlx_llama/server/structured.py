"""The one place that decides what `response_format`, `tools` and `functions` do.

Constrained decoding (JSON schemas, grammars, tool calls) is not built yet, so
any request that asks for it is refused with a 400 rather than answered with
free text that ignores the format.  Constrained decoding replaces this module:
`constraint_for` will return the `TokenConstraint` the engine applies.
"""

from __future__ import annotations

from mlx_llama.generation.requests import TokenConstraint
from mlx_llama.server.errors import ApiError
from mlx_llama.server.schemas import ChatCompletionRequest, CompletionRequest

_NOT_YET = "structured output is not supported yet"


def constraint_for(request: ChatCompletionRequest | CompletionRequest) -> TokenConstraint | None:
    """The constraint a request's output must follow; None for free text."""
    if not isinstance(request, ChatCompletionRequest):
        return None
    fmt = request.response_format
    if fmt is not None and fmt.get("type") != "text":
        raise ApiError(400, f"{_NOT_YET}: response_format {fmt.get('type')!r} cannot be honoured",
                       param="response_format", code="unsupported_parameter")
    for name in ("tools", "functions"):
        if getattr(request, name):
            raise ApiError(400, f"{_NOT_YET}: {name} (tool calling) cannot be honoured", param=name,
                           code="unsupported_parameter")
    if request.tool_choice not in (None, "none"):
        raise ApiError(400, f"{_NOT_YET}: tool_choice cannot be honoured", param="tool_choice",
                       code="unsupported_parameter")
    return None
