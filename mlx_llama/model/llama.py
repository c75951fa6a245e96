"""The LLaMA-3 decoder in MLX: RMSNorm, RoPE, grouped-query attention, SwiGLU."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_llama.kernels import ops as fused
from mlx_llama.kernels import extension
from mlx_llama.model.cache import SlotCache, make_cache
from mlx_llama.config import ModelConfig
from mlx_llama.model.rope import RoPE

# One sequence's rows in a packed pass: (first row, row count, its layer cache, its mask).
Span = tuple[int, int, Any, Any]


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return fused.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        h, hd = cfg.hidden_size, cfg.head_dim
        # Split points of the fused q/k/v output (mlx_llama.model.fuse_weights; the loader fuses).
        self.qkv_splits = [self.n_heads * hd, (self.n_heads + self.n_kv_heads) * hd]
        self.q_proj = nn.Linear(h, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, h, bias=False)
        self.rope = RoPE(hd, cfg.rope_theta, cfg.rope_scaling)

    def __call__(self, x: mx.array, mask: Any, cache: Any) -> mx.array:
        q, k, v = self._project(x)
        return self.o_proj(self._attend(q, k, v, mask, cache))

    def packed(self, x: mx.array, spans: Sequence[Span], positions: mx.array) -> mx.array:
        """Attention for several sequences packed along L of x (1, N, hidden).

        The projections run once over all N rows; each row is rotated for its
        own position (`positions`, int32 (N,)), and the cache update and
        attention run on each sequence's rows and cache alone.  Where the
        extension's row ops apply, RoPE is one call over all N rows and each
        run of consecutive one-row spans (decoding sequences) one attention
        call, with the bits the per-span calls give.
        """
        q, k, v = self._project(x)
        if fused.has_row_ops(q.dtype):
            outs = self._attend_runs(q, k, v, spans, positions)
        else:
            outs = [self._attend(q[:, s : s + n], k[:, s : s + n], v[:, s : s + n], mask, cache)
                    for s, n, cache, mask in spans]
        return self.o_proj(outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1))

    def _attend_runs(self, q: mx.array, k: mx.array, v: mx.array, spans: Sequence[Span],
                     positions: mx.array) -> list[mx.array]:
        """`packed` with the row ops: one RoPE over all rows, then per run of spans (`_runs`)."""
        q, k = self.rope.rows(q, positions), self.rope.rows(k, positions)
        N = q.shape[1]
        outs = []
        for run in _runs(spans):
            s, n, cache, mask = run[0]
            if n > 1:  # a prefill chunk: its own causal (or rotating-window) attention
                outs.append(self._attend_rotated(q[:, s : s + n], k[:, s : s + n], v[:, s : s + n], mask, cache))
            else:
                outs.append(self._attend_rows(_rows(q, s, len(run), N), _rows(k, s, len(run), N),
                                              _rows(v, s, len(run), N), [span[2] for span in run]))
        return outs

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """q, k, v as (B, L, heads, head_dim)."""
        B, L, _ = x.shape
        if "qkv_proj" in self:
            q, k, v = mx.split(self.qkv_proj(x), self.qkv_splits, axis=-1)
        else:  # projections whose formats differ (mlx_llama.model.fuse_weights)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.reshape(B, L, self.n_heads, -1), k.reshape(B, L, self.n_kv_heads, -1),
                v.reshape(B, L, self.n_kv_heads, -1))

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Any, cache: Any) -> mx.array:
        """RoPE at the cache's offset, cache update, attention → (B, L, heads * head_dim)."""
        offset = cache.offset if cache is not None else 0
        return self._attend_rotated(self.rope(q, offset), self.rope(k, offset), v, mask, cache)

    def _attend_rotated(self, q: mx.array, k: mx.array, v: mx.array, mask: Any, cache: Any) -> mx.array:
        """Cache update and attention of rotated q, k → (B, L, heads * head_dim)."""
        B, L = q.shape[:2]
        # The cache stores (B, kv_heads, T, head_dim).
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # GQA: kv heads are shared by n_heads // n_kv_heads queries.
        return fused.attention(q, k, v, self.scale, mask).reshape(B, L, -1)

    def _attend_rows(self, q: mx.array, k: mx.array, v: mx.array, caches: Sequence[SlotCache]) -> mx.array:
        """One row per cache (rotated q, k (1, n, heads, head_dim)): each cache takes its row's
        key and value into a slot it reserves, then row i attends to cache i, all in one call
        → (1, n, heads * head_dim)."""
        B, n, Hkv, D = k.shape
        like = mx.zeros((1, Hkv, 1, D), dtype=k.dtype)  # only its shape and dtype: the buffers' growth
        reserved = [cache.reserve_one(like) for cache in caches]
        buffers = [b for cache in caches for b in (cache.keys, cache.values)]
        y = fused.attention_rows_update(q, k, v, buffers, [r[0] for r in reserved], [r[1] for r in reserved],
                                        self.scale)
        return y.reshape(1, n, -1)


def _runs(spans: Sequence[Span]) -> list[list[Span]]:
    """`spans` in order, grouped: each multi-row span alone, consecutive one-row spans together.

    A one-row span is a decoding sequence or a one-token prompt chunk: either way its one query
    sees every key its cache returns (no mask), so they share one attention call."""
    runs: list[list[Span]] = []
    for span in spans:
        if span[1] == 1 and runs and runs[-1][0][1] == 1:
            runs[-1].append(span)
        else:
            runs.append([span])
    return runs


def _rows(a: mx.array, start: int, n: int, total: int) -> mx.array:
    """Rows [start, start + n) of a (1, total, ...), without a slice node when that is all of them."""
    return a if (start, n) == (0, total) else a[:, start : start + n]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:  # projections whose formats differ (mlx_llama.model.fuse_weights)
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(fused.swiglu(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any, cache: Any) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def packed(self, x: mx.array, spans: Sequence[Span], positions: mx.array) -> mx.array:
        h = x + self.self_attn.packed(self.input_layernorm(x), spans, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Model(nn.Module):
    """`Model(cfg)(tokens, cache)` → logits; tensor names match HF checkpoints.

    The loader then fuses q/k/v and gate/up into one matmul each (mlx_llama.model.fuse_weights).
    """

    xp = mx  # the array library the generation loop drives this model with

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # Set by the loader.  A read-only mapping: nn.Module would take a dict for a parameter tree.
        self.path: Path | None = None
        self.generation_config: Mapping[str, Any] = MappingProxyType({})
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (the norms hold it; a quantized embedding dequantizes to it)."""
        return self.model.norm.weight.dtype

    def make_cache(self, max_kv_size: int | None = None, keep: int = 4) -> list:
        return make_cache(len(self.layers), max_kv_size, keep)

    def __call__(
        self,
        tokens: mx.array,
        cache: Sequence[Any] | None = None,
        *,
        last_only: bool = False,
        hidden_states: list[mx.array] | None = None,
    ) -> mx.array:
        """Logits (B, L, vocab) for `tokens` (B, L); (B, 1, vocab) with `last_only`.

        `hidden_states`, when given, receives the embeddings and each layer's output.
        """
        with extension.resolved():
            return self._forward(tokens, cache, last_only, hidden_states)

    def forward_packed(self, tokens: mx.array, segments: Sequence[tuple[int, Sequence[Any]]],
                       rows: Sequence[int]) -> mx.array:
        """One pass over several sequences: logits (len(rows), vocab) of the given rows.

        `tokens` (1, N) concatenates each segment's tokens; segment (L, cache)
        continues its own per-layer caches.  Every matmul runs once over the N
        rows, and so do RoPE and the decode rows' attention where the extension
        has row ops; attention is per segment otherwise (Attention.packed), and
        each row computes as it would alone, so a row's
        result depends on its batch-mates only through the matmul kernels'
        treatment of M (see mlx_llama.generation.engine).  `rows` index the N.
        """
        with extension.resolved():
            h = packed_layers(self.layers, input_embeddings(self, tokens, self.dtype), segments)
            if not rows:  # prompt chunks only: the caches are the result
                return mx.zeros((0, self.config.vocab_size), dtype=self.dtype)
            return output_logits(self, h[:, mx.array(list(rows), dtype=mx.int32)], last_only=False)[0]

    def _forward(
        self, tokens: mx.array, cache: Sequence[Any] | None, last_only: bool, hidden_states: list[mx.array] | None
    ) -> mx.array:
        h = input_embeddings(self, tokens, self.dtype)
        L = tokens.shape[1]
        if cache is None:
            cache = [None] * len(self.layers)
            mask = "causal" if L > 1 else None
        else:
            mask = cache[0].make_mask(L)
        if hidden_states is not None:
            hidden_states.append(h)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
            if hidden_states is not None:
                hidden_states.append(h)
        return output_logits(self, h, last_only)


def input_embeddings(model: nn.Module, tokens: mx.array, dtype: mx.Dtype) -> mx.array:
    """The embeddings of `tokens` in the compute `dtype`, for `Model` or a pipeline stage holding the embedding."""
    h = model.model.embed_tokens(tokens)
    # A quantized embedding dequantizes in float32; activations take the compute dtype.
    return h if h.dtype == dtype else h.astype(dtype)


def packed_layers(layers: Sequence[DecoderLayer], h: mx.array,
                  segments: Sequence[tuple[int, Sequence[Any]]]) -> mx.array:
    """`layers` over several sequences packed along L of `h` (1, N, hidden): segment (L, cache)
    continues its own per-layer caches (`cache[i]` for `layers[i]`), as `Model.forward_packed` runs them."""
    spans, start, positions = [], 0, []
    # A sequence's next position: several chunks of one prompt may join a step. Keyed by its first
    # layer's cache object, which stays the same when callers pass the caches per layer (pipeline stages).
    offsets: dict[int, int] = {}
    for n, cache in segments:
        spans.append((start, n, cache, cache[0].make_mask(n)))
        offset = offsets.get(id(cache[0]), cache[0].offset)
        positions.append(np.arange(offset, offset + n, dtype=np.int32))
        offsets[id(cache[0])] = offset + n
        start += n
    row_positions = mx.array(np.concatenate(positions))
    for i, layer in enumerate(layers):
        h = layer.packed(h, [(s, n, cache[i], mask) for s, n, cache, mask in spans], row_positions)
    return h


def output_logits(model: nn.Module, h: mx.array, last_only: bool) -> mx.array:
    """The final norm and the output head over hidden states `h`, for `Model` or a pipeline stage
    holding its last layers (`mlx_llama.distributed.stage`: the same attribute names)."""
    if last_only:
        h = h[:, -1:, :]
    h = model.model.norm(h)
    if model.config.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)
