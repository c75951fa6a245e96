"""Our MLX model against transformers' LlamaForCausalLM (torch float32, eager attention)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlx_llama import generate_tokens  # noqa: E402
from mlx_llama.loader import load_model  # noqa: E402

TOL = 1e-4  # max abs logit difference, float32 on both sides

CONFIGS = {
    # 8 query heads share 2 kv heads; positions up to 400 run past the 256
    # original context, so llama3 scaling's low/medium/high bands all matter.
    "gqa-tied-llama3": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
    "gqa-untied-plain-rope": dict(num_attention_heads=4, num_key_value_heads=1, rope_scaling=None,
                                  rope_theta=10000.0, tie_word_embeddings=False),
    "mha-untied-llama3": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
}


def hf_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids[None])).logits[0].numpy()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, make_checkpoint):
    path = make_checkpoint(**CONFIGS[request.param])
    return path, hf_model(path), load_model(path, "float32")


PROMPT = np.random.default_rng(0).integers(3, 256, size=400)


def test_full_sequence_logits(pair):
    _, hf, ours = pair
    expected = hf_logits(hf, PROMPT)
    got = np.array(ours(mx.array(PROMPT[None]))[0])
    assert np.abs(got - expected).max() < TOL


def test_prefill_then_decode_with_cache(pair):
    _, hf, ours = pair
    expected = hf_logits(hf, PROMPT)
    cache = ours.make_cache()
    pieces = [np.array(ours(mx.array(PROMPT[None, :300]), cache)[0])]
    for t in PROMPT[300:]:
        pieces.append(np.array(ours(mx.array([[int(t)]]), cache)[0]))
    assert np.abs(np.concatenate(pieces) - expected).max() < TOL


def test_greedy_tokens_match_transformers(pair):
    _, hf, ours = pair
    prompt = PROMPT[:20]
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompt[None]), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    got = list(generate_tokens(ours, prompt.tolist(), max_tokens=32))
    assert got == expected


def test_transformers5_rope_parameters_dialect(make_checkpoint, tmp_path):
    """A config with `rope_parameters` (transformers 5) loads to the same model."""
    src = make_checkpoint(**CONFIGS["gqa-tied-llama3"])
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"), **cfg.pop("rope_scaling")}
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = mx.array(PROMPT[None, :300])
    a = np.array(load_model(src, "float32")(ids))
    b = np.array(load_model(tmp_path, "float32")(ids))
    np.testing.assert_array_equal(a, b)
