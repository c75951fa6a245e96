"""Read a model directory's safetensors into NumPy, without mlx.

The format is an 8-byte little-endian header length, a JSON header of
`{name: {dtype, shape, data_offsets}}`, then the raw little-endian bytes.  We
parse it ourselves because `safetensors.safe_open(framework="numpy")` cannot
return bfloat16: BF16 tensors are read as uint16 and widened exactly to float32
(a bfloat16 is the top half of a float32).  Tensors are memory-mapped, so a
file is only read as each tensor is converted.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from mlx_llama.errors import MlxLlamaError
from mlx_llama.files import check_readable
from mlx_llama.model_dir import weight_files

_STORAGE = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "U32": "<u4", "I16": "<i2", "U16": "<u2", "I8": "i1", "U8": "u1",
    "BOOL": "?",
}


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns → float32, exactly."""
    return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _tensors_in(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    check_readable(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxLlamaError(f"cannot read {path.name}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise MlxLlamaError(f"cannot read {path.name}: not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    if not header:
        return
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    for name, info in header.items():
        code, shape, (start, end) = _entry(path, name, info)
        if end > data.size:
            raise MlxLlamaError(f"{path.name} is truncated: tensor {name} runs past the end of the file")
        arr = data[start:end].view(_STORAGE[code]).reshape(shape)
        yield name, bf16_to_float32(arr) if code == "BF16" else arr


def _naturals(v: object, length: int | None = None) -> bool:
    """A JSON list of non-negative integers (of `length` items when given)."""
    return (isinstance(v, list) and (length is None or len(v) == length)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v))


def _entry(path: Path, name: str, info: object) -> tuple[str, list[int], tuple[int, int]]:
    """A header entry's dtype, shape and byte range, checked against each other."""
    if not isinstance(info, dict):
        raise MlxLlamaError(f"{path.name}: tensor {name} has a malformed header entry")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if code not in _STORAGE:
        raise MlxLlamaError(f"{path.name}: tensor {name} has unsupported dtype {code}")
    if not _naturals(shape) or not _naturals(offsets, 2) or offsets[0] > offsets[1]:
        raise MlxLlamaError(f"{path.name}: tensor {name} has a malformed shape or data_offsets")
    if offsets[1] - offsets[0] != int(np.prod(shape, dtype=np.int64)) * np.dtype(_STORAGE[code]).itemsize:
        raise MlxLlamaError(f"{path.name}: tensor {name}'s data_offsets do not match its shape and dtype")
    return code, shape, (offsets[0], offsets[1])


def read_numpy_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor in `model_dir/*.safetensors`; floats as float16/32/64 (BF16 widened to float32)."""
    weights: dict[str, np.ndarray] = {}
    for f in weight_files(model_dir):
        weights.update(_tensors_in(f))
    return weights
