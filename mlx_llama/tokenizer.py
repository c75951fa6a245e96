"""Tokenizer, chat template and streaming detokenization for LLaMA-3 model directories."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from jinja2 import TemplateError, meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from mlx_llama.llama3_template import LLAMA3_CHAT_TEMPLATE
from mlx_llama.config import ModelConfig, read_optional_json, token_ids
from mlx_llama.errors import MlxLlamaError
from mlx_llama.files import check_readable, read_text
from mlx_llama.interfaces import Message
from mlx_llama.tool_prompt import plain_messages


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    # transformers >= 4.43 writes chat_template.jinja; older ones chat_template.json or the config.
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return read_text(jinja)
    template = read_optional_json(model_dir / "chat_template.json").get("chat_template")
    template = template or tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise MlxLlamaError(f"{model_dir}: the chat template must be a string, not {type(template).__name__}")
    return template


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    # Plain JSON as transformers renders it: jinja2's own tojson HTML-escapes <, >, & and '.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


class Tokenizer:
    """Wraps a `tokenizer.json`; knows the model's stop tokens and chat template."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None = None,
        eos_ids: Iterable[int] = (),
        chat_template: str | None,
    ) -> None:
        self._tok = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        stop = set(int(i) for i in eos_ids)
        eot = backend.token_to_id("<|eot_id|>")
        if eot is not None:
            stop.add(eot)
        self.stop_ids = frozenset(stop)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        source = chat_template or LLAMA3_CHAT_TEMPLATE
        try:
            self._template = env.from_string(source)
            # A template that reads `tools` renders them (Llama 3.1+); others get tool_prompt's rewrite.
            self.template_renders_tools = "tools" in meta.find_undeclared_variables(env.parse(source))
        except TemplateError as e:
            raise MlxLlamaError(f"the model's chat template does not parse: {e}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path, config: ModelConfig | None = None,
                 generation_config: Mapping[str, Any] | None = None) -> "Tokenizer | None":
        """The tokenizer of a model directory, or None when it ships no tokenizer.json.

        Stop tokens: every eos id in config.json, generation_config.json and
        tokenizer_config.json, plus `<|eot_id|>`.  A loaded model passes its
        configs; otherwise they are read from the directory.
        """
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            return None
        check_readable(path)
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises its own exception type
            raise MlxLlamaError(f"cannot read {path}: {e}") from None
        tok_config = read_optional_json(model_dir / "tokenizer_config.json")
        if generation_config is None:
            generation_config = read_optional_json(model_dir / "generation_config.json")
        eos_ids = list(config.eos_token_id) if config is not None else token_ids(
            read_optional_json(model_dir / "config.json").get("eos_token_id"))
        eos_ids += token_ids(generation_config.get("eos_token_id"))
        eos_text = _token_text(tok_config.get("eos_token"))
        if eos_text and backend.token_to_id(eos_text) is not None:
            eos_ids.append(backend.token_to_id(eos_text))
        return cls(
            backend,
            bos_token=_token_text(tok_config.get("bos_token")) or "<|begin_of_text|>",
            eos_token=eos_text,
            eos_ids=eos_ids,
            chat_template=_read_chat_template(model_dir, tok_config),
        )

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer`, for libraries built on it (grammar matchers)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token text such as `<|eot_id|>` maps to its id."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt text; `tools` are OpenAI-style definitions ({"type": "function", "function": ...})."""
        extra: dict[str, Any] = {}
        if not self.template_renders_tools:
            messages = plain_messages(messages, tools)
        elif tools:
            extra["tools"] = list(tools)
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except TemplateError as e:
            raise MlxLlamaError(f"chat template error: {e}") from None

    def encode_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                    tools=tools))

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns a stream of ids into text pieces that never split a UTF-8 character.

    Text is decoded from the ids since the last complete character, with one id of
    left context so tokenizers that treat a leading space specially decode it right.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._context: list[int] = []
        self._pending: list[int] = []

    def _decode_pending(self) -> str:
        prefix = self._tok.decode(self._context)
        return self._tok.decode(self._context + self._pending)[len(prefix):]

    def add(self, token: int) -> str:
        """Feed one id; returns the text it completes (possibly empty)."""
        self._pending.append(int(token))
        text = self._decode_pending()
        if text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next id
        self._context = self._pending[-1:]
        self._pending = []
        return text

    def flush(self) -> str:
        """Whatever is left at the end of the stream."""
        text = self._decode_pending() if self._pending else ""
        self._context, self._pending = [], []
        return text
