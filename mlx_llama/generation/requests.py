"""What a caller hands the batched engine and what it gets back, one token at a time.

The engine (`mlx_llama.generation.engine`) owns MLX and runs on one thread; the
server and the batch mode talk to it only through these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

import numpy as np

from mlx_llama.generation.sampler import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]


class TokenConstraint(Protocol):
    """Restricts which tokens a sequence may draw next (a grammar or schema matcher).

    The engine asks `allowed()` before sampling the row and calls `advance(token)`
    after; `is_done()` ends the sequence with finish_reason "stop".
    """

    def allowed(self) -> np.ndarray:
        """A boolean mask over the vocabulary, True where the token may come next."""

    def advance(self, token: int) -> None: ...

    def is_done(self) -> bool: ...


@dataclass
class GenerationRequest:
    prompt_ids: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k best
    constraint: TokenConstraint | None = None
    return_logits: bool = False  # attach each step's raw logits row to its TokenEvent (tests, debugging)


@dataclass
class TokenEvent:
    """One step's output for one request; `finish_reason` is set on the request's last event."""

    request_id: int
    token: int | None  # None on an event that only finishes (cancelled, error, refused)
    finish_reason: FinishReason | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None  # with finish_reason "error": one line saying why
    logits: np.ndarray | None = None  # (vocab,) float32 when the request asked for return_logits


@dataclass
class RequestInfo:
    request_id: int
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
