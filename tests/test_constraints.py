"""Constrained decoding: every output matches its schema / regex / grammar / choice, or is refused up front.

The model is a tiny random-weight one with the real Llama-3 tokenizer: its text
is noise, the hardest case for a constraint (nothing steers it towards valid
output but the mask).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
from click.testing import CliRunner

from mlx_llama.cli.main import main
from mlx_llama.convert import convert
from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation import constraints as C
from mlx_llama.generation.engine import Engine, EngineConfig
from mlx_llama.generation.loop import GenerationStats, generate_tokens
from mlx_llama.generation.requests import GenerationRequest, TokenEvent
from mlx_llama.generation.sampler import Sampler, SamplingParams
from mlx_llama.loader import load
from mlx_llama.model.llama import Model
from mlx_llama.tokenizer import Tokenizer

SEEDS = range(20)
MAX_TOKENS = 160  # well above the longest output the schemas below allow

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "admin": {"type": "boolean"}},
                "required": ["id", "admin"],
                "additionalProperties": False,
            },
            "note": {"type": "string", "maxLength": 6},
        },
        "required": ["user", "note"],
        "additionalProperties": False,
    },
    "array min/max items": {
        "type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4,
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3, None]}},
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "number bounds": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000},
            "ratio": {"type": "number", "minimum": -2.5, "maximum": 2.5, "multipleOf": 0.5},
        },
        "required": ["count", "ratio"],
        "additionalProperties": False,
    },
    "required and optional": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 5},
            "active": {"type": "boolean"},
            "rank": {"type": "integer", "minimum": 1, "maximum": 3},
        },
        "required": ["name"],
        "additionalProperties": False,
    },
    "anyOf": {
        "anyOf": [
            {"type": "string", "maxLength": 4},
            {"type": "integer", "minimum": 0, "maximum": 50},
            {"type": "object", "properties": {"k": {"const": "v"}}, "required": ["k"], "additionalProperties": False},
        ]
    },
}

UNSUPPORTED: dict[str, dict[str, Any]] = {
    "misspelt keyword": {"type": "object", "properties": {"n": {"type": "integer", "minimun": 3}}},
    "custom keyword": {"type": "string", "x-guidance": {"lenient": True}},
    "invalid type": {"type": "strnig"},
    "negative minItems": {"type": "array", "minItems": -1},
    "not": {"not": {"type": "string"}},
    "uniqueItems": {"type": "array", "uniqueItems": True},
    "if/then": {"if": {"type": "string"}, "then": {"minLength": 2}},
    "unknown format": {"type": "string", "format": "colour"},
    "dangling $ref": {"$ref": "#/$defs/missing"},
    "minProperties over repeatable keys": {"type": "object", "patternProperties": {"^[a-c]$": {"type": "boolean"}},
                                           "additionalProperties": False, "minProperties": 2},
    "look-ahead pattern": {"type": "string", "pattern": "(?=a)a"},
}


@pytest.fixture(scope="module")
def chat(tiny_chat_model: Path) -> tuple[Model, Tokenizer]:
    model, tokenizer = load(tiny_chat_model)
    return model, tokenizer


@pytest.fixture(scope="module")
def compiler(chat: tuple[Model, Tokenizer]) -> C.ConstraintCompiler:
    model, tokenizer = chat
    return C.ConstraintCompiler(tokenizer, model.config.vocab_size)


def constrained(chat: tuple[Model, Tokenizer], compiler: C.ConstraintCompiler, grammar: C.Grammar, seed: int,
                max_tokens: int = MAX_TOKENS, **sampling: Any) -> tuple[str, str, list[int]]:
    """(text, finish reason, token ids) of one temperature-1 generation under `grammar`."""
    model, tokenizer = chat
    stats = GenerationStats()
    ids = tokenizer.encode_chat([{"role": "user", "content": f"Reply {seed}"}])
    tokens = list(generate_tokens(model, ids, max_tokens=max_tokens,
                                  sampler=Sampler(SamplingParams(temperature=1.0, seed=seed, **sampling)),
                                  stop_ids=tokenizer.stop_ids, stats=stats, constraint=compiler.constraint(grammar)))
    return tokenizer.decode(tokens), stats.finish_reason, tokens


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_output_parses_and_validates(chat, compiler, name: str) -> None:
    schema = SCHEMAS[name]
    grammar = C.json_schema_grammar(schema)
    for seed in SEEDS:
        text, finish, _ = constrained(chat, compiler, grammar, seed)
        assert finish == "stop", f"seed {seed} was cut at {MAX_TOKENS} tokens: {text!r}"
        jsonschema.validate(json.loads(text), schema)


def test_repetition_penalty_path_is_constrained_too(chat, compiler) -> None:
    """With a repetition penalty the loop samples without lookahead; the mask applies there as well."""
    schema = SCHEMAS["nested objects"]
    for seed in range(5):
        text, finish, _ = constrained(chat, compiler, C.json_schema_grammar(schema), seed, repetition_penalty=1.3)
        assert finish == "stop"
        jsonschema.validate(json.loads(text), schema)


def test_numpy_backend_is_constrained_too(tiny_chat_model, chat, compiler) -> None:
    from mlx_llama.backends import load_backend

    model, _ = load_backend("numpy", tiny_chat_model)
    text, finish, _ = constrained((model, chat[1]), compiler, C.json_schema_grammar(SCHEMAS["enums"]), seed=2)
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS["enums"])


def test_any_json_object_cut_by_max_tokens_is_a_valid_prefix(chat, compiler) -> None:
    finishes = []
    for seed in range(5):
        text, finish, tokens = constrained(chat, compiler, C.json_object_grammar(), seed, max_tokens=24)
        finishes.append(finish)
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert finish == "length" and len(tokens) == 24
            replay = compiler.constraint(C.json_object_grammar())
            for t in tokens:
                assert replay.allowed()[t]
                replay.advance(t)
            assert text.startswith("{")
    assert "length" in finishes  # noise rarely closes a free-form object in 24 tokens


@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no)(, (yes|no)){0,2}\.", r"[A-Z][a-z]{1,5}@x\.org"])
def test_regex_outputs_match(chat, compiler, pattern: str) -> None:
    for seed in SEEDS:
        text, finish, _ = constrained(chat, compiler, C.regex_grammar(pattern), seed)
        assert finish == "stop" and re.fullmatch(pattern, text), (seed, text)


def test_choice_outputs_are_one_of_the_options(chat, compiler) -> None:
    options = ["red", "green", "blue sky", "yellow-ish"]
    for seed in SEEDS:
        text, finish, _ = constrained(chat, compiler, C.choice_grammar(options), seed)
        assert finish == "stop" and text in options


def test_lark_grammar_outputs_are_in_its_language(chat, compiler) -> None:
    grammar = C.lark_grammar('start: "(" item ("," item)~0..2 ")"\nitem: /[a-z]{1,3}/ | /[0-9]/\n')
    for seed in SEEDS:
        text, finish, _ = constrained(chat, compiler, grammar, seed)
        assert finish == "stop" and re.fullmatch(r"\((?:[a-z]{1,3}|[0-9])(?:,(?:[a-z]{1,3}|[0-9])){0,2}\)", text), text


def test_stop_tokens_are_masked_until_the_grammar_accepts(chat, compiler) -> None:
    _, tokenizer = chat
    stops = sorted(tokenizer.stop_ids)
    c = compiler.constraint(C.regex_grammar("[a-z]{2,3}"))
    letter = tokenizer.encode("a")
    assert len(letter) == 1
    assert not c.allowed()[stops].any()
    c.advance(letter[0])
    assert not c.allowed()[stops].any()  # "a" is not in the language yet
    c.advance(letter[0])
    mask = c.allowed()
    assert mask[stops].all() and mask[letter[0]] and not c.is_done()  # "aa" is: stop, or one more letter
    longest = compiler.constraint(C.regex_grammar("[a-z]{2,3}"))
    for _ in range(3):
        longest.advance(letter[0])
    assert longest.is_done() and not longest.allowed().any()  # "aaa" allows nothing more: done, no stop token
    c.advance(stops[0])
    assert c.is_done() and not c.allowed().any()


def test_ids_past_the_tokenizer_are_never_allowed(chat) -> None:
    model, tokenizer = chat
    wide = C.ConstraintCompiler(tokenizer, model.config.vocab_size + 64).constraint(C.json_object_grammar())
    mask = wide.allowed()
    assert len(mask) == model.config.vocab_size + 64 and not mask[model.config.vocab_size:].any()


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_schema_is_refused_before_compiling(compiler, name: str) -> None:
    with pytest.raises(MlxLlamaError) as e:
        compiler.constraint(C.json_schema_grammar(UNSUPPORTED[name]))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("grammar", [lambda: C.regex_grammar("(a"), lambda: C.lark_grammar("start: undefined_rule"),
                                     lambda: C.choice_grammar(["a", ""])])
def test_bad_regex_grammar_and_choice_are_refused(compiler, grammar: Callable[[], C.Grammar]) -> None:
    with pytest.raises(MlxLlamaError) as e:
        compiler.constraint(grammar())
    assert "\n" not in str(e.value)


# --- the CLI -------------------------------------------------------------------------------------


def cli(*args: str):
    return CliRunner().invoke(main, ["generate", *args])


def test_cli_json_schema_output_validates(tiny_chat_model, tmp_path) -> None:
    schema = SCHEMAS["enums"]
    (tmp_path / "s.json").write_text(json.dumps(schema))
    r = cli("-m", str(tiny_chat_model), "-p", "hi", "--json-schema", str(tmp_path / "s.json"), "--temp", "1")
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.output), schema)


@pytest.mark.parametrize("flags,check", [
    (["--regex", "[0-9]{2}"], lambda out: re.fullmatch("[0-9]{2}", out)),
    (["--choice", "left, right"], lambda out: out in ("left", "right")),
])
def test_cli_constraints(tiny_chat_model, flags: list[str], check: Callable[[str], Any]) -> None:
    r = cli("-m", str(tiny_chat_model), "-p", "hi", "--temp", "1", "--seed", "4", "-n", "400", *flags)
    assert r.exit_code == 0, r.output
    assert check(r.output.rstrip("\n")), r.output


def test_cli_lark_grammar_file(tiny_chat_model, tmp_path) -> None:
    (tmp_path / "g.lark").write_text('start: "x=" /[0-9]{1,2}/\n')
    r = cli("-m", str(tiny_chat_model), "-p", "hi", "--grammar", str(tmp_path / "g.lark"), "--temp", "1")
    assert r.exit_code == 0 and re.fullmatch(r"x=[0-9]{1,2}\n", r.output), r.output


def test_cli_reports_a_cut_output(tiny_chat_model) -> None:
    """A free-form object from noise never closes: the cut is said on stderr."""
    r = cli("-m", str(tiny_chat_model), "-p", "hi", "--json", "--temp", "1", "--seed", "0", "-n", "3")
    assert r.exit_code == 0 and r.output.startswith("{") and "cut at --max-tokens" in r.output


@pytest.mark.parametrize("case", ["uniqueItems", "misspelt keyword", "not JSON", "two constraints", "bad regex",
                                  "empty choice", "missing file"])
def test_cli_refuses_before_generating(tiny_chat_model, tmp_path, monkeypatch, case: str) -> None:
    def no_generation(*a: Any, **k: Any) -> Any:
        raise AssertionError("generation started")

    monkeypatch.setattr("mlx_llama.cli.generate.generate_tokens", no_generation)
    schema = tmp_path / "s.json"
    schema.write_text("{not json" if case == "not JSON" else json.dumps(UNSUPPORTED.get(case, {})))
    flags = {
        "two constraints": ["--json", "--regex", "a"],
        "bad regex": ["--regex", "(a"],
        "empty choice": ["--choice", "a,,b"],
        "missing file": ["--grammar", str(tmp_path / "missing.lark")],
    }.get(case, ["--json-schema", str(schema)])
    r = cli("-m", str(tiny_chat_model), "-p", "hi", *flags)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output


# --- the batched engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def q4_chat_model(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Model:
    """4-bit: the quantized kernels are row-invariant in the batch size, so batch-mates cannot change a row."""
    out = tmp_path_factory.mktemp("q4chat") / "model"
    convert(tiny_chat_model, out, bits=4, group_size=32, log=lambda _: None)
    return load(out, "float32")[0]


def run_engine(engine: Engine, requests: list[GenerationRequest]) -> list[list[TokenEvent]]:
    ids = [engine.submit(r) for r in requests]
    events: dict[int, list[TokenEvent]] = {i: [] for i in ids}
    while engine.has_work:
        for ev in engine.step():
            events[ev.request_id].append(ev)
    return [events[i] for i in ids]


def test_engine_constrained_rows_leave_unconstrained_rows_unchanged(q4_chat_model, chat, compiler) -> None:
    _, tokenizer = chat
    schema = SCHEMAS["nested objects"]
    grammar = C.json_schema_grammar(schema)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": f"question {i}"}]) for i in range(8)]

    def request(i: int) -> GenerationRequest:
        constraint = compiler.constraint(grammar) if i % 2 else None
        return GenerationRequest(prompts[i], 40 if constraint is None else MAX_TOKENS,
                                 SamplingParams(temperature=1.0, seed=i), stop_ids=tokenizer.stop_ids,
                                 constraint=constraint)

    together = run_engine(Engine(q4_chat_model, EngineConfig(max_batch=8)), [request(i) for i in range(8)])
    for i, events in enumerate(together):
        tokens = [e.token for e in events]
        if i % 2:
            assert events[-1].finish_reason == "stop"
            jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
        else:
            solo = run_engine(Engine(q4_chat_model, EngineConfig(max_batch=1)), [request(i)])[0]
            assert tokens == [e.token for e in solo], f"row {i}"
