"""Logits processors and sampling, written once for both array libraries.

The functions take `xp` (the `mlx.core` or `numpy` module), so the MLX model and
the NumPy reference share one sampler.  Random draws use the Gumbel-max trick with
noise from a seeded NumPy generator: the same seed and logits give the same token
on either backend, and the MLX path never waits on the device to draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in what was generated
    seed: int | None = None

    @property
    def reads_history(self) -> bool:
        """Whether a draw depends on the tokens before it (a penalty), not only on the logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        from mlx_llama.errors import MlxLlamaError

        if self.temperature < 0:
            raise MlxLlamaError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise MlxLlamaError("top-p must be in (0, 1]")
        if self.top_k < 0:
            raise MlxLlamaError("top-k must be >= 0")
        if not 0 <= self.min_p < 1:
            raise MlxLlamaError("min-p must be in [0, 1)")
        if self.repetition_penalty <= 0:
            raise MlxLlamaError("repetition penalty must be > 0")
        if self.repetition_context_size < 1:
            raise MlxLlamaError("repetition context size must be >= 1")
        for name, value in (("presence", self.presence_penalty), ("frequency", self.frequency_penalty)):
            if not -2 <= value <= 2:  # OpenAI's range (NaN fails it too)
                raise MlxLlamaError(f"{name} penalty must be in [-2, 2]")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64 (for logprobs, perplexity and KL)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def apply_allowed(xp: Any, logits: Any, allowed: np.ndarray) -> Any:
    """Mask (to -inf) the tokens an output constraint rules out; `allowed` is a boolean vocab mask."""
    return xp.where(xp.array(allowed), logits, xp.array(float("-inf"), dtype=logits.dtype))


def apply_repetition_penalty(xp: Any, logits: Any, recent_ids: np.ndarray, penalty: float) -> Any:
    """CTRL-style penalty: shrink the logits of recently seen tokens."""
    if penalty == 1.0 or len(recent_ids) == 0:
        return logits
    ids = xp.array(np.unique(recent_ids).astype(np.int32))
    picked = logits[ids]
    logits[ids] = xp.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def apply_presence_frequency_penalty(
    xp: Any, logits: Any, generated: np.ndarray, presence: float, frequency: float
) -> Any:
    """OpenAI's penalties: logit[t] -= presence * (count[t] > 0) + frequency * count[t].

    `count` is over `generated`, the tokens drawn so far in this completion (the
    prompt does not count).  The amounts are rounded to float32 once, here, so
    every backend subtracts the same numbers.
    """
    if (presence == 0 and frequency == 0) or len(generated) == 0:
        return logits
    ids, counts = np.unique(generated, return_counts=True)
    amounts = (presence + frequency * counts).astype(np.float32)
    picked = xp.array(ids.astype(np.int32))
    logits[picked] = logits[picked] - xp.array(amounts)
    return logits


def filter_logits(xp: Any, logits: Any, params: SamplingParams) -> Any:
    """Mask (to -inf) the tokens that top-k, top-p and min-p rule out."""
    neg_inf = float("-inf")
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = xp.sort(logits)[-params.top_k]
        logits = xp.where(logits < kth, neg_inf, logits)
    if params.min_p > 0:
        # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p)
        logits = xp.where(logits < xp.max(logits) + float(np.log(params.min_p)), neg_inf, logits)
    if params.top_p < 1.0:
        ordered = xp.sort(logits)  # ascending
        probs = xp.exp(ordered - ordered[-1])
        probs = probs / xp.sum(probs)
        # Drop the low tail whose total mass stays within 1 - top_p.
        tail_mass = xp.cumsum(probs)
        n_drop = xp.sum(tail_mass <= 1.0 - params.top_p)
        cutoff = ordered[xp.minimum(n_drop, logits.shape[-1] - 1)]
        logits = xp.where(logits < cutoff, neg_inf, logits)
    return logits


_NOTHING = np.empty(0, dtype=np.int64)


class Sampler:
    """Chooses the next token from one row of logits."""

    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, xp: Any, logits: Any, history: np.ndarray, generated: np.ndarray = _NOTHING) -> Any:
        """`logits` is a 1-D float array of the vocab; returns a scalar token-id array.

        `history` is the context the repetition penalty looks back on (prompt
        included); `generated`, what this completion drew so far, is what the
        presence and frequency penalties count.  Both penalties may edit `logits` in place.
        """
        p = self.params
        recent = history[-p.repetition_context_size :]
        logits = apply_repetition_penalty(xp, logits, recent, p.repetition_penalty)
        logits = apply_presence_frequency_penalty(xp, logits, generated, p.presence_penalty, p.frequency_penalty)
        if p.temperature == 0:
            return xp.argmax(logits)
        logits = filter_logits(xp, logits / p.temperature, p)
        gumbel = -np.log(-np.log(self._rng.random(logits.shape[-1], dtype=np.float32) + 1e-20) + 1e-20)
        return xp.argmax(logits + xp.array(gumbel))
