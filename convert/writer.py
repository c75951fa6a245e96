"""Streaming sharded safetensors output and the all-or-nothing output directory.

Every output tensor's dtype and shape is known before the first byte is read,
so shards are planned up front: each file's header is written first and
tensor bytes are then written at their offsets, chunk by chunk, as they are
produced.  Nothing waits in memory for a shard to fill (`mx.save_safetensors`
would need the whole shard, up to 5 GB, resident at once).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from mlx_llama.errors import MlxLlamaError
from .safetensors_io import INDEX, OutTensor, array_bytes, encode_header, pwrite_all

MAX_SHARD_BYTES = 5 << 30


@dataclass
class _Shard:
    name: str
    tensors: list[OutTensor] = field(default_factory=list)
    nbytes: int = 0


def plan_shards(tensors: list[OutTensor], max_bytes: int = MAX_SHARD_BYTES) -> list[_Shard]:
    """Greedy, in order; a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[_Shard] = []
    for t in tensors:
        if not shards or (shards[-1].tensors and shards[-1].nbytes + t.nbytes > max_bytes):
            shards.append(_Shard(""))
        shards[-1].tensors.append(t)
        shards[-1].nbytes += t.nbytes
    for i, s in enumerate(shards, 1):
        s.name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    return shards


class ShardWriter:
    """Writes planned tensors row-chunk by row-chunk; `close()` checks all were written in full."""

    def __init__(self, out_dir: Path, tensors: list[OutTensor], total_parameters: int,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.out_dir = out_dir
        self.total_parameters = total_parameters
        self.shards = plan_shards(tensors, max_shard_bytes)
        self._where: dict[str, tuple[int, int, OutTensor]] = {}  # name -> (fd, offset, spec)
        self._written: dict[str, int] = {}
        self._fds: list[int] = []
        for shard in self.shards:
            head, offsets = encode_header(shard.tensors, {"format": "mlx"})
            fd = os.open(out_dir / shard.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            pwrite_all(fd, memoryview(head), 0)
            for t, off in zip(shard.tensors, offsets):
                self._where[t.name] = (fd, off, t)
                self._written[t.name] = 0

    def write(self, name: str, chunk: mx.array) -> None:
        """Append `chunk` (leading rows of tensor `name`, in order) to its place in its shard."""
        fd, off, spec = self._where[name]
        if chunk.dtype != spec.dtype or tuple(chunk.shape[1:]) != spec.shape[1:]:
            raise AssertionError(f"{name}: produced {chunk.dtype}{chunk.shape}, planned {spec.dtype}{spec.shape}")
        data = array_bytes(chunk)
        done = self._written[name]
        if done + len(data) > spec.nbytes:
            raise AssertionError(f"{name}: more bytes produced than planned")
        pwrite_all(fd, data, off + done)
        self._written[name] = done + len(data)

    def close(self) -> int:
        """Close the files, check completeness, write the index; returns the weight bytes."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        short = [n for n, (_, _, t) in self._where.items() if self._written[n] != t.nbytes]
        if short:
            raise AssertionError(f"tensors not fully written: {short[:3]}")
        total = sum(s.nbytes for s in self.shards)
        index = {
            "metadata": {"total_size": total, "total_parameters": self.total_parameters},
            "weight_map": {t.name: s.name for s in self.shards for t in s.tensors},
        }
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=4))
        return total

    def abort(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def check_output_dir(out_dir: Path, force: bool, source_dir: Path) -> None:
    """Refuse, before any work, an output that exists (without --force) or would clobber the source."""
    out, src = out_dir.resolve(), source_dir.resolve()
    if out == src or out in src.parents:
        raise MlxLlamaError(f"output {out_dir} would replace the source it converts; choose another -o")
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise MlxLlamaError(f"{out_dir} already exists; pass --force to replace it or choose another -o")
        if not out_dir.is_dir():
            raise MlxLlamaError(f"{out_dir} exists and is not a directory; remove it or choose another -o")
    parent = out_dir.parent
    if not parent.is_dir():
        raise MlxLlamaError(f"cannot create {out_dir}: {parent} does not exist")


@contextmanager
def staged_output(out_dir: Path, force: bool) -> Iterator[Path]:
    """A hidden temp dir next to `out_dir`; renamed into place only if the block completes.

    On any error or Ctrl-C the temp dir is removed, so nothing that looks like a
    model is left behind.  With `force`, an existing `out_dir` is swapped out only
    once the new one is complete.
    """
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir.parent / f".{out_dir.name}.converting-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists() or out_dir.is_symlink():
            if not force:
                raise MlxLlamaError(f"{out_dir} appeared during the conversion; not replacing it without --force")
            old = out_dir.parent / f".{out_dir.name}.replaced-{tag}"
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            _remove(old)
        else:
            os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
