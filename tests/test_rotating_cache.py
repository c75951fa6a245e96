"""The rotating cache's contract, checked against an explicit full-sequence mask.

Contract: the token at position t attends to positions < keep and to the last
(max_size - keep) positions up to t, whatever the prefill chunking.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.model.cache import KVCache, RotatingKVCache
from mlx_llama.errors import MlxLlamaError
from mlx_llama.loader import load_model

# Max |Δlogit| relative to max |logit|.  Chunked and full-sequence passes multiply
# matrices of different shapes, and an optimized BLAS blocks them differently:
# measured ≤ 7e-7 relative (1.2e-5 absolute on logits up to 18) with OpenBLAS, less with the
# reference BLAS.  A masking mistake moves logits by O(0.1).
TOL = 1e-5


def rel_err(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


class ContractMaskCache:
    """Test oracle: a single full-sequence pass with the contract's mask made explicit."""

    def __init__(self, max_size: int, keep: int) -> None:
        self.max_size, self.keep, self.offset = max_size, keep, 0

    def make_mask(self, L: int) -> mx.array:
        t = np.arange(L)[:, None]
        k = np.arange(L)[None, :]
        window = self.max_size - self.keep
        return mx.array((k <= t) & ((k < self.keep) | (k > t - window)))

    def update_and_fetch(self, keys, values):
        return keys, values


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return load_model(make_checkpoint(num_attention_heads=8, num_key_value_heads=2, head_dim=8), "float32")


TOKENS = np.random.default_rng(1).integers(3, 256, size=300)


def run_chunked(model, cache, tokens, chunks):
    """Logits for every position, feeding `tokens` in pieces of the given sizes (cycled)."""
    out, start, i = [], 0, 0
    while start < len(tokens):
        n = chunks[i % len(chunks)]
        out.append(np.array(model(mx.array(tokens[None, start : start + n]), cache)[0]))
        start, i = start + n, i + 1
    return np.concatenate(out)


def contract_logits(model, tokens, max_size, keep):
    oracle = [ContractMaskCache(max_size, keep) for _ in model.layers]
    return np.array(model(mx.array(tokens[None]), oracle)[0])


def test_identical_to_growing_cache_while_it_fits(model):
    tokens = TOKENS[:100]
    growing = run_chunked(model, [KVCache() for _ in model.layers], tokens, [7, 1, 30])
    rotating = run_chunked(model, [RotatingKVCache(128, 4) for _ in model.layers], tokens, [7, 1, 30])
    assert rel_err(rotating, growing) < TOL


@pytest.mark.parametrize(
    "chunks",
    [[1], [5], [16, 1, 1, 3], [40], [100], [300], [33, 1, 70, 2]],
    ids=lambda c: "-".join(map(str, c)),
)
@pytest.mark.parametrize("max_size,keep", [(32, 4), (48, 0), (20, 19)])
def test_matches_contract_for_any_chunking(model, chunks, max_size, keep):
    """Chunks smaller and larger than the window, many wraps (300 tokens over a 16-28 window)."""
    expected = contract_logits(model, TOKENS, max_size, keep)
    caches = [RotatingKVCache(max_size, keep) for _ in model.layers]
    got = run_chunked(model, caches, TOKENS, chunks)
    assert rel_err(got, expected) < TOL
    # Never more than max_size tokens held between calls; kept tokens still there.
    assert caches[0].size == max_size
    positions = np.sort(caches[0].state[2])
    assert list(positions[:keep]) == list(range(keep))
    assert list(positions[keep:]) == list(range(300 - (max_size - keep), 300))


def test_reuse_across_calls_is_chunking_independent(model):
    """A cache carried across several prefill+decode calls equals one continuous run."""
    a = run_chunked(model, [RotatingKVCache(24, 4) for _ in model.layers], TOKENS[:200], [50, 1, 1, 1, 9])
    b = run_chunked(model, [RotatingKVCache(24, 4) for _ in model.layers], TOKENS[:200], [1])
    assert rel_err(a, b) < TOL


def test_bad_sizes_are_user_errors():
    with pytest.raises(MlxLlamaError):
        RotatingKVCache(8, 8)
    with pytest.raises(MlxLlamaError):
        RotatingKVCache(0, 0)
