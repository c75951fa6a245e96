"""The generation loop: chunked prefill, then decode until a stop token or the budget.

The loop drives any `LanguageModel` (mlx_llama.interfaces): the MLX model or the
NumPy reference, each through its own array library `model.xp`.

Cache invariant: when the generator finishes (or is closed), the cache holds the
prompt and every token it yielded, the last one included.  Chat relies on it to
continue a conversation by feeding only the new tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import mlx.core as mx
import numpy as np

from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.requests import TokenConstraint
from mlx_llama.generation.sampler import Sampler, SamplingParams, apply_allowed
from mlx_llama.interfaces import KVCache, LanguageModel


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    peak_memory_bytes: int = 0
    finish_reason: str = ""  # "stop", "length" or "" while running
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds else 0.0


def _sync(xp: Any, *arrays: Any) -> None:
    if xp is mx:
        mx.eval(*arrays)


def _start(xp: Any, *arrays: Any) -> None:
    if xp is mx:
        mx.async_eval(*arrays)


def check_context(model: LanguageModel, n_prompt: int) -> None:
    """Refuse a prompt that does not fit a growing cache."""
    limit = model.config.max_position_embeddings
    if n_prompt > limit:
        raise MlxLlamaError(
            f"the prompt has {n_prompt} tokens but the model's context is {limit}; "
            "shorten it or pass --max-kv-size to use a rotating cache"
        )


def prefill(model: LanguageModel, cache: Sequence[KVCache], tokens: Sequence[int], step: int = 512) -> Any:
    """Feed `tokens` through the cache in chunks; returns the last position's logits (vocab,)."""
    xp = model.xp
    if not len(tokens):
        raise MlxLlamaError("the prompt is empty")
    if step < 1:
        raise MlxLlamaError("prefill step size must be >= 1")
    logits = None
    for start in range(0, len(tokens), step):
        chunk = xp.array(np.asarray(tokens[start : start + step], dtype=np.int32))[None]
        logits = model(chunk, cache, last_only=True)
        # Evaluate per chunk so the cache's lazy graph never spans the whole prompt.
        _sync(xp, logits, *[c.state[0] for c in cache])
    return logits[0, -1]


def generate_tokens(
    model: LanguageModel,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    sampler: Sampler | None = None,
    max_kv_size: int | None = None,
    keep: int = 4,
    prefill_step_size: int = 512,
    cache: list[KVCache] | None = None,
    stop_ids: Sequence[int] = (),
    stats: GenerationStats | None = None,
    constraint: TokenConstraint | None = None,
) -> Iterator[int]:
    """Yield generated token ids for `prompt_ids`.

    `sampler` draws each token (greedy when None; `Sampler(SamplingParams(...))`
    otherwise; chat keeps one, and its RNG, across turns).  With `cache` given,
    `prompt_ids` are the tokens that continue what the cache already holds (chat
    turns); otherwise a fresh cache is made (rotating when `max_kv_size` is set,
    keeping the first `keep` tokens).  Generation stops after yielding a token in
    `stop_ids` or after `max_tokens` tokens.  A `constraint` masks each draw to
    the tokens it allows and ends generation (finish "stop") when it is done.
    """
    if sampler is None:
        sampler = Sampler(SamplingParams())
    if max_tokens < 0:
        raise MlxLlamaError("max tokens must be >= 0")
    if cache is None:
        cache = model.make_cache(max_kv_size, keep)
    if cache[0].max_size is None:
        # A growing cache must not run past the positions the model was trained for.
        check_context(model, cache[0].offset + len(prompt_ids))
        room = model.config.max_position_embeddings - cache[0].offset - len(prompt_ids)
        max_tokens = min(max_tokens, room)
    return _decode_loop(model, cache, list(prompt_ids), sampler, max_tokens, prefill_step_size,
                        frozenset(stop_ids), stats if stats is not None else GenerationStats(), constraint)


def _decode_loop(
    model: LanguageModel, cache: Sequence[KVCache], prompt: list[int], sampler: Sampler, max_tokens: int,
    step: int, stop_ids: frozenset[int], stats: GenerationStats, constraint: TokenConstraint | None,
) -> Iterator[int]:
    xp = model.xp
    if xp is mx:
        mx.reset_peak_memory()
    t0 = time.perf_counter()
    logits = prefill(model, cache, prompt, step)
    history = np.asarray(prompt, dtype=np.int64)
    # With a penalty the sampler needs every token in Python before the next
    # draw, so the one-step lookahead pipelining is only used without one.
    lookahead = not sampler.params.reads_history

    def forward(token: Any) -> Any:
        return model(xp.reshape(token, (1, 1)), cache, last_only=True)[0, -1]

    def draw(logits: Any) -> Any:
        if constraint is not None:
            allowed = constraint.allowed()
            if not allowed.any():
                raise MlxLlamaError("the output constraint allows no next token")
            logits = apply_allowed(xp, logits, allowed)
        return sampler(xp, logits, history, history[len(prompt) :])

    token = draw(logits)
    _sync(xp, token)
    stats.prompt_tokens = len(prompt)
    stats.prompt_seconds = time.perf_counter() - t0
    stats.finish_reason = "length"
    t1 = time.perf_counter()
    logits = None
    try:
        for n in range(max_tokens):
            logits = forward(token)  # feeds `token` to the cache (lazily)
            done = False
            if constraint is not None:
                # The forward pass runs while the matcher takes the token and, in
                # draw(), computes the next mask.
                _start(xp, logits)
                constraint.advance(int(token.item()))
                done = constraint.is_done()
            if lookahead and not done:
                # Start the next step before handing this token to Python.
                next_token = draw(logits)
                _start(xp, next_token)
            tok = int(token.item())
            history = np.append(history, tok)
            stats.generation_tokens = n + 1
            stats.generation_seconds = time.perf_counter() - t1
            yield tok
            if tok in stop_ids or done:
                stats.finish_reason = "stop"
                return
            if not lookahead:
                next_token = draw(logits)
                _sync(xp, next_token)
            token = next_token
    finally:
        if logits is not None:
            _sync(xp, logits)  # the last yielded token's cache update must happen
        if xp is mx:
            stats.peak_memory_bytes = mx.get_peak_memory()
