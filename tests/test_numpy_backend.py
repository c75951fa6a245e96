"""The NumPy reference backend against MLX, transformers and mx.dequantize (`mlx-llama check`: tests/test_check.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_llama.tools.check import compare
from mlx_llama.cli.main import main
from mlx_llama.generation.loop import generate_tokens
from mlx_llama.loader import load_model
from mlx_llama.reference.model import load_numpy_model

REL_TOL = 1e-4  # float32, relative to the largest |logit| at each position
PROMPT = np.random.default_rng(1).integers(0, 256, 23).tolist()


# The bounds below are for the exact kernel (conftest.exact_quantized_matmul).
pytestmark = pytest.mark.usefixtures("exact_quantized_matmul")


def quantize_checkpoint(src: Path, dst: Path, bits: int, group_size: int,
                        overrides: dict[str, dict[str, int]] | None = None) -> Path:
    """An mlx-lm-style quantized copy of a float checkpoint, made with mx.quantize."""
    dst.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    out: dict[str, mx.array] = {}
    for name, w in mx.load(str(src / "model.safetensors")).items():
        path = name.removesuffix(".weight")
        q = overrides.get(path, {"bits": bits, "group_size": group_size})
        if name.endswith(".weight") and w.ndim == 2 and w.shape[1] % q["group_size"] == 0:
            out[name], out[path + ".scales"], out[path + ".biases"] = mx.quantize(w, **q)
        else:
            out[name] = w
    mx.save_safetensors(str(dst / "model.safetensors"), out, metadata={"format": "mlx"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine", **overrides}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def models(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random tiny models: GQA + tied + llama3 rope; MHA + untied + plain rope; 8-bit, 4-bit, mixed."""
    gqa = make_checkpoint()
    mha = make_checkpoint(num_key_value_heads=4, tie_word_embeddings=False, rope_scaling=None, seed=3)
    root = tmp_path_factory.mktemp("quantized")
    return {
        "float-gqa-tied-llama3": gqa,
        "float-mha-untied": mha,
        "8bit-g64": quantize_checkpoint(gqa, root / "q8", 8, 64),
        "4bit-g32-untied": quantize_checkpoint(mha, root / "q4", 4, 32),
        "mixed-3bit-6bit": quantize_checkpoint(
            gqa, root / "mixed", 3, 32, {"model.embed_tokens": {"bits": 6, "group_size": 64}}),
    }


def test_numpy_model_imports_no_mlx() -> None:
    code = "import sys, mlx_llama.reference.model; assert not [m for m in sys.modules if m.split('.')[0] == 'mlx']"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_is_bit_exact(bits: int, group_size: int) -> None:
    from mlx_llama.reference.dequantize import dequantize

    w = mx.random.normal((48, 512), key=mx.random.key(bits * group_size)) * 0.05
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    ref = np.array(mx.dequantize(q, s, b, group_size=group_size, bits=bits))
    got = dequantize(np.array(q), np.array(s), np.array(b), group_size=group_size, bits=bits)
    assert got.dtype == np.float32 and np.array_equal(got, ref)


CACHES = {"growing": (None, 512), "growing-chunked": (None, 5), "rotating-chunked": (12, 5),
          "rotating-one-chunk": (16, 512)}


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("name", ["float-gqa-tied-llama3", "float-mha-untied", "8bit-g64",
                                  "4bit-g32-untied", "mixed-3bit-6bit"])
def test_mlx_matches_numpy(models: dict[str, Path], name: str, cache: str) -> None:
    max_kv, step = CACHES[cache]
    mlx_model, np_model = load_model(models[name], "float32"), load_numpy_model(models[name])
    report = compare(mlx_model, np_model, PROMPT, tokens=32, max_kv_size=max_kv, keep=4,
                     prefill_step_size=step, tolerance=REL_TOL)
    assert report.logits_rel.max() <= REL_TOL, report.lines()
    assert report.hidden_rel.max() <= REL_TOL, report.lines()
    # Each backend on its own through the shared generation loop: identical greedy ids.
    opts = dict(max_tokens=32, max_kv_size=max_kv, keep=4, prefill_step_size=step)
    assert list(generate_tokens(np_model, PROMPT, **opts)) == list(generate_tokens(mlx_model, PROMPT, **opts))


def test_rotating_cache_follows_the_contract(models: dict[str, Path]) -> None:
    """Chunked prefill + decode through the NumPy rotating cache equals one pass with the contract's mask."""
    model = load_numpy_model(models["float-gqa-tied-llama3"], "float64")
    tokens = np.array([PROMPT + PROMPT[:9]])
    max_size, keep, T = 10, 3, tokens.shape[1]
    q, k = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = (k <= q) & ((k < keep) | (k > q - (max_size - keep)))

    class FullMask:
        offset = 0

        def make_mask(self, L: int) -> np.ndarray:
            return mask

        def update_and_fetch(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return k, v

    expected = model(tokens, [FullMask() for _ in model.layers])[0]
    cache = model.make_cache(max_size, keep)
    got = [model(tokens[:, s : s + 4], cache)[0] for s in range(0, 20, 4)]
    got += [model(tokens[:, s : s + 1], cache)[0] for s in range(20, T)]
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=1e-12, atol=1e-12)
    assert cache[0].size == max_size


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False, "num_key_value_heads": 1}])
def test_numpy_matches_transformers(make_checkpoint: Callable[..., Path], overrides: dict[str, Any]) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = make_checkpoint(**overrides)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0].numpy()
    for dtype in ("float32", "float64"):
        got = load_numpy_model(path, dtype)(np.array([PROMPT]))[0]
        rel = np.abs(got - ref).max(-1) / np.abs(ref).max(-1)
        assert rel.max() <= REL_TOL, (dtype, rel.max())


def test_bfloat16_checkpoint_is_widened_exactly(tmp_path: Path) -> None:
    from mlx_llama.tools.random_checkpoint import make_config, write_checkpoint

    path = write_checkpoint(tmp_path, make_config("tiny", vocab_size=256), dtype="bfloat16", tokenizer=False)
    report = compare(load_model(path, "float32"), load_numpy_model(path), PROMPT, tokens=4, tolerance=REL_TOL)
    assert report.passed and report.hidden_rel[0] == 0.0  # embeddings: bit-identical


def test_generate_backend_numpy_matches_mlx(models: dict[str, Path]) -> None:
    outputs = {}
    for backend in ("mlx", "numpy"):
        args = ["generate", "-m", str(models["4bit-g32-untied"]), "--backend", backend,
                "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens", "16", "--temp", "0"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        outputs[backend] = result.output.split()
    assert len(outputs["numpy"]) >= 1 and outputs["numpy"] == outputs["mlx"]


def test_dequantize_per_call_matches_at_load(models: dict[str, Path]) -> None:
    path = models["mixed-3bit-6bit"]
    tokens = np.array([PROMPT])
    at_load = load_numpy_model(path)(tokens)
    per_call = load_numpy_model(path, dequantize="call")(tokens)
    np.testing.assert_allclose(per_call, at_load, rtol=1e-5, atol=1e-5)


def test_numpy_backend_user_errors(models: dict[str, Path], tmp_path: Path) -> None:
    from mlx_llama.errors import MlxLlamaError
    from mlx_llama.reference.model import NumpyModel
    from mlx_llama.reference.weights import read_numpy_weights
    from mlx_llama.config import ModelConfig

    path = models["float-mha-untied"]
    cfg = ModelConfig.from_file(path / "config.json")
    with pytest.raises(MlxLlamaError, match="float32 or float64"):
        load_numpy_model(path, "float16")
    weights = read_numpy_weights(path)
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(MlxLlamaError, match="lack model.layers.1.mlp.up_proj.weight"):
        NumpyModel(cfg, weights)
    weights = read_numpy_weights(path)
    weights["model.layers.9.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(MlxLlamaError, match="unexpected tensors"):
        NumpyModel(cfg, weights)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(MlxLlamaError, match="not a safetensors file"):
        read_numpy_weights(tmp_path)
