"""Lossless block encodings of float32 weight matrices, for the CPU small-matmul kernel.

A model loaded from a quantized GGUF file (the default model is Q4_1 with a Q8_0
embedding) holds float32 weights that are exactly `d * q + m` per block of 32: a decode
step that streams them as float32 reads 4 bytes where 0.75 hold the same numbers. When
every block of a matrix passes the check here, the kernel streams the blocks instead and
rebuilds each float32 weight in registers, bit for bit the value it replaces (`d * q` is
exact in float32, so `d * q + m` rounds once, as the loader's numpy did), then multiplies
in the same order: the products are bitwise those of the float32 matrix.

Formats (one byte row per weight row, `I / 32` blocks of):
  Q4_1: float32 d, float32 m, 16 bytes: element j in the low nibble of byte j, element
        j + 16 in its high nibble; w = d * q + m, q in 0..15 (24 bytes per 32 weights);
  Q8_0: float32 d, 32 int8 q; w = d * q (36 bytes per 32 weights);
  BF16: 32 bfloat16 values, each float32 weight's upper half (its lower half is zero):
        a bfloat16 checkpoint run in float32 (64 bytes per 32 weights).
d and m are float16 values (GGUF's), stored widened so the kernel needs no conversion.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

BLOCK = 32
Q4_1, Q8_0, BF16 = 1, 2, 3  # the kernel's format codes
BLOCK_BYTES = {Q4_1: 24, Q8_0: 36, BF16: 64}


def encode_exactly(w: np.ndarray,  # [O, I] float32
                   ) -> Optional[tuple[int, np.ndarray]]:
    """(format, blocks uint8 [O, I / 32 * block bytes]) that decode to exactly `w`, bit
    for bit, or None when no format here holds it (including I not a multiple of 32)."""
    if w.dtype != np.float32 or w.ndim != 2 or w.shape[1] % BLOCK or w.size == 0:
        return None
    blocks = w.reshape(w.shape[0], -1, BLOCK)  # [O, N, 32]
    for encode in (_encode_q4_1, _encode_q8_0, _encode_bf16):
        encoded = encode(blocks)
        if encoded is not None:
            return encoded
    return None


def decode(fmt: int, blocks: np.ndarray,  # [O, bytes per row] uint8
           ) -> np.ndarray:
    """The float32 matrix [O, I] that `blocks` of format `fmt` encode (the reference the
    kernel's in-register decoding is tested against)."""
    rows = blocks.shape[0]
    if fmt == BF16:
        halves = blocks.reshape(rows, -1).view(np.uint16).astype(np.uint32)  # [O, I]
        return (halves << 16).view(np.float32)
    raw = blocks.reshape(rows, -1, BLOCK_BYTES[fmt])  # [O, N, block bytes]
    d = raw[..., :4].copy().view(np.float32)  # [O, N, 1]
    if fmt == Q8_0:
        q = raw[..., 4:].view(np.int8).astype(np.float32)
        return (q * d).reshape(rows, -1)
    m = raw[..., 4:8].copy().view(np.float32)
    nibbles = raw[..., 8:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.float32)
    return (d * q + m).reshape(rows, -1)


def _is_half(x: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.array_equal(x.astype(np.float16).astype(np.float32), x))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def _encode_q4_1(blocks: np.ndarray,  # [O, N, 32] float32
                 ) -> Optional[tuple[int, np.ndarray]]:
    # The block's least value has q = 0, so it is m; its greatest has q = 15 (llama.cpp's
    # quantizer maps min..max onto 0..15), which pins d up to float16 rounding.
    m = blocks.min(axis=-1, keepdims=True)  # [O, N, 1]
    if not _is_half(m):
        return None
    d = ((blocks.max(axis=-1, keepdims=True) - m) / np.float32(15)).astype(
        np.float16).astype(np.float32)
    q = _nearest_multiples(blocks - m, d, 0, 15)
    if not _same_bits(_rebuilt(q, d, m), blocks):
        return None
    q = q.astype(np.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # [O, N, 16]
    raw = np.concatenate([d.view(np.uint8), m.view(np.uint8), nibbles], axis=-1)
    return Q4_1, raw.reshape(blocks.shape[0], -1)


def _encode_q8_0(blocks: np.ndarray,  # [O, N, 32] float32
                 ) -> Optional[tuple[int, np.ndarray]]:
    # The block's value of greatest magnitude has |q| = 127, so it is 127 d exactly.
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)  # [O, N, 1]
    if not _is_half(d):
        return None
    q = _nearest_multiples(blocks.copy(), d, -128, 127)
    if not _same_bits(_rebuilt(q, d), blocks):
        return None
    raw = np.concatenate([d.view(np.uint8), q.astype(np.int8).view(np.uint8)], axis=-1)
    return Q8_0, raw.reshape(blocks.shape[0], -1)


def _encode_bf16(blocks: np.ndarray,  # [O, N, 32] float32
                 ) -> Optional[tuple[int, np.ndarray]]:
    bits = blocks.view(np.uint32)
    if np.any(bits & 0xFFFF):
        return None
    upper = (bits >> 16).astype(np.uint16)  # little-endian: 2 bytes per weight, in order
    return BF16, upper.view(np.uint8).reshape(blocks.shape[0], -1)


def _nearest_multiples(x: np.ndarray, d: np.ndarray, low: int, high: int) -> np.ndarray:
    """round(x / d) clipped to [low, high] (0 where d is 0), computed in place in x."""
    np.divide(x, np.where(d > 0, d, np.float32(1)), out=x)
    np.rint(x, out=x)
    return np.clip(x, low, high, out=x)


def _rebuilt(q: np.ndarray, d: np.ndarray, m: Optional[np.ndarray] = None) -> np.ndarray:
    """q * d (+ m) in float32, as the loader's numpy dequantized them."""
    w = q * d
    if m is not None:
        w += m
    return w
