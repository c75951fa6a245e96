"""Tools in the prompt (a template that renders them, and mlx_llama.tool_prompt's rewrite for one that
does not) and the "auto" tool grammar, token by token: text or one call, nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mlx_llama.generation.constraints import ConstraintCompiler
from mlx_llama.interfaces import Message
from mlx_llama.server.schemas import ChatCompletionRequest
from mlx_llama.server.tools import tool_grammar
from mlx_llama.tokenizer import Tokenizer
from mlx_llama.tool_prompt import TOOLS_PREAMBLE, tool_call_text

# Meta's Llama-3.2 instruct template (as llama.cpp keeps it in models/templates/).
LLAMA32_TEMPLATE = Path(__file__).parent / "data" / "llama-3.2-instruct.jinja"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & here",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATION: list[Message] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": '{"temperature": 21}'},
]


@pytest.fixture(scope="module")
def llama32_dir(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama32")
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copyfile(tiny_chat_model / name, out / name)
    config = json.loads((tiny_chat_model / "tokenizer_config.json").read_text())
    config["chat_template"] = LLAMA32_TEMPLATE.read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def tok(tiny_chat_model: Path) -> Tokenizer:
    t = Tokenizer.from_dir(tiny_chat_model)
    assert t is not None
    return t


def test_a_template_with_tools_renders_them_as_transformers_does(llama32_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_dir(llama32_dir)
    assert tok is not None and tok.template_renders_tools
    hf = transformers.AutoTokenizer.from_pretrained(llama32_dir)
    expected = hf.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CONVERSATION, tools=TOOLS) == expected
    assert '"description": "Weather <now> & here"' in expected  # plain JSON, not HTML-escaped


def test_a_template_without_tools_gets_them_in_the_system_message(tok: Tokenizer) -> None:
    assert not tok.template_renders_tools
    block = TOOLS_PREAMBLE + json.dumps(TOOLS[0], indent=4) + "\n\n"
    plain: list[Message] = [
        {"role": "system", "content": block + "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": tool_call_text("get_weather", {"city": "Oslo"})},
        {"role": "ipython", "content": '{"temperature": 21}'},
    ]
    assert tok.apply_chat_template(CONVERSATION, tools=TOOLS) == tok.apply_chat_template(plain)
    without_system = tok.apply_chat_template(CONVERSATION[1:2], tools=TOOLS)
    assert without_system.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                      + TOOLS_PREAMBLE)


def _auto_constraint(tokenizer: Tokenizer) -> Any:
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                    "tools": TOOLS})
    return ConstraintCompiler(tokenizer, tokenizer.vocab_size).constraint(tool_grammar(request))


@pytest.mark.parametrize("text,whole", [
    ("It is sunny, {mostly}.", False),
    (tool_call_text("get_weather", {"city": "Oslo"}), True),
])
def test_auto_grammar_takes_text_or_a_call(tok: Tokenizer, text: str, whole: bool) -> None:
    constraint = _auto_constraint(tok)
    for token in tok.encode(text):
        assert constraint.allowed()[token]
        constraint.advance(token)
    assert constraint.is_done() == whole
    eot = tok.encode("<|eot_id|>")[0]
    assert constraint.allowed()[eot] != whole  # text may end; a whole call already has


@pytest.mark.parametrize("text", ['{"answer": 1}', '{"name": "set_weather"', '{"name": "get_weather", "x"'])
def test_auto_grammar_refuses_json_that_is_not_a_call(tok: Tokenizer, text: str) -> None:
    constraint = _auto_constraint(tok)
    tokens = tok.encode(text)
    for i, token in enumerate(tokens):
        if not constraint.allowed()[token]:
            assert i > 0  # "{" itself opens a call
            return
        constraint.advance(token)
    pytest.fail(f"the grammar took {text!r}")
