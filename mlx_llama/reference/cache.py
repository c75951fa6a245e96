"""KV caches for the NumPy reference model (imports no mlx).

Same interface and contract as `mlx_llama.model.cache`, implemented independently so
the cross-check compares two cache implementations as well: per forward pass
`make_mask(L)` once, then `update_and_fetch(k, v)` per layer; `offset` is the
position of the next token, `size` the number of cached tokens.

Masks are boolean (L, S) arrays, True where a query may attend to a key, or
None when every returned key is visible.  Keys are kept in position order (no
ring buffer), so masks follow from positions alone.
"""

from __future__ import annotations

import numpy as np

from mlx_llama.errors import MlxLlamaError


class NumpyKVCache:
    """Holds every token; capacity doubles as it fills."""

    max_size = None  # unbounded: the generation loop checks the model's context instead

    def __init__(self) -> None:
        self.keys: np.ndarray | None = None
        self.values: np.ndarray | None = None
        self.offset = 0

    @property
    def size(self) -> int:
        return self.offset

    def make_mask(self, L: int) -> np.ndarray | None:
        if L == 1:
            return None
        q = np.arange(self.offset, self.offset + L)[:, None]
        return np.arange(self.offset + L)[None, :] <= q

    def update_and_fetch(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        end = self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            cap = max(end, 2 * (0 if self.keys is None else self.keys.shape[2]), 64)
            self.keys = self._resized(self.keys, keys, cap)
            self.values = self._resized(self.values, values, cap)
        self.keys[:, :, self.offset:end] = keys
        self.values[:, :, self.offset:end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _resized(self, buf: np.ndarray | None, like: np.ndarray, cap: int) -> np.ndarray:
        B, H, _, D = like.shape
        out = np.zeros((B, H, cap, D), dtype=like.dtype)
        if buf is not None:
            out[:, :, : self.offset] = buf[:, :, : self.offset]
        return out

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def can_trim(self, n: int) -> bool:
        return n <= self.offset

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys, values, positions) of the cached tokens."""
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset], np.arange(self.offset)


class NumpyRotatingKVCache:
    """The first `keep` tokens plus a window of the latest `max_size - keep`.

    The token at position t attends to positions < keep and to positions in
    (t - window, t], whatever the prefill chunking.  Between calls at most
    `max_size` tokens are held.
    """

    def __init__(self, max_size: int, keep: int = 0) -> None:
        if max_size < 1:
            raise MlxLlamaError(f"max KV size must be positive (got {max_size})")
        if not 0 <= keep < max_size:
            raise MlxLlamaError(f"keep ({keep}) must be smaller than the max KV size ({max_size})")
        self.max_size = max_size
        self.keep = keep
        self.window = max_size - keep
        self.keys: np.ndarray | None = None
        self.values: np.ndarray | None = None
        self.positions = np.zeros(0, dtype=np.int64)
        self.offset = 0

    @property
    def size(self) -> int:
        return len(self.positions)

    def _visible(self, query: np.ndarray, key: np.ndarray) -> np.ndarray:
        q, k = query[:, None], key[None, :]
        return (k <= q) & ((k > q - self.window) | (k < self.keep))

    def make_mask(self, L: int) -> np.ndarray | None:
        if L == 1:
            return None  # update_and_fetch returns exactly what the new token sees
        queries = np.arange(self.offset, self.offset + L)
        return self._visible(queries, np.concatenate([self.positions, queries]))

    def update_and_fetch(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        L = keys.shape[2]
        new = np.arange(self.offset, self.offset + L)
        positions = np.concatenate([self.positions, new])
        all_k = keys if self.keys is None else np.concatenate([self.keys, keys], axis=2)
        all_v = values if self.values is None else np.concatenate([self.values, values], axis=2)
        self.offset += L
        # What the newest token may see is all that any later token may see.
        keep = self._visible(new[-1:], positions)[0]
        self.keys, self.values, self.positions = all_k[:, :, keep], all_v[:, :, keep], positions[keep]
        if L == 1:
            return self.keys, self.values
        return all_k, all_v

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def can_trim(self, n: int) -> bool:
        """Whether forgetting the last `n` tokens leaves everything the next token would attend to."""
        start = self.offset - min(n, self.offset)
        needed = np.arange(max(self.keep, start - self.window + 1), start)
        return bool(np.isin(needed, self.positions).all())

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens when `can_trim(n)`; returns how many were forgotten."""
        n = min(n, self.offset)
        if n == 0 or not self.can_trim(n):
            return 0
        self.offset -= n
        kept = self.positions < self.offset
        self.keys, self.values, self.positions = self.keys[:, :, kept], self.values[:, :, kept], self.positions[kept]
        return n

    @property
    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.keys, self.values, self.positions.copy()


def make_numpy_cache(num_layers: int, max_kv_size: int | None = None, keep: int = 4) -> list:
    if max_kv_size is None:
        return [NumpyKVCache() for _ in range(num_layers)]
    return [NumpyRotatingKVCache(max_kv_size, keep) for _ in range(num_layers)]
