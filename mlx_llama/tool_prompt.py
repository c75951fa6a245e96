"""Tool definitions and tool turns for chat templates that know nothing of tools.

Llama-3.1/3.2/3.3 instruct templates render `tools` themselves.  Llama-3.0's
(our built-in fallback) and other tool-less templates would drop them silently,
so for those the conversation is rewritten into plain turns first, in the
format of Llama 3.1's JSON tool calling, which the model families we serve
were trained on:

- the tool definitions go into the system message (one is added when there is
  none), ahead of its text: `TOOLS_PREAMBLE`, then each tool as indented JSON;
- an assistant turn that called a tool becomes the call's text,
  `{"name": "get_weather", "parameters": {"city": "Oslo"}}`;
- a tool's result becomes an `ipython` turn (Llama 3.1's role for it).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from mlx_llama.errors import MlxLlamaError
from mlx_llama.interfaces import Message, ToolCall

# Meta's wording in the Llama 3.1/3.2 templates (tools in the system message).
TOOLS_PREAMBLE = (
    "You have access to the following functions. To call a function, please respond with JSON for a "
    'function call. Respond in the format {"name": function name, "parameters": dictionary of argument '
    "name and its value}. Do not use variables.\n\n"
)


def tool_call_text(name: str, arguments: Mapping[str, Any]) -> str:
    """A call as the model writes it (and as the server's constraint makes it write it)."""
    return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)


def _tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    return TOOLS_PREAMBLE + "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)


def _call_turn(calls: list[ToolCall]) -> str:
    if len(calls) != 1:
        raise MlxLlamaError(f"an assistant turn may hold one tool call, not {len(calls)}")
    return tool_call_text(calls[0]["function"]["name"], calls[0]["function"]["arguments"])


def plain_messages(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None) -> list[Message]:
    """The conversation with tools, tool calls and tool results written as plain turns."""
    out: list[Message] = []
    for m in messages:
        if "tool_calls" in m:
            out.append({"role": "assistant", "content": _call_turn(m["tool_calls"])})
        elif m["role"] == "tool":
            out.append({"role": "ipython", "content": m["content"]})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": _tools_block(tools) + out[0]["content"]}
        else:
            out.insert(0, {"role": "system", "content": _tools_block(tools).rstrip("\n")})
    return out
