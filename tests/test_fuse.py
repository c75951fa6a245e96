"""Fused q/k/v and gate/up projections (mlx_llama.model.fuse_weights) give the unfused model's results."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.kernels import extension
from mlx_llama.loader import load_model
from mlx_llama.model.quantized import QuantizedLinear

TOKENS = mx.array([[1, 17, 33, 5, 200, 9, 4]])


def _decode_logits(model, steps: int = 4) -> np.ndarray:
    """Prefill TOKENS through a cache, then a few single-token steps: both attention paths."""
    cache = model.make_cache()
    out = [model(TOKENS, cache)]
    for t in range(steps):
        out.append(model(mx.array([[3 + t]]), cache))
    return np.concatenate([np.array(o) for o in out], axis=1)


@pytest.mark.parametrize("mode", ["exact", "q8"])
def test_fused_quantized_model_is_bit_identical(make_quantized_dir, mode):
    qdir = make_quantized_dir(4, 64)
    fused, plain = load_model(qdir, "float32"), load_model(qdir, "float32", fuse=False)
    attn, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
    assert isinstance(attn.qkv_proj, QuantizedLinear) and "q_proj" not in attn
    assert isinstance(mlp.gate_up_proj, QuantizedLinear) and "up_proj" not in mlp
    assert "qkv_proj" not in plain.layers[0].self_attn
    with extension.using_mode(mode):
        # Each output row is computed from its own weights and the same activations.
        np.testing.assert_array_equal(_decode_logits(fused), _decode_logits(plain))


def test_fused_float_model_matches(make_checkpoint):
    src = make_checkpoint()
    fused, plain = load_model(src, "float32"), load_model(src, "float32", fuse=False)
    assert "qkv_proj" in fused.layers[0].self_attn and "gate_up_proj" in fused.layers[0].mlp
    a, b = _decode_logits(fused), _decode_logits(plain)
    # A taller BLAS matrix may block its sums differently: float32 rounding only.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_mixed_precision_projections_stay_separate(make_quantized_dir):
    """mlx-lm mixed-precision files may give v_proj more bits: q/k/v cannot share a matmul."""
    qdir = make_quantized_dir(4, 64, {"model.layers.0.self_attn.v_proj": 8})
    model = load_model(qdir, "float32")
    first, second = model.layers[0], model.layers[1]
    assert "qkv_proj" not in first.self_attn and first.self_attn.v_proj.bits == 8
    assert "gate_up_proj" in first.mlp and "qkv_proj" in second.self_attn
    with extension.using_mode("exact"):
        np.testing.assert_array_equal(
            _decode_logits(model), _decode_logits(load_model(qdir, "float32", fuse=False))
        )
