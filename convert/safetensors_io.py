"""Safetensors at the byte level: validated headers and row-range reads.

We parse headers ourselves rather than trusting a library to fail politely:
every offset is checked against the file size, so a truncated download or a
corrupt header is reported before any work starts.  Reads are row ranges via
`np.fromfile`, so no tensor (not even a 128k-row embedding) is ever in memory
whole; bfloat16, which numpy lacks, travels as uint16 and is viewed back in MLX.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_llama.errors import MlxLlamaError
from mlx_llama.files import read_error

# safetensors dtype code -> (numpy storage dtype, mlx dtype); bfloat16 is stored as uint16.
FLOAT_DTYPES: dict[str, tuple[np.dtype, mx.Dtype]] = {
    "F32": (np.dtype("<f4"), mx.float32),
    "F16": (np.dtype("<f2"), mx.float16),
    "BF16": (np.dtype("<u2"), mx.bfloat16),
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2,
            "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MLX_TO_CODE = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}
CODE_TO_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# The sharded checkpoint's tensor → file map (HF convention).
INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: absolute byte range in `file`."""

    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorRef]:
    """All tensors of one safetensors file, with every offset checked against the file size."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MlxLlamaError(f"{name} is truncated: too short to hold a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise MlxLlamaError(
                    f"{name} has a corrupt or truncated safetensors header "
                    f"(header length {n}, file size {size}); download it again"
                )
            raw = f.read(n)
    except OSError as e:
        raise read_error(name, e) from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise MlxLlamaError(f"{name} has a corrupt safetensors header ({e}); download it again") from None
    data_start = 8 + n
    out: dict[str, TensorRef] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if dtype not in ITEMSIZE or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise MlxLlamaError(f"{name} has a corrupt safetensors header entry for {key!r}") from None
        if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise MlxLlamaError(f"{name}: tensor {key!r} byte range does not match its shape {list(shape)}")
        if data_start + end > size:
            raise MlxLlamaError(
                f"{name} is truncated: tensor {key!r} ends at byte {data_start + end} "
                f"but the file has {size}; download it again"
            )
        out[key] = TensorRef(path, dtype, shape, data_start + begin, end - begin)
    return out


class RowReader:
    """Reads row ranges of source tensors, keeping one open handle per shard file."""

    def __init__(self) -> None:
        self._files: dict[Path, object] = {}

    def rows(self, ref: TensorRef, start: int, stop: int) -> mx.array:
        np_dtype, mx_dtype = FLOAT_DTYPES[ref.dtype]
        row = math.prod(ref.shape[1:]) if len(ref.shape) > 1 else ref.shape[0]
        if len(ref.shape) == 1:
            start, stop = 0, 1
        f = self._files.get(ref.file)
        if f is None:
            f = self._files[ref.file] = open(ref.file, "rb")
        count = (stop - start) * row
        f.seek(ref.start + start * row * np_dtype.itemsize)
        data = np.fromfile(f, dtype=np_dtype, count=count)
        if data.size != count:
            raise MlxLlamaError(f"{ref.file.name} ended early while reading; the file is truncated")
        arr = mx.array(data.reshape((stop - start, *ref.shape[1:]) if len(ref.shape) > 1 else ref.shape))
        return arr.view(mx.bfloat16) if mx_dtype == mx.bfloat16 else arr

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: mx.Dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[MLX_TO_CODE[self.dtype]]


def encode_header(tensors: list[OutTensor], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included, padded to 8) and each tensor's absolute offset."""
    entries: dict[str, object] = {"__metadata__": metadata}
    offset, rel = 0, []
    for t in tensors:
        entries[t.name] = {"dtype": MLX_TO_CODE[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + t.nbytes]}
        rel.append(offset)
        offset += t.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    head = struct.pack("<Q", len(body)) + body
    return head, [len(head) + r for r in rel]


def array_bytes(a: mx.array) -> memoryview:
    """A contiguous byte view of an evaluated array (bfloat16 through uint16)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.array(a, copy=False))).cast("B")


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
