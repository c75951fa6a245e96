"""Model configuration read from `config.json`, in either dialect found in the wild.

transformers 4 (and the Meta hub repos) write `rope_theta` + `rope_scaling`;
transformers 5 writes `rope_parameters`. Both are normalised here to one
`ModelConfig`, and `to_dict()` writes the transformers-4 dialect that mlx-lm reads.
"""

from __future__ import annotations

import json
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
        try:
            hidden = int(raw["hidden_size"])
            n_heads = int(raw["num_attention_heads"])
            n_kv = int(raw.get("num_key_value_heads") or n_heads)
            head_dim = int(raw.get("head_dim") or hidden // n_heads)
            layers = int(raw["num_hidden_layers"])
            inter = int(raw["intermediate_size"])
            vocab = int(raw["vocab_size"])
        except KeyError as e:
            raise MlxLlamaError(f"config.json lacks required key {e.args[0]!r}") from None
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
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings") or 8192),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos_ids,
            quantization=raw.get("quantization"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        text = read_text(path)
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise MlxLlamaError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise MlxLlamaError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

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


def token_ids(value: Any) -> list[int]:
    """An `eos_token_id`-style field: absent, one id, or a list of ids."""
    if value is None:
        return []
    return [int(e) for e in (value if isinstance(value, list) else [value])]


def read_optional_json(path: Path) -> dict[str, Any]:
    """A side file such as generation_config.json: {} when absent, a clear error when malformed."""
    if not path.is_file():
        return {}
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MlxLlamaError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise MlxLlamaError(f"{path} must hold a JSON object")
    return data


def _read_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        # transformers 5: one dict carries theta and the scaling parameters.
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling")
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise MlxLlamaError(
            f"unsupported rope type {rope_type!r}: supported are {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    try:
        scaling = {
            "rope_type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(
                scaling.get("original_max_position_embeddings", 8192)
            ),
        }
    except KeyError as e:
        raise MlxLlamaError(f"llama3 rope scaling lacks {e.args[0]!r}") from None
    return theta, scaling
