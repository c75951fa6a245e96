"""The shared sampler on both array libraries."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.sampler import (
    Sampler, SamplingParams, apply_presence_frequency_penalty, apply_repetition_penalty, filter_logits,
)

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


def openai_penalised(logits: np.ndarray, generated: np.ndarray, presence: float, frequency: float) -> np.ndarray:
    """OpenAI's documented formula, in float64 over a full count vector."""
    counts = np.bincount(generated, minlength=len(logits)) if len(generated) else np.zeros(len(logits))
    return logits.astype(np.float64) - (presence * (counts > 0) + frequency * counts)


PENALTY = st.floats(-2, 2, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_generated=st.integers(0, 40), presence=PENALTY, frequency=PENALTY,
       xp=st.sampled_from(XPS))
def test_presence_and_frequency_penalties_follow_openais_formula(seed, n_generated, presence, frequency, xp):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(64).astype(np.float32) * 4
    generated = rng.integers(0, 16, size=n_generated)  # a small range: tokens repeat
    out = np.array(apply_presence_frequency_penalty(xp, xp.array(logits), generated, presence, frequency))
    np.testing.assert_allclose(out, openai_penalised(logits, generated, presence, frequency), rtol=0, atol=1e-5)


@pytest.mark.parametrize("xp", XPS, ids=["numpy", "mlx"])
def test_penalties_count_the_generated_tokens_not_the_prompt(xp):
    logits = np.array([3.0, 2.9, 2.8, 0.0], dtype=np.float32)
    prompt, generated = np.array([2, 2, 2]), np.array([0, 0, 1])
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.1))
    # 0: 3.0 - 0.5 - 0.2 = 2.3; 1: 2.9 - 0.5 - 0.1 = 2.3; 2 (prompt only): 2.8 untouched
    token = int(s(xp, xp.array(logits), np.concatenate([prompt, generated]), generated))
    assert token == int(np.argmax(openai_penalised(logits, generated, 0.5, 0.1))) == 2
    # Negative values favour repeats.
    s = Sampler(SamplingParams(frequency_penalty=-2.0))
    assert int(s(xp, xp.array(logits), generated, np.array([3, 3]))) == 3  # 0 + 2 * 2 = 4 > 3


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.01, -2.5, float("nan")])
def test_penalties_outside_openais_range_are_refused(field, value):
    with pytest.raises(MlxLlamaError, match=field.replace("_", " ")):
        SamplingParams(**{field: value}).validate()
