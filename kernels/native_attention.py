"""Paged attention with decode rows in a C++ kernel: the "native" backend for XLA on CPU.

Everything is the jnp backend (`jnp_attention.paged_attention`) except the reads of
cached context, one query token per row (every decode token, and every token of a
continuing chunk): those run `decode_attention.cc` through `jax.ffi`, which multiplies
each page where it lies in the pool instead of gathering it into a copy first (XLA CPU
cannot feed a gather into a dot), and walks a chunk's rows together so each page is read
once per group of rows.

The kernel is compiled per (query heads per KV head, head dim, page size) by
`native_build`, so registers hold a page's scores and a row's outputs; `native_build`
caches the library on disk. Float32 or bfloat16 pools (a bfloat16 engine's: read widened,
bitwise the float32 pool of the same values; written in place by `kv_pool_writes.cc`, as
XLA CPU has no 16-bit scatter); any head dim and page size (vectors of the machine's
register width, 16 floats with AVX-512 and 8 with AVX2, when both are multiples of it;
narrower ones otherwise).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from . import jnp_attention, kv_write
from .native_build import NativeBuildError, register_kernel

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_attention.cc")
# The handlers decode_attention.cc exports, by pool dtype.
SYMBOLS = {"float32": "PagedjaxDecodeAttention", "bfloat16": "PagedjaxDecodeAttentionBF16"}


def unsupported_reason(group: int, head_dim: int, block_size: int, dtype) -> str | None:
    """Why the kernel cannot serve these shapes (None: it can), building it if needed."""
    if jnp.dtype(dtype).name not in SYMBOLS:
        return f"dtype {jnp.dtype(dtype).name} (the kernel reads float32 or bfloat16 pools)"
    try:
        load_decode_attention(group, head_dim, block_size, jnp.dtype(dtype).name)
        if jnp.dtype(dtype) == jnp.bfloat16:  # such a pool is written in place natively
            kv_write.load_kv_write()
            kv_write.load_kv_copy_pages()
    except NativeBuildError as e:
        return str(e)
    return None


@functools.cache
def load_decode_attention(group: int, head_dim: int, page_size: int,
                          pool_dtype: str = "float32") -> str:
    """Build (or find cached), load and register the kernel for these shapes and pools of
    `pool_dtype`; returns its XLA FFI target name. Raises NativeBuildError when it cannot
    be built here."""
    target = f"pagedjax_decode_attention_g{group}_d{head_dim}_s{page_size}"
    return register_kernel(SOURCE, {"GROUP": group, "HEAD_DIM": head_dim,
                                    "PAGE_SIZE": page_size},
                           target if pool_dtype == "float32" else f"{target}_{pool_dtype}",
                           SYMBOLS[pool_dtype])


def decode_rows(
    q: jax.Array,  # [R, K, G, D] float32, already scaled
    tables: jax.Array,  # [R, M] pages of each row's sequence
    lens: jax.Array,  # [R] keys at positions < lens are visible
    query_positions: jax.Array,  # [R] each row's own position (for the window)
    *,
    k_cache: jax.Array,  # [L, P, K, D, S] float32 or bfloat16
    v_cache: jax.Array,  # [L, P, S, K, D] likewise
    layer: jax.Array,  # [] int32
    sliding_window: int | None,
    soft_cap: float | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The unnormalised softmax of each row over its cached context, in
    PagedContext.attend_rows' layout: (max [K, R, G], total [K, R, G], out [K, R, G, D])."""
    rows, num_kv_heads, group, head_dim = q.shape
    target = load_decode_attention(group, head_dim, v_cache.shape[2], v_cache.dtype.name)
    partial_shape = jax.ShapeDtypeStruct((rows, num_kv_heads, group), jnp.float32)
    call = jax.ffi.ffi_call(
        target, (partial_shape, partial_shape,
                 jax.ShapeDtypeStruct((rows, num_kv_heads, group, head_dim), jnp.float32)))
    top, total, out = call(
        q.astype(jnp.float32), k_cache, v_cache, jnp.asarray(layer, jnp.int32),
        tables.astype(jnp.int32), lens.astype(jnp.int32),
        query_positions.astype(jnp.int32),
        window=np.int32(sliding_window or 0), soft_cap=np.float32(soft_cap or 0.0))
    return tuple(jnp.swapaxes(x, 0, 1) for x in (top, total, out))


def paged_attention(*args, slot_mapping=None, **kwargs) -> jax.Array:
    """`jnp_attention.paged_attention` (same arguments, plus the unused `slot_mapping`
    every backend takes) with its per-row context read in the kernel."""
    del slot_mapping
    return jnp_attention.paged_attention(*args, row_attention=decode_rows, **kwargs)
