"""Tool calls for chat completions: `tools` + `tool_choice` → the prompt's tool list and the
grammar the answer must follow; the answer's text → `tool_calls`, plain or streamed.

A call is written as Llama 3.1's JSON tool calling writes it (mlx_llama.tool_prompt),
`{"name": "get_weather", "parameters": {"city": "Oslo"}}`, under a constraint built
from the declared tools: each tool's call is a JSON schema ({"name": {"const": ...},
"parameters": <its schema>}) made by `constraints.json_schema_grammar`, so every
parameters schema passes the same checks as `response_format`'s and one that cannot
be enforced is a 400 before any token; a Lark grammar holds them as alternatives
(one `%json` each, so each keeps its own `$defs`):

- `tool_choice` "required", or a named function: the whole answer is one call of
  the tools allowed (all, or the named one);
- "auto" (the default with tools): the answer is either such a call or text that
  does not start with "{" (so its first character says which, and a streamed
  answer can be told apart at once);
- "none": tools are not rendered and the answer is free text.

One call per answer (Llama 3.x makes one at a time); `parallel_tool_calls` is
accepted, as a single call honours either value.  `stop` strings are refused
with tools: one inside a call's JSON would cut it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal

from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.constraints import Grammar, json_schema_grammar, lark_grammar
from mlx_llama.server.errors import field_error
from mlx_llama.server.schemas import (
    AssistantMessage, ChatCompletionRequest, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta, ToolDefinition,
)

Mode = Literal["none", "auto", "required"]

# The constrained call's text is exactly _HEAD + name + _SEPARATOR + arguments + "}" (names are
# [A-Za-z0-9_-], so never escaped, and JSON is generated with these separators).
_HEAD = '{"name": "'
_SEPARATOR = '", "parameters": '
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
_ROOT_KEYWORDS = ("$schema", "$defs", "definitions")  # a parameters schema's, moved to the call's root
_MOVABLE_REFS = ("#/$defs/", "#/definitions/")


def _mode(request: ChatCompletionRequest) -> tuple[Mode, list[ToolDefinition]]:
    """What the answer may do, and the tools it may call."""
    tools = request.tools or []
    choice = request.tool_choice
    if choice is None:
        return ("auto" if tools else "none"), tools
    if choice == "none":
        return "none", tools
    if not tools:
        raise field_error("tool_choice", "needs tools to choose from")
    if isinstance(choice, str):
        return choice, tools
    named = [t for t in tools if t.function.name == choice.function.name]
    if not named:
        raise field_error("tool_choice", f"names {choice.function.name!r}, which is not among the tools")
    return "required", named


def check_tools(request: ChatCompletionRequest) -> None:
    """Refuse the deprecated function API and combinations a tool call cannot honour."""
    for name in ("functions", "function_call"):
        if getattr(request, name) is not None:
            raise field_error(name, "the deprecated function-calling API is not supported; "
                              "use tools and tool_choice", "unsupported_parameter")
    names = [t.function.name for t in request.tools or []]
    if len(set(names)) != len(names):
        raise field_error("tools", "two tools have the same name")
    mode, _ = _mode(request)
    if mode == "none":
        return
    if request.response_format is not None and request.response_format.get("type") != "text":
        raise field_error("response_format", "cannot be combined with tool calls (use tool_choice none)")
    if request.stop:
        raise field_error("stop", "cannot be combined with tool calls: a stop string inside a call would cut it")


def prompt_tools(request: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tool definitions the chat template renders (none with tool_choice "none")."""
    mode, tools = _mode(request)
    if mode == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in request.tools or []]


def may_call(request: ChatCompletionRequest) -> bool:
    return _mode(request)[0] != "none"


def _parameters(tool: ToolDefinition) -> dict[str, Any]:
    schema = tool.function.parameters
    if schema is None:
        return _NO_PARAMETERS
    if schema.get("type", "object") != "object":
        raise field_error("tools", f"{tool.function.name}: parameters must be an object schema (type: object)")
    return {"type": "object", **schema}


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, sub in value.items():
            if key == "$ref" and isinstance(sub, str):
                yield sub
            else:
                yield from _refs(sub)
    elif isinstance(value, list):
        for sub in value:
            yield from _refs(sub)


def _call_schema(tool: ToolDefinition) -> dict[str, Any]:
    """The JSON schema of a call of `tool`, checked as `response_format`'s are, spacing options included.

    The parameters' definitions move to the call's root, where their `$ref`s ("#/$defs/...",
    as pydantic writes them) still resolve; a `$ref` to anything else in the parameters cannot.
    """
    name, parameters = tool.function.name, _parameters(tool)
    try:
        json_schema_grammar(parameters)  # on its own first, so that an error names the tool and a path in it
    except MlxLlamaError as e:
        raise field_error("tools", f"{name}: the parameters' {str(e).removeprefix('the JSON ')}") from None
    stray = [r for r in _refs(parameters) if not r.startswith(_MOVABLE_REFS)]
    if stray:
        raise field_error("tools", f"{name}: the parameters' $ref {stray[0]!r} cannot be resolved inside a call "
                          "(refer to $defs or definitions)")
    at_root = {k: v for k, v in parameters.items() if k in _ROOT_KEYWORDS}
    inner = {k: v for k, v in parameters.items() if k not in _ROOT_KEYWORDS}
    call = {"type": "object", "properties": {"name": {"const": name}, "parameters": inner},
            "required": ["name", "parameters"], "additionalProperties": False, **at_root}
    # json_schema_grammar's source (llguidance's grammar format) holds the checked schema with its
    # spacing options (x-guidance), ready to embed in a Lark grammar.
    return json.loads(json_schema_grammar(call).source)["grammars"][0]["json_schema"]


def tool_grammar(request: ChatCompletionRequest) -> Grammar | None:
    """The grammar of the answer; None when it is free text.

    Every tool the answer may call must be enforceable; with a named tool_choice, the others
    cannot be called, so their schemas are only rendered in the prompt.
    """
    mode, callable_tools = _mode(request)
    if mode == "none":
        return None
    rules = [f"call_{i}: %json {json.dumps(_call_schema(t))}" for i, t in enumerate(callable_tools)]
    alternatives = " | ".join(f"call_{i}" for i in range(len(rules)))
    if mode == "required":
        start = [f"start: {alternatives}"]
    else:
        start = [f"start: TEXT | {alternatives}", "TEXT: /[^{](?s:.)*/"]
    return Grammar(lark_grammar("\n".join(start + rules)).source, "the tools' parameters schemas")


@dataclass
class AnswerDelta:
    """What a piece of the answer adds: content text or a piece of the tool call (or nothing yet)."""

    content: str = ""
    call: ToolCallDelta | None = None


@dataclass
class ToolCallReader:
    """Reads an answer that may be a tool call, as it streams: the first character decides.

    The call's name is sent once it is complete, then its arguments as they come,
    holding back the last character, which may be the call's closing brace.
    """

    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    name: str | None = None
    arguments: str = ""
    _text: str = ""  # the call's text so far
    _is_call: bool | None = None

    def add(self, text: str) -> AnswerDelta:
        if self._is_call is None and text:
            self._is_call = text.startswith("{")
        if not self._is_call:
            return AnswerDelta(content=text)
        self._text += text
        return self._call_delta(self._text[:-1])

    def finish(self, finish_reason: str) -> tuple[AnswerDelta, str]:
        """The rest of the answer, and the finish reason to report ("tool_calls" for a whole call)."""
        if not self._is_call:
            return AnswerDelta(), finish_reason
        if finish_reason != "stop":  # cut short: the call is sent as far as it got
            if self.name is None:
                return AnswerDelta(content=self._text), finish_reason
            return self._call_delta(self._text), finish_reason
        return self._call_delta(self._text.removesuffix("}")), "tool_calls"

    def tool_call(self) -> ToolCall | None:
        if self.name is None:
            return None
        return ToolCall(id=self.id, function=FunctionCall(name=self.name, arguments=self.arguments))

    def _call_delta(self, text: str) -> AnswerDelta:
        opening = self.name is None
        if opening:
            end = text.find(_SEPARATOR, len(_HEAD))
            if end < 0:
                return AnswerDelta()
            self.name = text[len(_HEAD):end]
        new = text[len(_HEAD) + len(self.name) + len(_SEPARATOR) + len(self.arguments):]
        if not (opening or new):
            return AnswerDelta()
        self.arguments += new
        if opening:
            return AnswerDelta(call=ToolCallDelta(id=self.id, type="function",
                                                  function=FunctionCallDelta(name=self.name, arguments=new)))
        return AnswerDelta(call=ToolCallDelta(function=FunctionCallDelta(arguments=new)))


def answer_message(texts: Iterable[str], finish_reason: str) -> tuple[AssistantMessage, str]:
    """A whole answer that may be a tool call → the assistant message and the finish reason to report."""
    reader = ToolCallReader()
    content = "".join(reader.add(text).content for text in texts)
    rest, finish_reason = reader.finish(finish_reason)
    call = reader.tool_call()
    if call is not None:
        return AssistantMessage(content=None, tool_calls=[call]), finish_reason
    return AssistantMessage(content=content + rest.content), finish_reason
