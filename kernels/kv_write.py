"""Writing a step's K/V into the paged cache, before attention, whichever backend runs.

XLA's scatter does it in place for every pool but a 16-bit one on CPU, where XLA CPU has
no 16-bit float scatter; there (the native backend's bfloat16 pool) `kv_pool_writes.cc`
moves the elements in an XLA FFI call whose outputs alias the pools.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from .native_build import register_kernel

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kv_pool_writes.cc")


@functools.cache
def load_kv_write() -> str:
    """Build (or find cached), load and register the in-place KV write for bfloat16
    pools; returns its XLA FFI target name. Raises NativeBuildError."""
    return register_kernel(SOURCE, {}, "pagedjax_kv_write", "PagedjaxKvWrite")


@functools.cache
def load_kv_copy_pages() -> str:
    """Like load_kv_write, for the in-place page copy (copy-on-write) of bfloat16 pools."""
    return register_kernel(SOURCE, {}, "pagedjax_kv_copy_pages", "PagedjaxKvCopyPages")


def writes_in_kernel(pool: jax.Array, native: bool) -> bool:
    """Whether writes into `pool` go through kv_pool_writes.cc: a bfloat16 pool of the
    native (CPU) backend."""
    return native and pool.dtype == jnp.bfloat16


def copy_pages_in_kernel(k_cache: jax.Array,  # [L, P, K, D, S] bfloat16
                         v_cache: jax.Array,  # [L, P, S, K, D]
                         src: jax.Array,  # [N] int32
                         dst: jax.Array,  # [N] int32
                         ) -> tuple[jax.Array, jax.Array]:
    """Page dst[i] := page src[i] in every layer of both pools, in place (aliased)."""
    call = _on_pools(load_kv_copy_pages(), k_cache, v_cache)
    return tuple(call(k_cache, v_cache, src.astype(jnp.int32), dst.astype(jnp.int32)))


def _on_pools(target: str, k_cache: jax.Array, v_cache: jax.Array):
    """An FFI call of `target` whose two results are its first two operands, the pools
    (aliased: XLA hands the kernel their buffers to write in place)."""
    pools = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k_cache, v_cache))
    return jax.ffi.ffi_call(target, pools, input_output_aliases={0: 0, 1: 1})


def write_kv(
    k_cache: jax.Array,  # [L, P, K, D, S] (keys transposed within a page)
    v_cache: jax.Array,  # [L, P, S, K, D]
    layer: jax.Array,  # [] int32
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    slot_mapping: jax.Array,  # [T] flat slot = page * S + offset; padding -> null page 0
    native: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's K/V into `layer` of the paged cache (in place under donation);
    `native`: the native backend's pool, written by the kernel when it is bfloat16."""
    if writes_in_kernel(k_cache, native):
        write = _on_pools(load_kv_write(), k_cache, v_cache)
        return tuple(write(k_cache, v_cache, jnp.asarray(layer, jnp.int32),
                           k.astype(k_cache.dtype), v.astype(v_cache.dtype),
                           slot_mapping.astype(jnp.int32)))
    page_size = v_cache.shape[2]
    pages = slot_mapping // page_size
    offsets = slot_mapping % page_size
    if slot_mapping.shape[0] == 1:
        # One token: XLA CPU turns a one-index scatter into a dynamic-update-slice under a
        # select over the whole pool, copying the pool at every layer (seconds a step).
        # A second write, to the null page's first slot (where padding writes), keeps it
        # a scatter, done in place.
        k, v = (jnp.concatenate([x, x]) for x in (k, v))
        pages = jnp.concatenate([pages, jnp.zeros_like(pages)])
        offsets = jnp.concatenate([offsets, jnp.zeros_like(offsets)])
    # Both index one [K, D] slot per token (the update is [T, K, D]); a key's slot is
    # strided across its page because keys are stored transposed.
    k_cache = k_cache.at[layer, pages, :, :, offsets].set(k.astype(k_cache.dtype),
                                                         mode="promise_in_bounds")
    v_cache = v_cache.at[layer, pages, offsets].set(v.astype(v_cache.dtype),
                                                   mode="promise_in_bounds")
    return k_cache, v_cache
