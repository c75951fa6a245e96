"""KV caches for the MLX model.

Every cache answers two calls per forward pass, made in this order:
`make_mask(L)` (once, shared by all layers) and `update_and_fetch(k, v)`
(once per layer).  The mask describes exactly the key layout that
`update_and_fetch` returns, so the attention code needs no knowledge of how a
cache stores its entries.

Positions are absolute token indices; `offset` is the number of tokens the cache
has seen, i.e. the position of the next token.
"""

from __future__ import annotations

from typing import Protocol, Union

import mlx.core as mx
import numpy as np

from mlx_llama.errors import MlxLlamaError

Mask = Union[None, str, mx.array]

GROWTH_STEP = 256  # grow buffers in chunks so decode does not reallocate every token


class SlotCache(Protocol):
    """A cache whose buffers a decoding row's attention writes in place (`Attention._attend_rows`)."""

    keys: mx.array | None
    values: mx.array | None

    def reserve_one(self, like: mx.array) -> tuple[int, int]:
        """The slot the next token's key and value go to, and how many slots its query attends to."""


def _grow(buf: mx.array | None, needed: int, like: mx.array, cap: int | None = None) -> mx.array:
    """Return `buf` with capacity for at least `needed` entries along axis 2."""
    have = 0 if buf is None else buf.shape[2]
    if needed <= have:
        return buf
    new_cap = ((needed + GROWTH_STEP - 1) // GROWTH_STEP) * GROWTH_STEP
    if cap is not None:
        new_cap = min(new_cap, cap)
    B, H, _, D = like.shape
    extra = mx.zeros((B, H, new_cap - have, D), dtype=like.dtype)
    return extra if buf is None else mx.concatenate([buf, extra], axis=2)


def _nbytes(*arrays: mx.array | None) -> int:
    return sum(a.nbytes for a in arrays if a is not None)


class KVCache:
    """Holds every token; grows in steps of 256."""

    max_size = None  # unbounded: the generation loop checks the model's context instead

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def size(self) -> int:
        return self.offset

    def make_mask(self, L: int) -> Mask:
        # MLX's "causal" aligns the query block with the last L keys.
        return "causal" if L > 1 else None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        L = keys.shape[2]
        end = self.offset + L
        self.keys = _grow(self.keys, end, keys)
        self.values = _grow(self.values, end, values)
        self.keys[..., self.offset:end, :] = keys
        self.values[..., self.offset:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def reserve_one(self, like: mx.array) -> tuple[int, int]:
        """Room for one more token whose key is like `like` (1, kv_heads, 1, head_dim): the slot
        its key and value go to, and how many slots its query then attends to.  The caller writes
        the slot into `keys` and `values` in place (`ops.attention_rows_update`): the buffers are
        this cache's alone (its functional updates replace them with new arrays, and `state` and
        fetches hand out views for the step that takes them; the prefix and prompt caches copy)."""
        slot = self.offset
        self.keys = _grow(self.keys, slot + 1, like)
        self.values = _grow(self.values, slot + 1, like)
        self.offset = slot + 1
        return slot, slot + 1

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys, self.values)

    def can_trim(self, n: int) -> bool:
        return n <= self.offset

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens; returns how many were forgotten."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array, mx.array, np.ndarray]:
        """(keys, values, positions) of the cached tokens, in slot order."""
        return (
            self.keys[..., : self.offset, :],
            self.values[..., : self.offset, :],
            np.arange(self.offset),
        )


class RotatingKVCache:
    """A bounded cache: the first `keep` tokens plus the most recent ones.

    Contract: the token at position t attends to positions < `keep` and to the
    last `max_size - keep` positions up to and including t, whatever the prefill
    chunking.  Between calls it never holds more than `max_size` tokens; during
    a multi-token chunk it transiently holds the chunk as well.

    Storage: slots [0, keep) hold the kept tokens; slots [keep, max_size) are a
    ring over the window.  `_pos` records each slot's position, so the mask for a
    multi-token chunk is computed from positions rather than from slot order.
    """

    def __init__(self, max_size: int, keep: int = 0) -> None:
        if max_size < 1:
            raise MlxLlamaError(f"max KV size must be positive (got {max_size})")
        if not 0 <= keep < max_size:
            raise MlxLlamaError(f"keep ({keep}) must be smaller than the max KV size ({max_size})")
        self.max_size = max_size
        self.keep = keep
        self.window = max_size - keep
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self._pos = np.empty(0, dtype=np.int64)  # position held by each used slot
        self._ring = keep  # next slot to overwrite once full
        self.offset = 0

    @property
    def size(self) -> int:
        return len(self._pos)

    def _allowed(self, query_pos: np.ndarray, key_pos: np.ndarray) -> np.ndarray:
        q, k = query_pos[:, None], key_pos[None, :]
        return (k <= q) & ((k < self.keep) | (k > q - self.window))

    def make_mask(self, L: int) -> Mask:
        if L == 1:
            # A single token sees every slot: evictions keep the slots exactly
            # at "kept + last window positions".
            return None
        queries = np.arange(self.offset, self.offset + L)
        keys = np.concatenate([self._pos, queries])
        return mx.array(self._allowed(queries, keys))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        L = keys.shape[2]
        if L == 1:
            return self._update_one(keys, values)
        n = self.size
        all_k = keys if n == 0 else mx.concatenate([self.keys[..., :n, :], keys], axis=2)
        all_v = values if n == 0 else mx.concatenate([self.values[..., :n, :], values], axis=2)
        positions = np.concatenate([self._pos, np.arange(self.offset, self.offset + L)])
        self.offset += L
        # Keep what any future token may still attend to, in position order.
        last = self.offset - 1
        retained = (positions < self.keep) | (positions > last - self.window)
        order = np.flatnonzero(retained)
        order = order[np.argsort(positions[order], kind="stable")]
        idx = mx.array(order.astype(np.int32))
        self.keys, self.values = all_k[..., idx, :], all_v[..., idx, :]
        self._pos = positions[order]
        self._ring = self.keep
        return all_k, all_v

    def _update_one(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        slot, n = self.reserve_one(keys)
        self.keys[..., slot : slot + 1, :] = keys
        self.values[..., slot : slot + 1, :] = values
        return self.keys[..., :n, :], self.values[..., :n, :]

    def reserve_one(self, like: mx.array) -> tuple[int, int]:
        """`KVCache.reserve_one`: the next free slot, or once full the ring's oldest window slot."""
        n = self.size
        if n < self.max_size:
            slot = n
            self.keys = _grow(self.keys, n + 1, like, cap=self.max_size)
            self.values = _grow(self.values, n + 1, like, cap=self.max_size)
            self._pos = np.append(self._pos, self.offset)
            n += 1
        else:
            slot = self._ring
            self._ring = self.keep + (self._ring - self.keep + 1) % self.window
            self._pos[slot] = self.offset
        self.offset += 1
        return slot, n

    @property
    def state(self) -> tuple[mx.array, mx.array, np.ndarray]:
        """(keys, values, positions) of the cached tokens, in slot order."""
        n = self.size
        return self.keys[..., :n, :], self.values[..., :n, :], self._pos.copy()

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys, self.values)

    def can_trim(self, n: int) -> bool:
        """Whether forgetting the last `n` tokens leaves exactly what a run that never
        saw them would hold: every position the next token attends to is still here.
        Always true for n <= 1; for more, only until the window has started evicting."""
        n = min(n, self.offset)
        new_offset = self.offset - n
        needed = np.arange(max(self.keep, new_offset - self.window + 1), new_offset)
        return bool(np.isin(needed, self._pos).all())

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens when `can_trim(n)`; returns how many were forgotten (0 when it cannot)."""
        n = min(n, self.offset)
        if n == 0 or not self.can_trim(n):
            return 0
        self.offset -= n
        order = np.flatnonzero(self._pos < self.offset)
        order = order[np.argsort(self._pos[order], kind="stable")]
        idx = mx.array(order.astype(np.int32))
        self.keys, self.values = self.keys[..., idx, :], self.values[..., idx, :]
        self._pos = self._pos[order]
        self._ring = self.keep  # slots are in position order again: the oldest window slot is `keep`
        return n


def make_cache(num_layers: int, max_kv_size: int | None = None, keep: int = 4) -> list[KVCache | RotatingKVCache]:
    """One cache per layer: growing, or rotating when `max_kv_size` is given."""
    if max_kv_size is None:
        return [KVCache() for _ in range(num_layers)]
    return [RotatingKVCache(max_kv_size, keep) for _ in range(num_layers)]
