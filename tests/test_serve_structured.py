"""`response_format` through `mlx-llama serve`, with the official `openai` client: the answer validates
against the schema (plain and streamed), or the request is refused with a 400 before any token.

The model is a tiny random one with the real Llama-3 tokenizer: only the constraint makes its noise parse.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import pytest

from serve_process import ServerProcess, generated_tokens
from serve_process import tiny_client, tiny_server  # noqa: F401  (the fixtures)

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "tags": {"type": "array", "items": {"enum": ["sea", "hills", "food"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["city", "days", "tags"],
    "additionalProperties": False,
}


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema, "strict": True}}


def ask(client: Any, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 160)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Plan a trip"}],
                                          temperature=1.0, **kw)


def test_json_schema_answers_validate(client: Any) -> None:
    for seed in range(4):
        choice = ask(client, seed=seed, response_format=schema_format(SCHEMA)).choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_schema_stream_validates(client: Any) -> None:
    chunks = list(ask(client, seed=7, response_format=schema_format(SCHEMA), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_parse_with_a_pydantic_model(client: Any) -> None:
    """The client's own schema from a pydantic model (strict: every field required) round-trips."""

    class Answer(pydantic.BaseModel):
        verdict: Literal["yes", "no"]
        confidence: int = pydantic.Field(ge=0, le=100)

    parsed = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "Is it?"}],
                                           response_format=Answer, temperature=1.0, seed=3,
                                           max_tokens=60).choices[0].message.parsed
    assert isinstance(parsed, Answer) and 0 <= parsed.confidence <= 100


def test_json_object_cut_by_max_tokens_says_length(client: Any) -> None:
    """Noise never closes a free-form object: the answer is cut, and says so."""
    choice = ask(client, seed=1, response_format={"type": "json_object"}, max_tokens=12).choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith("{")


@pytest.mark.parametrize("fmt", [
    schema_format({"type": "array", "uniqueItems": True}),
    schema_format({"type": "object", "properties": {"n": {"type": "integer", "minimun": 1}}}),
    schema_format({"not": {"type": "string"}}),
    schema_format({"type": "strnig"}),
    {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
    {"type": "yaml"},
])
def test_unenforceable_format_is_refused_before_any_token(server: ServerProcess, client: Any,
                                                          fmt: dict[str, Any]) -> None:
    before = generated_tokens(server)
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, response_format=fmt)
    assert e.value.body["param"] == "response_format" and "\n" not in e.value.body["message"]
    assert generated_tokens(server) == before


def test_stop_strings_with_a_json_format_are_refused(server: ServerProcess, client: Any) -> None:
    """A stop string could cut the JSON and still say finish_reason "stop": refused, nothing generated."""
    before = generated_tokens(server)
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, response_format=schema_format(SCHEMA), stop=["}"])
    assert e.value.body["param"] == "stop"
    assert generated_tokens(server) == before
