"""Resolve SOURCE (a local directory or a hub repo id) and validate it before any work."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mlx_llama.config import ModelConfig, read_json_object
from mlx_llama.errors import MlxLlamaError
from mlx_llama.files import check_readable, read_text
from mlx_llama.model_dir import looks_like_repo_id
from . import hub
from .layout import expected_tensors, is_ignorable
from .safetensors_io import CODE_TO_NAME, FLOAT_DTYPES, INDEX, TensorRef, read_header

PICKLE_PATTERNS = ("pytorch_model*.bin", "consolidated.*.pth", "*.pt", "*.ckpt", "original/consolidated.*.pth")


@dataclass
class Source:
    path: Path
    name: str  # repo or directory name, for the default output name
    raw_config: dict[str, Any]
    config: ModelConfig
    tensors: dict[str, TensorRef]  # exactly the expected tensors, in model order
    dtype: str  # the weights' dtype name, e.g. "bfloat16"


def source_name(source: str) -> str:
    """A short name for SOURCE (directory or repo name), known before anything is downloaded."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p.resolve().name
    if p.exists():
        raise MlxLlamaError(f"{source} is a file; SOURCE must be a model directory or a hub repo id")
    if not looks_like_repo_id(source):
        raise MlxLlamaError(f"{source!r} is neither a directory nor a Hugging Face repo id like org/name")
    if p.parent.is_dir():
        # org/name where ./org is a local folder: almost surely a mistyped path, not a hub repo
        raise MlxLlamaError(f"no directory {source}: the folder {p.parent} exists but holds no {p.name!r} "
                            "(to fetch the hub repo of that name, run from another folder)")
    return source.split("/")[-1]


def resolve(source: str, revision: str | None = None, log: Callable[[str], None] = print) -> tuple[Path, str]:
    """The local directory holding SOURCE and a short name for it."""
    name = source_name(source)
    p = Path(source).expanduser()
    if p.is_dir():
        if revision:
            raise MlxLlamaError("--revision applies to hub repos only, but SOURCE is a local directory")
        return p, name
    return hub.download(source, revision, log), name


def open_source(source: str, revision: str | None = None, log: Callable[[str], None] = print) -> Source:
    path, name = resolve(source, revision, log)
    return validate(path, name)


def validate(path: Path, name: str | None = None) -> Source:
    """Read config and every shard header; refuse anything a LLaMA conversion cannot use."""
    check_readable(path)
    if not (path / "config.json").is_file():
        raise MlxLlamaError(f"{path} has no config.json: not a Hugging Face model directory")
    raw = read_json_object(path / "config.json")
    cfg = ModelConfig.from_dict(raw)
    if cfg.quantization or raw.get("quantization_config"):
        raise MlxLlamaError(f"{path.name} is already quantized; convert from the original float checkpoint")

    files, weight_map = _shard_files(path)
    found = _all_tensors(path, files)
    for key, file in weight_map.items():
        if key not in found or found[key].file.name != file:
            raise MlxLlamaError(f"{INDEX} puts {key} in {file}, but that file does not hold it")
    expected = expected_tensors(cfg)
    missing = [k for k in expected if k not in found]
    if missing:
        raise MlxLlamaError(f"checkpoint lacks {len(missing)} expected tensor(s), e.g. {', '.join(missing[:3])}")
    unexpected = [k for k in found if k not in expected and not is_ignorable(k, cfg)]
    if unexpected:
        raise MlxLlamaError(
            f"checkpoint has {len(unexpected)} tensor(s) a LLaMA model does not use, e.g. "
            f"{', '.join(unexpected[:3])}"
        )
    tensors: dict[str, TensorRef] = {}
    for key, shape in expected.items():
        ref = found[key]
        if ref.shape != shape:
            raise MlxLlamaError(f"tensor {key} has shape {list(ref.shape)}, expected {list(shape)} from config.json")
        if ref.dtype not in FLOAT_DTYPES:
            raise MlxLlamaError(f"tensor {key} has dtype {ref.dtype}; only float32/float16/bfloat16 sources convert")
        tensors[key] = ref
    dtype = Counter(r.dtype for r in tensors.values()).most_common(1)[0][0]
    return Source(path, name or path.resolve().name, raw, cfg, tensors, CODE_TO_NAME[dtype])


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files to read and the index's tensor -> file map (empty without an index)."""
    index = path / INDEX
    if index.is_file():
        text = read_text(index)
        try:
            weight_map = json.loads(text)["weight_map"]
            names = set(weight_map.values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise MlxLlamaError(f"{INDEX} is malformed: it needs a weight_map of tensor -> file") from None
        for n in names:
            if not _plain_name(n):
                raise MlxLlamaError(
                    f"{INDEX} names shard {n!r}, which is not a plain file name inside the model directory"
                )
            if not (path / n).is_file():
                raise MlxLlamaError(f"{INDEX} names shard {n}, which is missing; the download is incomplete")
        return [path / n for n in sorted(names)], weight_map
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, {}
    pickles = [p.relative_to(path) for pat in PICKLE_PATTERNS for p in path.glob(pat)]
    if pickles:
        raise MlxLlamaError(
            f"{path.name} holds only pickle weights ({pickles[0]}): mlx-llama converts safetensors only, "
            "because loading pickles can run arbitrary code; use the repo's safetensors version"
        )
    raise MlxLlamaError(f"no *.safetensors weights in {path}")


def _plain_name(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name and name.endswith(".safetensors"))


def _all_tensors(path: Path, files: list[Path]) -> dict[str, TensorRef]:
    found: dict[str, TensorRef] = {}
    for f in files:
        for key, ref in read_header(f).items():
            if key in found:
                raise MlxLlamaError(f"tensor {key} appears in both {found[key].file.name} and {f.name}")
            found[key] = ref
    return found
