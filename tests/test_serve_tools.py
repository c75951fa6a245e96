"""`tools` / `tool_choice` through `mlx-llama serve`, with the official `openai` client: a call's name
is a declared tool's and its arguments validate against that tool's parameters (plain and streamed),
a tool's result goes back in the history, and what cannot be enforced is refused before any token.

The model is a tiny random one with the real Llama-3 tokenizer and the Llama-3.0 template (no tool
support: the tools go through mlx_llama.tool_prompt); only the constraint makes its noise a call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from mlx_llama.tokenizer import Tokenizer
from serve_process import ServerProcess, generated_tokens
from serve_process import tiny_client, tiny_server  # noqa: F401  (the fixtures)

openai = pytest.importorskip("openai")

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 10},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city"], "additionalProperties": False}
ADD = {"type": "object",
       "properties": {"a": {"type": "integer", "minimum": -100, "maximum": 100},
                      "b": {"type": "integer", "minimum": -100, "maximum": 100}},
       "required": ["a", "b"], "additionalProperties": False}
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool(name: str, parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": f"the {name} tool"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


TOOLS = [tool("get_weather", WEATHER), tool("add", ADD), tool("now")]
PARAMETERS = {"get_weather": WEATHER, "add": ADD, "now": NO_PARAMETERS}
QUESTION = [{"role": "user", "content": "What is the weather in Oslo?"}]
ADD_ONLY = {"name": "add"}


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model: Path) -> Tokenizer:
    tok = Tokenizer.from_dir(tiny_chat_model)
    assert tok is not None
    return tok


def ask(client: Any, messages: list[Any] = QUESTION, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 120)
    kw.setdefault("tools", TOOLS)
    return client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, **kw)


def check_call(call: Any, allowed: set[str]) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in allowed
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS[call.function.name])
    return arguments


@pytest.mark.parametrize("seed", range(5))
def test_required_call_validates(client: Any, seed: int) -> None:
    choice = ask(client, seed=seed, tool_choice="required").choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    assert len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0], set(PARAMETERS))


@pytest.mark.parametrize("seed", range(3))
def test_named_function_is_the_one_called(client: Any, seed: int) -> None:
    """Only the named tool can be called, so only its schema needs to be enforceable."""
    unenforceable = tool("g", {"type": "object", "not": {}})
    choice = ask(client, seed=seed, tools=TOOLS + [unenforceable],
                 tool_choice={"type": "function", "function": ADD_ONLY}).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    check_call(choice.message.tool_calls[0], {"add"})


def test_stream_reassembles_to_the_same_call(client: Any) -> None:
    plain = ask(client, seed=11, tool_choice="required").choices[0].message.tool_calls[0]
    chunks = list(ask(client, seed=11, tool_choice="required", stream=True, logprobs=True,
                      stream_options={"include_usage": True}))
    choices = [c.choices[0] for c in chunks if c.choices]
    deltas = [d for choice in choices for d in choice.delta.tool_calls or []]
    assert all(not choice.delta.content for choice in choices)
    assert deltas[0].id.startswith("call_") and deltas[0].type == "function" and deltas[0].function.name
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert choices[-1].finish_reason == "tool_calls"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert (deltas[0].function.name, arguments) == (plain.function.name, plain.function.arguments)
    check_call(plain, set(PARAMETERS))
    # Tokens held back until the call's name is whole still send their logprobs, once each.
    sent = sum(len(choice.logprobs.content) for choice in choices if choice.logprobs)
    assert sent == chunks[-1].usage.completion_tokens


def test_follow_up_with_the_tool_result(client: Any, tokenizer: Tokenizer) -> None:
    first = ask(client, seed=2, tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    history = QUESTION + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})},
    ]
    again = ask(client, history, seed=3, tool_choice="required")
    check_call(again.choices[0].message.tool_calls[0], set(PARAMETERS))
    # The history went through the template: the call as the template takes it, the result as a tool turn.
    rendered = QUESTION + [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "content": json.dumps({"temperature": 21})},
    ]
    assert again.usage.prompt_tokens == len(tokenizer.encode_chat(rendered, tools=TOOLS))
    text = ask(client, history, seed=3, tool_choice="none", max_tokens=5).choices[0]
    assert text.message.tool_calls is None and isinstance(text.message.content, str)


@pytest.mark.parametrize("seed", range(6))
def test_auto_answers_in_text_or_with_a_valid_call(client: Any, seed: int) -> None:
    """"auto" lets the answer be text (never starting with "{") or a call; noise mostly picks text."""
    choice = ask(client, seed=seed, max_tokens=24).choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_call(choice.message.tool_calls[0], set(PARAMETERS))
    else:
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content and not choice.message.content.startswith("{")


def test_auto_stream_of_text_has_no_tool_calls(client: Any) -> None:
    chunks = list(ask(client, seed=4, max_tokens=12, stream=True))
    assert all(not c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("body,param", [
    ({"tools": [tool("f", {"type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}})],
      "tool_choice": "required"}, "tools"),
    ({"tools": [tool("f", {"type": "object", "properties": {"n": {"type": "integer", "minimun": 1}}})]},
     "tools"),
    ({"tools": [tool("f", {"type": "string"})]}, "tools"),
    ({"tools": [tool("f", {"type": "object", "properties": {"n": {"$ref": "#"}}})]}, "tools"),
    ({"tools": TOOLS + [tool("g", {"not": {}})]}, "tools"),
    ({"tools": [tool("f"), tool("f")]}, "tools"),
    ({"tools": [tool("bad name")]}, "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "stop": ["}"]}, "stop"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
])
def test_what_cannot_be_honoured_is_refused_before_any_token(server: ServerProcess, body: dict[str, Any],
                                                             param: str) -> None:
    before = generated_tokens(server)
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 8, **body},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "\n" not in error["message"], error
    assert generated_tokens(server) == before


def test_history_with_bad_tool_call_arguments_is_refused(server: ServerProcess) -> None:
    history = QUESTION + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{not json"}}]}]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": history, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_pydantic_tool_with_definitions(client: Any) -> None:
    """The client's `pydantic_function_tool` writes $defs and $refs to them: they resolve inside a call."""
    pydantic = pytest.importorskip("pydantic")

    class Place(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=10)

    class Book(pydantic.BaseModel):
        where: Place
        nights: int = pydantic.Field(ge=1, le=9)

    spec = openai.pydantic_function_tool(Book)
    assert "$defs" in spec["function"]["parameters"]
    for seed in range(3):
        answer = ask(client, tools=[spec, TOOLS[0]], tool_choice="required", seed=seed)
        call = answer.choices[0].message.tool_calls[0]
        if call.function.name == "Book":
            Book.model_validate_json(call.function.arguments)
        else:
            check_call(call, {"get_weather"})
