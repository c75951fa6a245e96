"""Grammar-constrained decoding: JSON schemas, regexes, Lark grammars and choice lists.

The matching is llguidance's (the matcher llama.cpp and vLLM use): a `Grammar`
is compiled against the tokenizer into a `GrammarConstraint`, which implements
the engine's `TokenConstraint` protocol (mlx_llama.generation.requests) and so
works in the single-sequence loop and the batched engine alike.

Never fails open: everything that could make the output differ from what was
asked is refused (`MlxLlamaError`, one line) when the constraint is built,
before any token is generated:
- a JSON schema must be valid against its metaschema (`jsonschema`), use only
  JSON Schema keywords (a misspelt or custom keyword would otherwise be
  ignored), and compile in llguidance, which itself refuses keywords it knows
  but does not implement (`not`, `uniqueItems`, `if`/`then`, ...) and unknown
  `format`s;
- a regex or Lark grammar must compile;
- a grammar that compiles with warnings is refused too.

JSON is generated compactly with Python's separators (`{"a": 1, "b": [2, 3]}`)
and no other whitespace: free whitespace lets a model pad forever.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import jsonschema
import llguidance
import numpy as np

from mlx_llama.errors import MlxLlamaError
from mlx_llama.tokenizer import Tokenizer

# How generated JSON is spaced; x-guidance in a schema cannot override these or
# turn on llguidance's lenient mode (it is not a keyword we accept).
_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
}

# JSON Schema's vocabulary (2020-12 plus draft-07's spellings).  Anything else is
# refused rather than ignored.  Keywords llguidance cannot enforce are refused by
# its compiler, so this list needs no upkeep when llguidance learns more.
_SCHEMA_VALUED = {
    "items", "additionalProperties", "additionalItems", "not", "contains", "propertyNames",
    "if", "then", "else", "unevaluatedItems", "unevaluatedProperties", "contentSchema",
}
_SCHEMA_LISTS = {"anyOf", "allOf", "oneOf", "prefixItems"}
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
_OTHER_KEYWORDS = {
    # core
    "$schema", "$id", "$ref", "$anchor", "$dynamicRef", "$dynamicAnchor", "$recursiveRef",
    "$recursiveAnchor", "$vocabulary", "$comment", "dependencies",
    # validation
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems",
    "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties", "required",
    "dependentRequired", "format", "contentEncoding", "contentMediaType",
    # annotations: they constrain nothing
    "title", "description", "default", "deprecated", "readOnly", "writeOnly", "examples",
}
_KEYWORDS = _SCHEMA_VALUED | _SCHEMA_LISTS | _SCHEMA_MAPS | _OTHER_KEYWORDS


@dataclass(frozen=True)
class Grammar:
    """What to constrain the output to, in llguidance's grammar format; `what` names it in errors."""

    source: str
    what: str


def _subschemas(schema: dict[str, Any], path: str) -> Iterator[tuple[Any, str]]:
    for key, value in schema.items():
        if key in _SCHEMA_VALUED and not isinstance(value, list):
            yield value, f"{path}/{key}"
        elif key in _SCHEMA_LISTS or (key == "items" and isinstance(value, list)):
            yield from ((v, f"{path}/{key}/{i}") for i, v in enumerate(value))
        elif key in _SCHEMA_MAPS or key == "dependencies":
            # draft-07 dependencies map to a schema or to a list of property names
            yield from ((v, f"{path}/{key}/{k}") for k, v in value.items() if isinstance(v, (dict, bool)))


def _check_keywords(schema: Any, path: str = "") -> None:
    if not isinstance(schema, dict):
        return  # true / false
    unknown = sorted(set(schema) - _KEYWORDS)
    if unknown:
        raise MlxLlamaError(
            f"the JSON schema uses {', '.join(map(repr, unknown))} at '{path or '/'}', "
            "which is not a JSON Schema keyword the output can be held to"
        )
    open_keys = schema.get("additionalProperties", True) is not False or "patternProperties" in schema
    if open_keys and schema.get("minProperties", 0) > len(set(schema.get("required", []))):
        # The matcher may repeat a pattern/additional key ({"a": 1, "a": 2}), which
        # parses as fewer properties than it counted.
        raise MlxLlamaError(
            f"the JSON schema's minProperties at '{path or '/'}' cannot be enforced on keys beyond "
            "'required' unless additionalProperties is false and there are no patternProperties"
        )
    for sub, sub_path in _subschemas(schema, path):
        _check_keywords(sub, sub_path)


def json_schema_grammar(schema: Any) -> Grammar:
    """Output matching `schema` (a parsed JSON schema); refuses what cannot be enforced."""
    if not isinstance(schema, (dict, bool)):
        raise MlxLlamaError("a JSON schema must be an object (or true/false)")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/" + "/".join(str(p) for p in e.path)
        raise MlxLlamaError(f"the JSON schema is invalid at '{where}': {e.message}") from None
    _check_keywords(schema)
    source = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_JSON_OPTIONS)
    return Grammar(source, "the JSON schema")


def json_object_grammar() -> Grammar:
    """Any JSON object."""
    return Grammar(json_schema_grammar({"type": "object"}).source, "a JSON object")


def regex_grammar(pattern: str) -> Grammar:
    """Output matching `pattern` in full (Rust regex syntax, close to Python's)."""
    return Grammar(llguidance.LLMatcher.grammar_from_regex(pattern), f"the regex {pattern!r}")


def lark_grammar(text: str) -> Grammar:
    """Output in the language of a Lark grammar (llguidance's dialect; `start` is the top rule)."""
    return Grammar(llguidance.LLMatcher.grammar_from_lark(text), "the Lark grammar")


def choice_grammar(options: Sequence[str]) -> Grammar:
    """Exactly one of `options`."""
    if not options or any(not o for o in options):
        raise MlxLlamaError("a choice needs one or more non-empty options")
    lark = "start: " + " | ".join(json.dumps(o) for o in options)
    return Grammar(llguidance.LLMatcher.grammar_from_lark(lark), "the choice list")


@functools.lru_cache(maxsize=4)
def _ll_tokenizer_of_json(tokenizer_json: str, stop_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    # Building the token trie takes seconds for a 128k vocabulary: once per process
    # and tokenizer, even when it is loaded again (each CLI run in a test process).
    return llguidance.LLTokenizer(tokenizer_json, eos_token=list(stop_ids))


@functools.lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    # Serialising the tokenizer takes ~0.5 s: once per Tokenizer object (a server's one).
    return _ll_tokenizer_of_json(tokenizer.hf_tokenizer.to_str(), tuple(sorted(tokenizer.stop_ids)))


class ConstraintCompiler:
    """Compiles grammars against one tokenizer; makes a fresh matcher per generation.

    `vocab_size` is the model's (the width of its logits), which may exceed the
    tokenizer's: ids past the tokenizer's are never allowed.  The tokenizer's stop
    tokens are allowed exactly where the grammar accepts.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        """Seconds the first time for a tokenizer (its token trie), then instant."""
        self._tokenizer = _ll_tokenizer(tokenizer)
        self.vocab_size = vocab_size

    def constraint(self, grammar: Grammar) -> "GrammarConstraint":
        """A matcher at the start of `grammar`; raises MlxLlamaError when it cannot be enforced."""
        matcher = llguidance.LLMatcher(self._tokenizer, grammar.source, log_level=0)
        if matcher.is_error():
            raise MlxLlamaError(f"{grammar.what} cannot be enforced: {_first_line(matcher.get_error())}")
        warnings = matcher.get_grammar_warnings()
        if warnings:
            raise MlxLlamaError(f"{grammar.what} cannot be enforced exactly: {_first_line(warnings[0])}")
        return GrammarConstraint(matcher, self._tokenizer.vocab_size, self.vocab_size)


def _first_line(message: str) -> str:
    """llguidance's messages span lines (source excerpts); keep the headline and its "error:" detail."""
    lines = [line.strip() for line in message.strip().splitlines()]
    kept = lines[:1] + [line for line in lines[1:] if line.startswith("error:")]
    return " ".join(kept) or "unknown error"


class GrammarConstraint:
    """A `TokenConstraint` over an llguidance matcher (one sequence's progress through a grammar)."""

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer_vocab: int, vocab_size: int) -> None:
        self._matcher = matcher
        self._tokenizer_vocab = tokenizer_vocab
        self._vocab_size = vocab_size
        self._bits = np.zeros((tokenizer_vocab + 31) // 32, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """True where the next token may go; all False once the grammar is done."""
        mask = np.zeros(self._vocab_size, dtype=bool)
        if self._matcher.is_stopped():
            return mask
        # llguidance writes one bit per token, least significant first (~25 us on 128k).
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little").view(bool)
        n = min(self._tokenizer_vocab, self._vocab_size)
        mask[:n] = bits[:n]
        return mask

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            # Only a token the mask ruled out gets here: a caller's bug, not the user's.
            raise RuntimeError(f"the grammar matcher rejected token {token}: {self._matcher.get_error()}")

    def is_done(self) -> bool:
        """The output is complete: the grammar accepts and allows nothing more (or a stop token came)."""
        return self._matcher.is_stopped()
