"""An in-memory prefix cache across requests: the KV of finished sequences, LRU within a byte budget.

An entry holds, per layer, the keys and values of positions 0..n-1 and the n
token ids they came from.  A new request reuses the longest prefix an entry
shares with its prompt, rounded down to a multiple of `align` (the engine's
prefill chunk): then the rest of the prompt is prefilled in exactly the chunks a
cold run would use, so a hit changes no logits bit (the stored keys already
carry RoPE, so feeding them back as one chunk rebuilds any cache type).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import mlx.core as mx

from mlx_llama.generation.prompt_cache import prefix_state, common_prefix
from mlx_llama.interfaces import KVCache

LayerKV = tuple[mx.array, mx.array]


class PrefixCache:
    def __init__(self, max_bytes: int, align: int) -> None:
        self.max_bytes = max_bytes
        self.align = align
        self._entries: OrderedDict[tuple[int, ...], list[LayerKV]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, ids: Sequence[int], cache: Sequence[KVCache]) -> bool:
        """Keep the KV of the cache's first len(ids) positions; False when evicted (rotating) or too big."""
        key = tuple(int(t) for t in ids)
        if not key or self.max_bytes <= 0:
            return False
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        layers = []
        for c in cache:
            state = prefix_state(c, len(key))
            if state is None:
                return False
            layers.append(state)
        size = sum(k.nbytes + v.nbytes for k, v in layers)
        if size > self.max_bytes:
            return False
        mx.eval(layers)  # copies: the entry must not keep the sequence's whole buffers alive
        self._entries[key] = layers
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= sum(k.nbytes + v.nbytes for k, v in old)
        return True

    def restore(self, prompt: Sequence[int], make_cache: Callable[[], list[KVCache]]) -> tuple[list[KVCache], int]:
        """A cache holding the longest usable cached prefix of `prompt`, and its length (0: a fresh cache).

        At least one prompt token is always left to feed: its logits start the answer.
        """
        best_key, best = None, 0
        for key in self._entries:
            n = min(common_prefix(key, prompt), len(prompt) - 1) // self.align * self.align
            if n > best:
                best_key, best = key, n
        cache = make_cache()
        if best_key is None:
            return cache, 0
        self._entries.move_to_end(best_key)
        for c, (k, v) in zip(cache, self._entries[best_key]):
            c.update_and_fetch(k[..., :best, :], v[..., :best, :])
        mx.eval([c.state[0] for c in cache])
        return cache, best
