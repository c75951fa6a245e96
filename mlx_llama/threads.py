"""The sizes of the two CPU thread pools the model runs on: OpenBLAS's (prefill matmuls) and the
quantized-matmul kernels' (mlx_llama.kernels.extension).  `bench -t` sets them per run; a pipeline
rank sets them to its share of the host's cores when several ranks run on one host."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


def set_threads(n: int) -> None:
    """Size both pools to `n` threads (each call made with the pool's own API; no-op for an absent pool)."""
    from mlx_llama.kernels import blas, extension

    blas.set_threads(n)
    ext = extension.module()
    if ext is not None:
        ext.set_num_threads(n)


@contextlib.contextmanager
def thread_pools() -> Iterator[Callable[[int], None]]:
    """`set_threads` for a block; the pools' sizes are restored afterwards (the CLI may run in-process)."""
    from mlx_llama.kernels import blas, extension

    ext = extension.module()
    before = blas.info().threads, ext.num_threads() if ext is not None else 0
    try:
        yield set_threads
    finally:
        if before[0]:
            blas.set_threads(before[0])
        if ext is not None:
            ext.set_num_threads(before[1])
