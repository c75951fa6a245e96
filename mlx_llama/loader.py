"""Load a model directory (HF layout or MLX 4/8-bit layout) into our MLX model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import mlx.core as mx
import mlx.nn as nn

from mlx_llama.kernels import extension
from mlx_llama.config import ModelConfig
from mlx_llama.model_dir import IGNORED_TENSOR_SUFFIXES, ModelDir
from mlx_llama.errors import MlxLlamaError
from mlx_llama.files import check_readable
from mlx_llama.model.fuse_weights import fuse_projections
from mlx_llama.model.llama import Model
from mlx_llama.model.panel_weights import use_panel_layout
from mlx_llama.model.quantized import quantize, require_affine

if TYPE_CHECKING:
    from mlx_llama.tokenizer import Tokenizer

M = TypeVar("M", bound=nn.Module)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_dtype() -> str:
    """float32 on the CPU (MLX's half-precision CPU kernels are naive loops), else the GPU-friendly bfloat16."""
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def read_weights(model_dir: ModelDir) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in model_dir.weight_files():
        check_readable(f)  # MLX's own message for a refused open does not say why
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError, OSError) as e:
            raise MlxLlamaError(f"cannot read {f.name}: {e}") from None
    return weights


def _quantize_layers(model: nn.Module, cfg: ModelConfig, weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers wherever the checkpoint holds `.scales` for them."""
    require_affine((cfg.quantization or {}).get("mode"))

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if f"{path}.scales" not in weights:
            return False
        params = cfg.quantization_for(path)
        if params is None:
            raise MlxLlamaError(f"{path} is quantized but config.json has no quantization for it")
        return params

    # Our QuantizedLinear/QuantizedEmbedding (same parameter names as mlx's) run
    # on the fast CPU kernels of mlx_llama.kernels.qmatmul.
    quantize(model, class_predicate=predicate)


def load_model(path: str | Path, dtype: str | None = None, *, fuse: bool = True) -> Model:
    """Build the model for a directory and load its weights, cast to `dtype`.

    With `fuse`, q/k/v and gate/up become one matmul each (mlx_llama.model.fuse_weights); without,
    the modules keep the checkpoint's names (to save the model, say).
    """
    model_dir = ModelDir.open(path)
    return load_weights_into(Model(model_dir.config), model_dir, read_weights(model_dir), dtype, fuse=fuse)


def load_weights_into(model: M, model_dir: ModelDir, weights: dict[str, mx.array], dtype: str | None,
                      *, fuse: bool = True) -> M:
    """Quantize, cast and load `weights` (lazy arrays from `read_weights`) into `model`, a module whose
    parameter names are the checkpoint's (`Model`, or a pipeline stage holding some of its layers);
    only the tensors `model` holds are read from disk."""
    cfg = model_dir.config
    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise MlxLlamaError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    weights = {k: v for k, v in weights.items() if not k.endswith(IGNORED_TENSOR_SUFFIXES)}
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    if any(k.endswith(".scales") for k in weights):
        _quantize_layers(model, cfg, weights)
    # Packed quantized weights stay uint32; every floating tensor takes the compute
    # dtype, except half-precision scales/biases our CPU kernels read as they are
    # (exact, and half a bit per weight less memory traffic than float32).
    target = DTYPES[dtype]
    keep_half = target == mx.float32 and extension.reads_half_scales()

    def cast(k: str, v: mx.array) -> mx.array:
        if not mx.issubdtype(v.dtype, mx.floating):
            return v
        if keep_half and k.endswith((".scales", ".biases")) and v.dtype in (mx.bfloat16, mx.float16):
            return v
        return v.astype(target)

    weights = {k: cast(k, v) for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MlxLlamaError(f"weights in {model_dir.path} do not fit the config: {e}") from None
    del weights  # the model holds what it needs: fusing must free the parts
    if fuse:
        fuse_projections(model)
    use_panel_layout(model, tied_embeddings=cfg.tie_word_embeddings)
    mx.clear_cache()  # return the fused parts' buffers instead of keeping them for reuse
    mx.eval(model.parameters())
    model.eval()
    model.path, model.generation_config = model_dir.path, model_dir.generation_config
    return model


def load(path: str | Path, dtype: str | None = None) -> tuple[Model, Tokenizer | None]:
    """`model, tokenizer = load(dir)`; the tokenizer is None when the directory has none."""
    from mlx_llama.tokenizer import Tokenizer

    model = load_model(path, dtype)
    return model, Tokenizer.from_dir(model.path, model.config, model.generation_config)
