"""GGUF tensor data to float32 numpy arrays: shape order and chunked dequantization.

Tensors are dequantized one at a time with `gguf.quants.dequantize` (F32, F16, BF16, Q8_0,
Q4_0/1, Q5_0/1, K-quants, ...), a bounded number of bytes at a time, and the file pages
already read are dropped from the resident set as the load goes on.
"""

from __future__ import annotations

import math
import mmap

import numpy as np
from gguf.quants import dequantize


def _logical_shape(tensor) -> tuple[int, ...]:
    # GGUF lists dims innermost first (ggml's ne); numpy order is the reverse: [out, in].
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


# Quantized tensors are dequantized this many output bytes at a time: gguf's dequantize
# makes several full-size temporaries, which for a big embedding would cost more than the
# tensor itself.
_DEQUANT_CHUNK_BYTES = 16 << 20


def _release_file_pages(data: np.ndarray) -> None:
    """Drop the pages of the file that `data` maps from this process's resident set.

    Tensors are read through one read-only memmap; pages already read would otherwise stay
    resident (counted in RSS) until the load ends, adding the file's size to its peak. A
    read-only mapping re-reads a dropped page from the page cache if it is touched again.
    """
    base = data
    while base is not None and getattr(base, "_mmap", None) is None:
        base = getattr(base, "base", None)
    mapping = getattr(base, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mapping.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass


def _dequantize(tensor) -> np.ndarray:
    shape = _logical_shape(tensor)
    data, qtype = tensor.data, tensor.tensor_type
    # The tensors before this one are in the params by now. (Always safe: a view still
    # held into the shared, read-only mapping just re-reads its page when touched.)
    _release_file_pages(data)
    try:
        rows = data.shape[0] if data.ndim >= 2 else 0
        row_bytes = 4 * math.prod(shape[1:]) if len(shape) >= 2 else 0
        if qtype.name == "F32" or rows < 2 or rows * row_bytes <= _DEQUANT_CHUNK_BYTES:
            return dequantize(data, qtype).reshape(shape)
        values = np.empty(shape, np.float32)
        step = max(1, _DEQUANT_CHUNK_BYTES // row_bytes)
        for start in range(0, rows, step):
            chunk = dequantize(data[start:start + step], qtype)
            values[start:start + step] = chunk.reshape(-1, *shape[1:])
        return values
    except NotImplementedError as err:
        raise ValueError(
            f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf cannot "
            f"dequantize: {err}"
        ) from err

