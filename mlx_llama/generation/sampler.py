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
    seed: int | None = None

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


class Sampler:
    """Chooses the next token from one row of logits."""

    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, xp: Any, logits: Any, history: np.ndarray) -> Any:
        """`logits` is a 1-D float array of the vocab; returns a scalar token-id array."""
        p = self.params
        recent = history[-p.repetition_context_size :]
        logits = apply_repetition_penalty(xp, logits, recent, p.repetition_penalty)
        if p.temperature == 0:
            return xp.argmax(logits)
        logits = filter_logits(xp, logits / p.temperature, p)
        gumbel = -np.log(-np.log(self._rng.random(logits.shape[-1], dtype=np.float32) + 1e-20) + 1e-20)
        return xp.argmax(logits + xp.array(gumbel))
