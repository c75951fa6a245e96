"""The types the generation side works against: a language model, its KV caches, a tokenizer.

Both backends implement them (the MLX model in `mlx_llama.model`, the NumPy
reference in `mlx_llama.reference`), so the generation loop, chat and the
prompt cache never ask an object what it can do.  The array library is the
model's `xp` (mlx.core or numpy); arrays are typed `Any` because the two have
no common type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence, TypedDict, runtime_checkable

import numpy as np

from mlx_llama.config import ModelConfig


class ToolCallFunction(TypedDict):
    name: str
    arguments: dict[str, Any]  # parsed, as chat templates expect (they `tojson` it)


class ToolCall(TypedDict):
    type: str  # "function"
    function: ToolCallFunction


class _MessageFields(TypedDict):
    role: str  # "system", "user", "assistant" or "tool" (a tool's result)
    content: str


class Message(_MessageFields, total=False):
    # An assistant turn that called tools.  Hugging Face's convention: absent otherwise, not
    # empty, since templates test `'tool_calls' in message`.
    tool_calls: list[ToolCall]


@runtime_checkable
class KVCache(Protocol):
    """One layer's keys and values.

    Per forward pass the model calls `make_mask(L)` once (on the first layer's
    cache) and `update_and_fetch` once per layer.  Keys and values are
    (B, kv_heads, T, head_dim); positions are absolute token indices.
    """

    offset: int  # tokens seen so far: the position of the next token

    @property
    def max_size(self) -> int | None:
        """The most tokens held between calls (a rotating cache), or None for a growing one."""

    @property
    def size(self) -> int:
        """Tokens held now."""

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held now."""

    @property
    def state(self) -> tuple[Any, Any, np.ndarray]:
        """(keys, values, positions) of the held tokens, in slot order; feeding keys and
        values back as one chunk leaves any cache type as a prefill of those tokens would."""

    def make_mask(self, L: int) -> Any:
        """The attention mask for the next L query tokens over what `update_and_fetch` returns."""

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        """Store (B, kv_heads, L, head_dim) keys/values; return every key/value the queries attend to."""

    def can_trim(self, n: int) -> bool:
        """Whether forgetting the last n tokens leaves exactly what a run that never saw them holds."""

    def trim(self, n: int) -> int:
        """Forget the last n tokens when `can_trim(n)`; returns how many were forgotten."""


class LanguageModel(Protocol):
    """A decoder: token ids (B, L) and per-layer caches → logits (B, L or 1, vocab)."""

    config: ModelConfig
    xp: Any  # the array library: mlx.core or numpy
    path: Path  # the directory it was loaded from
    generation_config: Mapping[str, Any]  # generation_config.json (empty when absent)

    @property
    def dtype(self) -> Any:
        """The compute dtype (in the model's array library)."""

    def make_cache(self, max_kv_size: int | None = None, keep: int = 4) -> list[KVCache]:
        """One cache per layer: growing, or rotating (keeping the first `keep` tokens) with `max_kv_size`."""

    def __call__(self, tokens: Any, cache: Sequence[KVCache] | None = None, *, last_only: bool = False) -> Any:
        """Logits for `tokens`; with `last_only`, for the last position only."""


class Detokenizer(Protocol):
    def add(self, token: int) -> str:
        """Text completed by this token (possibly empty while a UTF-8 sequence is open)."""

    def flush(self) -> str:
        """Whatever text is still pending."""


class TokenizerLike(Protocol):
    stop_ids: frozenset[int]  # tokens that end an answer (eos, <|eot_id|>)

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str: ...

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None) -> str: ...

    def encode_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]: ...

    def detokenizer(self) -> Detokenizer: ...


TokenStream = Iterator[int]
