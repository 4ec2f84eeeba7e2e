"""Products of a few rows with a weight matrix in a C++ XLA FFI kernel, for XLA on CPU.

A decode step of a handful of sequences multiplies a few rows by every weight matrix, so
its time should be the time to read the weights once. XLA CPU's dots of 2-16 rows take
1.2-3x that on the default model's matrices (its 1-row dots do not:
`python benchmarks/small_matmul.py`); `small_matmul.cc` streams each weight row once
against every x row. The engine turns it on through `ModelConfig.small_matmul_rows`
(CPU, one device, float32 or bfloat16), and `models/layers.linear` calls it for inputs of
MIN_ROWS..that many rows (bfloat16: from one row, its weights read where they lie and
summed in float32; block-encoded weights: from one row to MAX_BLOCK_ROWS). It has a VJP
(plain dots), so gradients flow through it too.

A matrix whose float32 values are exactly a block encoding (kernels/exact_blocks.py: the
default model's Q4_1 / Q8_0 GGUF weights, a bfloat16 checkpoint's in float32) reaches
`linear` as a `BlockMatrix`; the kernel then streams its blocks, a fifth to half the bytes,
with bitwise the same outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from .native_build import NativeBuildError, register_kernel

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "small_matmul.cc")
_TARGET = "pagedjax_small_matmul"
_BLOCKS_TARGET = "pagedjax_small_matmul_blocks"
_LAYER_TARGETS = {"float32": ("pagedjax_small_matmul_layer", "PagedjaxSmallMatmulLayer"),
                  "bfloat16": ("pagedjax_small_matmul_layer_bf16",
                               "PagedjaxSmallMatmulLayerBF16")}
MIN_ROWS = 2  # one row: XLA's own matrix-vector dot is as fast
MAX_ROWS = 16  # beyond, XLA's blocked GEMM wins on float32 and bfloat16 weights
# Blocks a fifth to half the bytes keep the kernel ahead further: 32 rows of the default
# model's Q4_1 / Q8_0 products in 31.8 ms a step against XLA's float32 dots' 46.4 (Zen 5).
MAX_BLOCK_ROWS = 32
# A layer of stacked float32 weights (a trainer's params) read in place, against XLA's
# dot of a copied slice: 32 sequences of the default model 293-330 -> 383-413 tok/s at
# 32 rows instead of 16; 64 rows tied (Zen 5). bfloat16 ones stay at MAX_ROWS.
MAX_STACKED_ROWS = 32


@functools.cache
def load_small_matmul() -> str:
    """Build (or find cached), load and register the kernel; returns its XLA FFI target
    name. Raises NativeBuildError when it cannot be built here."""
    return register_kernel(SOURCE, {}, _TARGET, "PagedjaxSmallMatmul")


@functools.cache
def load_small_matmul_blocks() -> str:
    """Like load_small_matmul, for the handler that reads block-encoded weights."""
    return register_kernel(SOURCE, {}, _BLOCKS_TARGET, "PagedjaxSmallMatmulBlocks")


@functools.cache
def load_small_matmul_layer(dtype: str) -> str:
    """Like load_small_matmul, for the handler that reads one layer of stacked weights of
    `dtype` ("float32" or "bfloat16")."""
    return register_kernel(SOURCE, {}, *_LAYER_TARGETS[dtype])


def unsupported_reason(platform: str, dtype) -> str | None:
    """Why the kernel cannot run these products (None: it can), building it if needed."""
    if platform != "cpu":
        return f"{platform} (it is an XLA CPU kernel)"
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        return f"dtype {jnp.dtype(dtype).name} (the kernel reads float32 or bfloat16 weights)"
    try:
        load_small_matmul()
        load_small_matmul_layer(jnp.dtype(dtype).name)
    except NativeBuildError as e:
        return str(e)
    return None


@jax.custom_vjp
def small_matmul(x: jax.Array,  # [R, I] float32
                 w: jax.Array,  # [O, I] float32
                 ) -> jax.Array:
    """x @ w.T as [R, O], in the kernel."""
    call = jax.ffi.ffi_call(load_small_matmul(),
                            jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))
    return call(x, w)


def _forward(x, w):
    return small_matmul(x, w), (x, w)


def _backward(residuals, grad):  # grad [R, O]
    x, w = residuals
    return grad @ w, grad.T @ x


small_matmul.defvjp(_forward, _backward)


@jax.custom_vjp
def small_matmul_bf16(x: jax.Array,  # [R, I] bfloat16
                      w: jax.Array,  # [O, I] bfloat16, I a multiple of 32
                      ) -> jax.Array:
    """x @ w.T as [R, O] bfloat16 in the kernel, reading w where it lies (as a stack of
    one): summed in float32 and rounded once, bitwise the float32 kernel on the widened
    values."""
    return small_matmul_layer(x, w[None], jnp.int32(0))


def _forward_bf16(x, w):
    return small_matmul_bf16(x, w), (x, w)


small_matmul_bf16.defvjp(_forward_bf16, _backward)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMatrix:
    """A float32 [O, I] weight matrix with the same values block-encoded (`format`, an
    exact_blocks code). While `use_blocks` holds, products in the kernel read the blocks;
    new weights clear it (blocks of the old ones) without changing any shape."""

    dense: jax.Array  # [O, I] float32
    blocks: jax.Array  # [O, I / 32 * block bytes] uint8
    use_blocks: jax.Array  # [] bool
    format: int = dataclasses.field(metadata=dict(static=True))


def small_matmul_blocks(x: jax.Array,  # [R, I] float32
                        m: BlockMatrix) -> jax.Array:
    """x @ m.dense.T as [R, O] in the kernel, from m.blocks while m.use_blocks holds."""
    call = jax.ffi.ffi_call(load_small_matmul_blocks(),
                            jax.ShapeDtypeStruct((x.shape[0], m.dense.shape[0]), jnp.float32))
    return call(x, m.dense, m.blocks, m.use_blocks, format=np.int32(m.format))


def small_matmul_layer(x: jax.Array,  # [R, I] float32 or bfloat16, as w
                       w: jax.Array,  # [L, O, I]
                       layer: jax.Array,  # [] int32
                       ) -> jax.Array:
    """x @ w[layer].T as [R, O] in the kernel, reading the layer's matrix where it lies in
    the stack (no slice copied first); bfloat16 summed in float32 and rounded once. The
    engine's step only (no VJP)."""
    call = jax.ffi.ffi_call(load_small_matmul_layer(w.dtype.name),
                            jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32))
    y = call(x.astype(jnp.float32), w, jnp.asarray(layer, jnp.int32))
    return y.astype(x.dtype)
