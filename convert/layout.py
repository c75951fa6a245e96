"""What a LLaMA checkpoint must contain, derived from its config alone."""

from __future__ import annotations

import re

from mlx_llama.config import ModelConfig

# Extras some checkpoints carry that the model recomputes; dropped silently.
HARMLESS_SUFFIXES = (".rotary_emb.inv_freq",)

KINDS = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head")
_KIND_BY_PART = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "embed_tokens": "embed", "lm_head": "lm_head",
}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the model needs, in model order, with its shape (HF names, [out, in])."""
    h, inter, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    out["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def is_ignorable(name: str, cfg: ModelConfig) -> bool:
    """Extras we drop: precomputed RoPE frequencies, and lm_head when it is tied to the embedding."""
    return name.endswith(HARMLESS_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight")


def kind_of(name: str) -> str | None:
    """q/k/v/o/gate/up/down/embed/lm_head for a matrix, None for norms."""
    for part in reversed(name.split(".")):
        if part in _KIND_BY_PART:
            return _KIND_BY_PART[part]
    return None


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_of(name: str) -> str:
    """The module path that owns a `.weight` tensor (what mlx-lm's quantization config is keyed by)."""
    return name.rsplit(".", 1)[0]
