"""One row of a batch's logits → the next token, its log-probabilities and the constraint's say.

Each request gets its own `RowSampler` (its own `Sampler`, hence its own seeded
RNG, history and constraint), and the row is handled in NumPy on its own: what
a row draws depends on its logits and its own past only, never on batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlx_llama.generation.requests import GenerationRequest
from mlx_llama.generation.sampler import Sampler, apply_allowed, log_softmax


@dataclass
class Draw:
    token: int | None  # None: the constraint allowed no token
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class RowSampler:
    """Samples one request's tokens; `history` is its prompt plus what it drew."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.sampler = Sampler(request.sampling)
        self.history = np.asarray(request.prompt_ids, dtype=np.int64)
        self._prompt_len = len(self.history)

    def draw(self, logits: np.ndarray) -> Draw:
        """`logits` (vocab,) float32, the model's raw output for this row (left unmodified).

        Log-probabilities are those of the model's distribution (before the
        temperature, penalty, filters and constraint), as OpenAI's API reports them.
        """
        req = self.request
        row = logits.copy()  # the sampler's penalties edit in place
        if req.constraint is not None:
            allowed = np.asarray(req.constraint.allowed(), dtype=bool)
            if not allowed.any():
                return Draw(None)
            row = apply_allowed(np, row, allowed)
        token = int(self.sampler(np, row, self.history, self.history[self._prompt_len :]))
        self.history = np.append(self.history, token)
        if req.constraint is not None:
            req.constraint.advance(token)
        if req.top_logprobs is None:
            return Draw(token)
        lp = log_softmax(logits)
        k = min(req.top_logprobs, len(lp))
        best = np.argpartition(-lp, k - 1)[:k] if k else np.empty(0, dtype=np.int64)
        best = best[np.argsort(-lp[best], kind="stable")]
        return Draw(token, float(lp[token]), [(int(t), float(lp[t])) for t in best])

    def constraint_done(self) -> bool:
        c = self.request.constraint
        return c is not None and c.is_done()
