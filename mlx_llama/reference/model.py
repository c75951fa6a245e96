"""The NumPy reference backend: an independent LLaMA-3 implementation on the CPU.

It shares no numerics with the MLX path (and imports no mlx): its own
safetensors reader, dequantization, RoPE, attention and KV caches.  Comparing
the two (`mlx-llama check`) catches a wrong MLX kernel, quantization or cache.
It plugs into the shared generation loop (`xp = numpy`, `config`,
`make_cache`, `__call__`) and shares the tokenizer and sampler with MLX.

float32 by default; float64 (`dtype="float64"`) is a high-precision oracle.

Quantized layers are dequantized once, at load (`dequantize="load"`, the
default): decode then runs plain BLAS matrix products instead of re-unpacking
every weight for every token, at the cost of holding the model in the compute
dtype (~5 GB for a 1B model in float32).  `dequantize="call"` keeps the packed
weights and dequantizes in row blocks on each use: memory stays near the
quantized size (what an 8B model needs), decode is several times slower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlx_llama.config import ModelConfig
from mlx_llama.reference.dequantize import dequantize
from mlx_llama.errors import MlxLlamaError
from mlx_llama.model_dir import IGNORED_TENSOR_SUFFIXES, ModelDir
from mlx_llama.reference.cache import make_numpy_cache
from mlx_llama.reference.rope import NumpyRoPE
from mlx_llama.reference.weights import read_numpy_weights

NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64}
_BLOCK_ROWS = 4096  # rows dequantized at a time by packed layers


class Dense:
    """y = x @ W.T with W (out, in) in the compute dtype, stored transposed.

    A contiguous (in, out) operand is OpenBLAS's fast layout for the skinny
    products of decode and short prefill chunks (2-3x faster than W.T as a view).
    """

    def __init__(self, weight: np.ndarray) -> None:
        self.wt = np.ascontiguousarray(weight.T)
        self.weight = self.wt.T  # (out, in) view, for row lookups

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.wt

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.weight[ids]


class Packed:
    """A quantized matrix kept packed; dequantized in row blocks on every use."""

    def __init__(self, packed: np.ndarray, scales: np.ndarray, biases: np.ndarray,
                 group_size: int, bits: int, dtype: Any) -> None:
        self.packed, self.scales, self.biases = packed, scales, biases
        self.group_size, self.bits, self.dtype = group_size, bits, dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 32 // self.bits

    def _block(self, rows: Any) -> np.ndarray:
        return dequantize(self.packed[rows], self.scales[rows], self.biases[rows],
                          group_size=self.group_size, bits=self.bits, dtype=self.dtype)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = self.shape[0]
        out = np.empty(x.shape[:-1] + (n,), dtype=self.dtype)
        for start in range(0, n, _BLOCK_ROWS):
            block = slice(start, min(start + _BLOCK_ROWS, n))
            out[..., block] = x @ self._block(block).T
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        flat = ids.reshape(-1)
        return self._block(flat).reshape(ids.shape + (self.shape[1],))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
              scale: float) -> np.ndarray:
    """Grouped-query attention: q (B, Hq, L, D); k, v (B, Hkv, S, D); query head h reads kv head h // (Hq/Hkv)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    q = q.reshape(B, Hkv, Hq // Hkv, L, D)
    scores = (q @ k[:, :, None].swapaxes(-1, -2)) * q.dtype.type(scale)  # (B, Hkv, rep, L, S)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    out = softmax(scores) @ v[:, :, None]
    return out.reshape(B, Hq, L, D)


class Layer:
    def __init__(self, cfg: ModelConfig, p: dict[str, Any]) -> None:
        self.cfg = cfg
        self.p = p  # "q_proj", ..., "input_layernorm", "post_attention_layernorm"
        self.rope = NumpyRoPE(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def __call__(self, x: np.ndarray, mask: np.ndarray | None, cache: Any) -> np.ndarray:
        cfg, p = self.cfg, self.p
        B, L, _ = x.shape
        h = rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps)

        def heads(y: np.ndarray, n: int) -> np.ndarray:
            # (B, L, n * head_dim) → (B, n, L, head_dim): the cache's layout, so keys append along axis 2
            return y.reshape(B, L, n, cfg.head_dim).transpose(0, 2, 1, 3)

        q = heads(p["q_proj"](h), cfg.num_attention_heads)
        k = heads(p["k_proj"](h), cfg.num_key_value_heads)
        v = heads(p["v_proj"](h), cfg.num_key_value_heads)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        a = attention(q, k, v, mask, cfg.head_dim**-0.5)  # (B, heads, L, head_dim)
        x = x + p["o_proj"](a.transpose(0, 2, 1, 3).reshape(B, L, -1))  # back to (B, L, hidden)
        h = rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps)
        return x + p["down_proj"](silu(p["gate_proj"](h)) * p["up_proj"](h))


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


class NumpyModel:
    """`NumpyModel(cfg, weights)(tokens, cache)` → logits (B, L, vocab) as NumPy arrays."""

    xp = np

    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray], dtype: str = "float32",
                 dequantize: str = "load") -> None:
        if dtype not in NUMPY_DTYPES:
            raise MlxLlamaError(f"the numpy backend computes in {' or '.join(NUMPY_DTYPES)}, not {dtype!r}")
        if dequantize not in ("load", "call"):
            raise MlxLlamaError(f"dequantize must be 'load' or 'call', not {dequantize!r}")
        self.config = cfg
        self.dtype = NUMPY_DTYPES[dtype]
        self._dequantize_at = dequantize
        # `weights` is consumed: tensors are popped as they are converted, so the
        # file-backed or widened originals are freed one by one.
        self._weights = weights
        for name in [k for k in weights if k.endswith(IGNORED_TENSOR_SUFFIXES)]:
            del weights[name]
        if cfg.tie_word_embeddings:
            self._weights.pop("lm_head.weight", None)
        self.embed = self._matrix("model.embed_tokens", (cfg.vocab_size, cfg.hidden_size))
        self.layers = [self._layer(i) for i in range(cfg.num_hidden_layers)]
        self.norm = self._vector("model.norm.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings else self._matrix(
            "lm_head", (cfg.vocab_size, cfg.hidden_size))
        extra = sorted(self._weights)
        if extra:
            raise MlxLlamaError(f"unexpected tensors for this config: {', '.join(extra[:5])}")
        del self._weights

    def _take(self, name: str) -> np.ndarray:
        if name not in self._weights:
            raise MlxLlamaError(f"weights lack {name}")
        return self._weights.pop(name)

    def _vector(self, name: str) -> np.ndarray:
        w = self._take(name)
        if w.shape != (self.config.hidden_size,):
            raise MlxLlamaError(f"{name} has shape {w.shape}, expected ({self.config.hidden_size},)")
        return np.asarray(w, dtype=self.dtype)

    def _matrix(self, path: str, shape: tuple[int, int]) -> Dense | Packed:
        if f"{path}.scales" not in self._weights:
            layer: Dense | Packed = Dense(np.asarray(self._take(f"{path}.weight"), dtype=self.dtype))
        else:
            q = self.config.quantization_for(path)
            if q is None:
                raise MlxLlamaError(f"{path} is quantized but config.json has no quantization for it")
            mode = (self.config.quantization or {}).get("mode", "affine")
            if mode != "affine":
                raise MlxLlamaError(f"unsupported quantization mode {mode!r}: only affine is supported")
            parts = [self._take(f"{path}.{n}") for n in ("weight", "scales", "biases")]
            layer = Packed(*parts, group_size=q["group_size"], bits=q["bits"], dtype=self.dtype)
            if layer.shape == shape and self._dequantize_at == "load":
                layer = Dense(layer._block(slice(None)))
        if layer.shape != shape:
            raise MlxLlamaError(f"{path} has shape {layer.shape}, expected {shape}")
        return layer

    def _layer(self, i: int) -> Layer:
        cfg, p = self.config, f"model.layers.{i}."
        h, hd = cfg.hidden_size, cfg.head_dim
        shapes = {
            "q_proj": (cfg.num_attention_heads * hd, h), "k_proj": (cfg.num_key_value_heads * hd, h),
            "v_proj": (cfg.num_key_value_heads * hd, h), "o_proj": (h, cfg.num_attention_heads * hd),
            "gate_proj": (cfg.intermediate_size, h), "up_proj": (cfg.intermediate_size, h),
            "down_proj": (h, cfg.intermediate_size),
        }
        params: dict[str, Any] = {}
        for name in _ATTN + _MLP:
            params[name] = self._matrix(p + ("self_attn." if name in _ATTN else "mlp.") + name, shapes[name])
        for name in _NORMS:
            params[name] = self._vector(p + name + ".weight")
        return Layer(cfg, params)

    def make_cache(self, max_kv_size: int | None = None, keep: int = 4) -> list:
        return make_numpy_cache(len(self.layers), max_kv_size, keep)

    def __call__(
        self,
        tokens: Any,
        cache: Sequence[Any] | None = None,
        *,
        last_only: bool = False,
        hidden_states: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Logits (B, L, vocab) for `tokens` (B, L); (B, 1, vocab) with `last_only`.

        `hidden_states`, when given, receives the embeddings and each layer's output.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        h = self.embed.rows(tokens).astype(self.dtype, copy=False)
        L = tokens.shape[1]
        if cache is None:
            cache = [None] * len(self.layers)
            mask = np.tril(np.ones((L, L), dtype=bool)) if L > 1 else None
        else:
            mask = cache[0].make_mask(L)
        if hidden_states is not None:
            hidden_states.append(h)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
            if hidden_states is not None:
                hidden_states.append(h)
        if last_only:
            h = h[:, -1:, :]
        return self.lm_head(rms_norm(h, self.norm, self.config.rms_norm_eps))


def load_numpy_model(path: str | Path, dtype: str | None = None, dequantize: str = "load") -> NumpyModel:
    """The NumPy reference model for an HF or MLX-quantized directory (float32 unless `dtype`)."""
    model_dir = ModelDir.open(path)
    model = NumpyModel(model_dir.config, read_numpy_weights(model_dir.path), dtype or "float32", dequantize)
    model.path, model.generation_config = model_dir.path, model_dir.generation_config
    return model
