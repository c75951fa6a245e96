"""A model directory on disk: found, checked, its configs read once (no mlx: both backends load through it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from mlx_llama.config import ModelConfig, read_optional_json
from mlx_llama.errors import MlxLlamaError

# Tensors some checkpoints carry that the model derives itself.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ModelDir:
    path: Path
    config: ModelConfig
    generation_config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def open(cls, path: str | Path) -> "ModelDir":
        p = Path(path).expanduser()
        if not p.is_dir():
            raise MlxLlamaError(f"model directory {str(path)!r} not found")
        if not (p / "config.json").is_file():
            raise MlxLlamaError(f"{p} has no config.json: not a model directory")
        generation = MappingProxyType(read_optional_json(p / "generation_config.json"))
        return cls(p, ModelConfig.from_file(p / "config.json"), generation)

    def weight_files(self) -> list[Path]:
        return weight_files(self.path)


def weight_files(model_dir: Path) -> list[Path]:
    """The directory's safetensors shards, in name order; an error when there are none."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise MlxLlamaError(f"no *.safetensors files in {model_dir}")
    return files
