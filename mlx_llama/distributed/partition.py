"""Which tensors each pipeline rank holds: contiguous layer ranges balanced by bytes.

Rank 0 holds the two ends of the model besides its layers: the token
embedding, the final norm and the output head (for a tied embedding, the
embedding matrix again, so it is held once).  The last rank sends its hidden
states back to rank 0, which turns them into logits.  Those bytes, and the
memory of the tokenizer rank 0 alone loads, count towards rank 0's share, so
rank 0 gets fewer layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from mlx_llama.errors import MlxLlamaError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EMBEDDING_PREFIX = "model.embed_tokens."
HEAD_PREFIXES = ("model.norm.", "lm_head.")


@dataclass(frozen=True)
class StagePlan:
    """What one rank of `size` holds: `layers` (checkpoint indices), and on rank 0 the embedding and the head."""

    rank: int
    size: int
    layers: range

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def holds(self, name: str, tied_embeddings: bool) -> bool:
        """Whether the checkpoint tensor `name` belongs to this rank."""
        m = _LAYER.match(name)
        if m:
            return int(m.group(1)) in self.layers
        if name.startswith(EMBEDDING_PREFIX):
            return self.first
        if name.startswith(HEAD_PREFIXES):
            # A tied checkpoint's stray lm_head copy is never loaded: the embedding serves.
            return self.first and not (tied_embeddings and name.startswith("lm_head."))
        return False


def _part_bytes(prefix: list[int], lo: int, hi: int) -> int:
    return prefix[hi] - prefix[lo]


def split_layers(layer_bytes: list[int], size: int, first_extra: int = 0) -> list[range]:
    """`size` contiguous, non-empty layer ranges that minimise the largest rank's bytes.

    `first_extra` is the bytes rank 0 holds besides layers (embedding, norm and
    head).  Exact dynamic programme over the split points:
    O(size × layers²), nothing for ≤ a few hundred layers.
    """
    n = len(layer_bytes)
    if size < 1:
        raise MlxLlamaError("a pipeline needs at least one rank")
    if n < size:
        raise MlxLlamaError(f"the model has {n} layers: it cannot be split across {size} ranks")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def cost(rank: int, lo: int, hi: int) -> int:
        return _part_bytes(prefix, lo, hi) + (first_extra if rank == 0 else 0)

    inf = float("inf")
    # best[r][i]: the smallest possible max over ranks 0..r-1 holding layers [0, i); cut[r][i]: rank r-1's start.
    best = [[inf] * (n + 1) for _ in range(size + 1)]
    cut = [[0] * (n + 1) for _ in range(size + 1)]
    best[0][0] = 0
    for r in range(1, size + 1):
        for i in range(r, n - (size - r) + 1):
            for j in range(r - 1, i):
                value = max(best[r - 1][j], cost(r - 1, j, i))
                if value < best[r][i]:
                    best[r][i], cut[r][i] = value, j
    bounds = [n]
    for r in range(size, 0, -1):
        bounds.append(cut[r][bounds[-1]])
    bounds.reverse()
    return [range(bounds[r], bounds[r + 1]) for r in range(size)]


def plan_stages(tensor_bytes: Mapping[str, int], num_layers: int, size: int, tied_embeddings: bool,
                rank0_extra: int = 0) -> list[StagePlan]:
    """The plan of every rank for a checkpoint whose tensors have these sizes; `rank0_extra`:
    bytes rank 0 holds besides tensors (its tokenizer)."""
    layer_bytes = [0] * num_layers
    ends = rank0_extra  # and the embedding, norm and head: rank 0's
    first = StagePlan(0, size, range(0))
    for name, nbytes in tensor_bytes.items():
        m = _LAYER.match(name)
        if m and int(m.group(1)) < num_layers:
            layer_bytes[int(m.group(1))] += nbytes
        elif first.holds(name, tied_embeddings):
            ends += nbytes
    ranges = split_layers(layer_bytes, size, first_extra=ends)
    return [StagePlan(rank, size, layers) for rank, layers in enumerate(ranges)]
