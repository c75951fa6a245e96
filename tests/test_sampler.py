"""The shared sampler on both array libraries."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.generation.sampler import Sampler, SamplingParams, apply_repetition_penalty, filter_logits

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))
XPS = [np, mx]


def kept(xp, params):
    out = np.array(filter_logits(xp, xp.array(LOGITS), params))
    return sorted(np.flatnonzero(np.isfinite(out)).tolist())


@pytest.mark.parametrize("xp", XPS, ids=["numpy", "mlx"])
def test_filters(xp):
    assert kept(xp, SamplingParams(top_k=2)) == [0, 1]
    assert kept(xp, SamplingParams(top_p=0.5)) == [0]
    assert kept(xp, SamplingParams(top_p=0.7)) == [0, 1]  # 0.5 alone is short of 0.7
    assert kept(xp, SamplingParams(top_p=0.71)) == [0, 1, 2]
    assert kept(xp, SamplingParams(min_p=0.3)) == [0, 1, 2]  # p >= 0.15
    assert kept(xp, SamplingParams(top_k=4, top_p=0.9, min_p=0.25)) == [0, 1, 2]


@pytest.mark.parametrize("xp", XPS, ids=["numpy", "mlx"])
def test_repetition_penalty(xp):
    logits = xp.array(np.array([2.0, -2.0, 1.0], dtype=np.float32))
    out = np.array(apply_repetition_penalty(xp, logits, np.array([0, 1, 1]), 2.0))
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])


def test_seeded_sampling_is_reproducible_and_backend_independent():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    draws = {}
    for name, xp in (("numpy", np), ("mlx", mx)):
        s = Sampler(params)
        draws[name] = [int(s(xp, xp.array(logits), np.array([], dtype=np.int64))) for _ in range(50)]
    assert draws["numpy"] == draws["mlx"]
    assert len(set(draws["numpy"])) > 10  # it really samples


def test_sampling_follows_the_distribution():
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = np.bincount([int(s(np, LOGITS.copy(), np.array([]))) for _ in range(4000)], minlength=5)
    np.testing.assert_allclose(counts / 4000, np.exp(LOGITS), atol=0.03)


def test_greedy_is_argmax():
    s = Sampler(SamplingParams())
    assert int(s(mx, mx.array(LOGITS[::-1].copy()), np.array([]))) == 4
