"""Model configuration read from `config.json`, in either dialect found in the wild.

transformers 4 (and the Meta hub repos) write `rope_theta` + `rope_scaling`;
transformers 5 writes `rope_parameters`. Both are normalised here to one
`ModelConfig`, and `to_dict()` writes the transformers-4 dialect that mlx-lm reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_llama.errors import MlxLlamaError
from mlx_llama.files import read_text

SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass
class ModelConfig:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None means plain RoPE
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    quantization: dict[str, Any] | None = None  # mlx-lm's layout, per-layer overrides included
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type != "llama":
            raise MlxLlamaError(
                f"unsupported model_type {model_type!r}: mlx-llama runs LLaMA-architecture models only"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise MlxLlamaError(f"unsupported config: {flag} is true (LLaMA-3 has no biases)")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise MlxLlamaError(f"unsupported hidden_act {act!r}: only silu (SwiGLU) is supported")
        hidden = _count(raw, "hidden_size")
        n_heads = _count(raw, "num_attention_heads")
        n_kv = _count(raw, "num_key_value_heads", n_heads)
        head_dim = _count(raw, "head_dim", hidden // n_heads or None)
        layers = _count(raw, "num_hidden_layers")
        inter = _count(raw, "intermediate_size")
        vocab = _count(raw, "vocab_size")
        if n_heads * head_dim > _MAX_COUNT:
            raise MlxLlamaError(f"config.json: num_attention_heads × head_dim ({n_heads} × {head_dim}) is too large")
        if n_heads % n_kv:
            raise MlxLlamaError(
                f"num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv})"
            )
        rope_theta, rope_scaling = _read_rope(raw)
        eos_ids = token_ids(raw.get("eos_token_id"))
        return cls(
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=inter,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            vocab_size=vocab,
            rms_norm_eps=_number(raw, "rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_count(raw, "max_position_embeddings", 8192),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=(token_ids(raw.get("bos_token_id")) or [None])[0],
            eos_token_id=eos_ids,
            quantization=_quantization(raw.get("quantization")),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json_object(Path(path)))

    def to_dict(self) -> dict[str, Any]:
        """The transformers-4 dialect (`rope_theta` + `rope_scaling`), which mlx-lm reads."""
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id:
            out["eos_token_id"] = (
                self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
            )
        if self.torch_dtype:
            out["torch_dtype"] = self.torch_dtype
        if self.quantization is not None:
            out["quantization"] = self.quantization
            out["quantization_config"] = self.quantization
        return out

    def quantization_for(self, module_path: str) -> dict[str, int] | None:
        """`{"group_size", "bits"}` for a module, or None when it stays unquantized."""
        q = self.quantization
        if not q:
            return None
        override = q.get(module_path)
        if override is False:
            return None
        if isinstance(override, dict):
            return {"group_size": int(override["group_size"]), "bits": int(override["bits"])}
        return {"group_size": int(q["group_size"]), "bits": int(q["bits"])}


# Larger sizes would overflow MLX's int32 shapes: only a corrupt config.json holds them.
_MAX_COUNT = 2**31 - 1


def _count(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    """A positive integer field of config.json (`default` when absent or null)."""
    value = raw.get(key)
    if value is None:
        if default is None:
            raise MlxLlamaError(f"config.json lacks required key {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_COUNT:
        raise MlxLlamaError(f"config.json: {key} must be a positive integer, not {value!r}")
    return value


def _number(raw: dict[str, Any], key: str, default: float) -> float:
    """A positive finite number field of config.json."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise MlxLlamaError(f"config.json: {key} must be a positive number, not {value!r}")
    return float(value)


def _quantization(q: Any) -> dict[str, Any] | None:
    """mlx-lm's quantization block: group_size and bits for all layers, optional per-layer overrides."""
    if q is None:
        return None
    if not isinstance(q, dict):
        raise MlxLlamaError(f"config.json: quantization must be an object, not {q!r}")
    for block in [q] + [v for v in q.values() if isinstance(v, dict)]:
        _count(block, "group_size")
        _count(block, "bits")
    return q


def token_ids(value: Any) -> list[int]:
    """An `eos_token_id`-style field: absent, one id, or a list of ids."""
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
        raise MlxLlamaError(f"token ids must be non-negative integers, not {value!r}")
    return ids


def read_optional_json(path: Path) -> dict[str, Any]:
    """A side file such as generation_config.json: {} when absent, a clear error when malformed."""
    return read_json_object(path) if path.is_file() else {}


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; one-line errors for unreadable, invalid or non-object files."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise MlxLlamaError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise MlxLlamaError(f"{path} must hold a JSON object")
    return data


def _read_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        # transformers 5: one dict carries theta and the scaling parameters.
        theta = _number(params, "rope_theta", 10000.0)
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = _number(raw, "rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
    if not scaling:
        return theta, None
    if not isinstance(scaling, dict):
        raise MlxLlamaError(f"config.json: rope_scaling must be an object, not {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise MlxLlamaError(
            f"unsupported rope type {rope_type!r}: supported are {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    if "factor" not in scaling:
        raise MlxLlamaError("llama3 rope scaling lacks 'factor'")
    low, high = _number(scaling, "low_freq_factor", 1.0), _number(scaling, "high_freq_factor", 4.0)
    if low == high:
        raise MlxLlamaError("llama3 rope scaling: low_freq_factor and high_freq_factor must differ")
    scaling = {
        "rope_type": "llama3",
        "factor": _number(scaling, "factor", 1.0),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": _count(scaling, "original_max_position_embeddings", 8192),
    }
    return theta, scaling
