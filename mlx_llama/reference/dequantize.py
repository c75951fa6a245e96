"""MLX affine dequantization in NumPy, for the reference backend (imports no mlx).

MLX packs each row of `bits`-bit integers into uint32 words as one continuous
little-endian bit stream: value j occupies bits [j*bits, (j+1)*bits) of the
row's bytes.  For widths that divide 32 (2, 4, 8) a value never straddles a
word; for 3, 5 and 6 bits it can, so the stream is read in chunks of
lcm(bits, 8) bits (whole bytes) instead of in words.

Each group of `group_size` consecutive values along a row has its own scale and
bias: w = scale * q + bias, computed in the dtype of `scales` after widening.
In float32 this is bit-for-bit what `mx.dequantize` returns.
"""

from __future__ import annotations

from math import gcd

import numpy as np

from mlx_llama.errors import MlxLlamaError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
_ROWS_PER_BLOCK = 2048  # bounds the transient integer arrays when dequantizing big matrices


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """The uint8 integers (..., n) packed little-endian into `packed` (..., n * bits / 32) uint32."""
    if bits not in SUPPORTED_BITS:
        raise MlxLlamaError(f"unsupported quantization bits {bits}: choose from {SUPPORTED_BITS}")
    packed = np.ascontiguousarray(packed, dtype="<u4")
    raw = packed.view(np.uint8)  # little-endian byte stream per row
    lead = raw.shape[:-1]
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # 2, 4, 8 bits: whole values within each byte
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        return ((raw[..., None] >> shifts) & np.uint8(mask)).reshape(*lead, -1)
    per_chunk = 8 // gcd(bits, 8)  # values per chunk of whole bytes
    chunk_bytes = bits * per_chunk // 8  # 3 bytes for 3 and 6 bits, 5 for 5 bits
    word_type = np.uint32 if chunk_bytes <= 4 else np.uint64
    chunks = raw.reshape(*lead, -1, chunk_bytes)
    word = chunks[..., 0].astype(word_type)
    for i in range(1, chunk_bytes):
        word |= chunks[..., i].astype(word_type) << word_type(8 * i)
    shifts = np.arange(per_chunk, dtype=word_type) * word_type(bits)
    values = (word[..., None] >> shifts) & word_type(mask)
    return values.reshape(*lead, -1).astype(np.uint8)


def dequantize(
    packed: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    *,
    group_size: int,
    bits: int,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """The float matrix (rows, cols) that MLX's `quantize` packed into `packed`, `scales`, `biases`."""
    dtype = np.dtype(dtype)
    rows = packed.shape[0]
    cols = packed.shape[-1] * 32 // bits
    if cols % group_size or scales.shape != (rows, cols // group_size) or biases.shape != scales.shape:
        raise MlxLlamaError(
            f"quantized tensor shapes do not fit bits={bits}, group_size={group_size}: "
            f"weight {packed.shape}, scales {scales.shape}, biases {biases.shape}"
        )
    out = np.empty((rows, cols), dtype=dtype)
    for start in range(0, rows, _ROWS_PER_BLOCK):
        stop = min(start + _ROWS_PER_BLOCK, rows)
        q = unpack(packed[start:stop], bits).astype(dtype).reshape(stop - start, -1, group_size)
        s = np.asarray(scales[start:stop], dtype=dtype)[..., None]
        b = np.asarray(biases[start:stop], dtype=dtype)[..., None]
        # Multiply then add, each rounded in `dtype`, as mx.dequantize does.
        out[start:stop] = (q * s + b).reshape(stop - start, cols)
    return out
