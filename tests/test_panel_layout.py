"""Weights rearranged at load into the panel layout (mlx_llama/model/panel_weights.py).

The AVX-512 kernels read a weight in the panel layout straight, where from
MLX's layout they first transpose each panel of 16 rows: the arithmetic per
output element is the same, so results must be bit-identical to the row
layout for every M (and so batch-invariant), bit width, mode, group size and
thread count. Elsewhere (other modes, the AVX2 tiles, MLX's own kernel,
dequantize, embedding lookups) a weight in the panel layout must give what
the row layout gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.kernels import extension
from mlx_llama.kernels.qmatmul import dequantize, from_panels, quantized_matmul, to_panels, weight_rows

ext = extension.module()
pytestmark = pytest.mark.skipif(ext is None, reason="C++ extension not built")
panels_here = pytest.mark.skipif(ext is None or not ext.panel_kernels(), reason="no AVX-512 VNNI panel kernels")

M_VALUES = (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 33, 64)


@pytest.fixture(autouse=True)
def _cpu() -> Iterator[None]:
    with mx.stream(mx.cpu):
        yield


def bits_of(a: mx.array) -> np.ndarray:
    return np.array(a).view(np.uint32)


def quantized(rng: np.random.Generator, n: int, k: int, g: int, bits: int, scale_dtype: mx.Dtype):
    w, s, b = mx.quantize(mx.array(rng.standard_normal((n, k)).astype(np.float32) * 0.05), group_size=g, bits=bits)
    return w, s.astype(scale_dtype), b.astype(scale_dtype)


def test_pack_panels_puts_16_rows_words_side_by_side_in_place_or_copied() -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 2**32, size=(48, 40), dtype=np.uint32)
    expected = rows.reshape(3, 16, 40).transpose(0, 2, 1)
    kept = mx.array(rows)
    assert np.array_equal(np.array(to_panels(kept)), expected)
    assert np.array_equal(np.array(kept), rows)  # still held here: copied, not rearranged in place
    alone = to_panels(mx.array(rows))  # nothing else holds the input: rearranged in its own buffer
    assert np.array_equal(np.array(alone), expected)
    assert np.array_equal(np.array(from_panels(alone)), rows)
    ids = mx.array([0, 15, 16, 47, 5])
    assert np.array_equal(np.array(weight_rows(alone, ids)), rows[np.array(ids)])


def test_pack_panels_arranges_scales_and_biases_too() -> None:
    rng = np.random.default_rng(1)
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        rows = mx.array(rng.standard_normal((32, 6)).astype(np.float32)).astype(dtype)
        expected = np.array(rows.astype(mx.float32)).reshape(2, 16, 6).transpose(0, 2, 1)
        packed = to_panels(rows)
        assert packed.dtype == dtype
        assert np.array_equal(np.array(packed.astype(mx.float32)), expected)


@pytest.mark.parametrize(
    "bad, message",
    [
        (mx.zeros((40, 8), dtype=mx.uint32), "multiple of 16 rows"),
        (mx.zeros((32, 8), dtype=mx.uint8), "16- or 32-bit"),
        (mx.zeros((16,), dtype=mx.uint32), "2-D"),
    ],
)
def test_pack_panels_refuses_what_it_cannot_arrange(bad: mx.array, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_panels(bad)


@panels_here
@pytest.mark.parametrize("threads", (1, 2, 3))
@pytest.mark.parametrize("bits, kernel", [(4, "q8"), (8, "q8"), (8, "q16")])
def test_panel_layout_is_bit_identical_to_the_row_layout_for_every_m(bits: int, kernel: str, threads: int) -> None:
    before = ext.num_threads()
    ext.set_num_threads(threads)
    try:
        rng = np.random.default_rng(bits + threads)
        for g in (32, 64, 128):
            # 3 and 10 panels (sets of 4 panels with a remainder); K an odd multiple of g.
            for n, k in ((48, 3 * g), (160, 5 * g)):
                x = rng.standard_normal((max(M_VALUES), k)).astype(np.float32)
                x[3] *= 100.0  # an outlier row must not leak into the others
                for scale_dtype in (mx.float32, mx.bfloat16):
                    w, s, b = quantized(rng, n, k, g, bits, scale_dtype)
                    p, ps, pb = to_panels(w), to_panels(s), to_panels(b)
                    for m in M_VALUES:
                        xm = mx.array(x[:m])
                        rows = ext.quantized_matmul(xm, w, s, b, group_size=g, bits=bits, mode=kernel)
                        panel = ext.quantized_matmul(xm, p, ps, pb, group_size=g, bits=bits, mode=kernel)
                        assert np.array_equal(bits_of(panel), bits_of(rows)), (g, n, k, scale_dtype, m)
                    alone = [bits_of(ext.quantized_matmul(mx.array(x[i : i + 1]), p, ps, pb, group_size=g,
                                                          bits=bits, mode=kernel))[0] for i in range(9)]
                    batch = bits_of(ext.quantized_matmul(mx.array(x[:9]), p, ps, pb, group_size=g, bits=bits,
                                                         mode=kernel))
                    assert np.array_equal(batch, np.stack(alone)), (g, n, k, scale_dtype)
    finally:
        ext.set_num_threads(before)


@pytest.mark.parametrize("bits, kernel", [(4, "exact"), (3, "q8"), (4, "q8"), (8, "q16")])
def test_panel_layout_gives_the_row_layouts_result_on_every_other_path(
    bits: int, kernel: str, kernel_family: str
) -> None:
    """Kernels that read rows (the exact mode, the AVX2 tiles, bit widths the panels lack) restore them."""
    rng = np.random.default_rng(bits)
    x = mx.array(rng.standard_normal((5, 256)).astype(np.float32))
    for scale_dtype in (mx.bfloat16, mx.float32):
        w, s, b = quantized(rng, 48, 256, 64, bits, scale_dtype)
        p, ps, pb = to_panels(w), to_panels(s), to_panels(b)
        for m in (1, 5):
            rows = ext.quantized_matmul(x[:m], w, s, b, group_size=64, bits=bits, mode=kernel)
            panel = ext.quantized_matmul(x[:m], p, ps, pb, group_size=64, bits=bits, mode=kernel)
            assert np.array_equal(bits_of(panel), bits_of(rows)), (kernel_family, m, scale_dtype)
    assert np.array_equal(np.array(ext.dequantize(p, ps, pb, group_size=64, bits=bits)),
                          np.array(ext.dequantize(w, s, b, group_size=64, bits=bits)))


def test_panel_layout_on_mlx_own_kernels() -> None:
    """MLX_LLAMA_QMM=mlx after load: mx.quantized_matmul / mx.dequantize on the rows restored."""
    rng = np.random.default_rng(7)
    w, s, b = quantized(rng, 32, 128, 64, 4, mx.float32)
    p, ps, pb = to_panels(w), to_panels(s), to_panels(b)
    x = mx.array(rng.standard_normal((3, 128)).astype(np.float32))
    with extension.using_mode("mlx"):
        assert np.array_equal(np.array(quantized_matmul(x, p, ps, pb, group_size=64, bits=4)),
                              np.array(quantized_matmul(x, w, s, b, group_size=64, bits=4)))
        assert np.array_equal(np.array(dequantize(p, ps, pb, group_size=64, bits=4)),
                              np.array(dequantize(w, s, b, group_size=64, bits=4)))


def test_loaded_model_in_panel_layout_gives_the_row_layouts_logits(
    make_quantized_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading rearranges the quantized layers (tied embedding included); logits and lookups unchanged."""
    from mlx_llama.loader import load_model

    for bits in (4, 8):
        path = make_quantized_dir(bits, 64)
        monkeypatch.setenv("MLX_LLAMA_PANELS", "0")
        rows = load_model(path)
        monkeypatch.delenv("MLX_LLAMA_PANELS")
        panel = load_model(path)
        layer, embed = panel.model.layers[0].mlp.gate_up_proj, panel.model.embed_tokens
        expect_panels = extension.panel_layout_enabled()
        assert layer.weight.ndim == layer.scales.ndim == layer.biases.ndim == (3 if expect_panels else 2)
        assert embed.weight.ndim == (3 if expect_panels and panel.config.tie_word_embeddings else 2)
        assert layer.output_dims == rows.model.layers[0].mlp.gate_up_proj.output_dims
        tokens = mx.array([[1, 7, 200, 3, 42, 99]])
        logits = panel(tokens)
        assert logits.shape == (1, 6, panel.config.vocab_size)
        assert np.array_equal(bits_of(logits), bits_of(rows(tokens))), bits
        assert np.array_equal(np.array(embed(tokens)), np.array(rows.model.embed_tokens(tokens)))
