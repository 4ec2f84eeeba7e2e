"""Device-side KV page copies for copy-on-write (parallel sampling forks, prefix-cache
tails).

One jitted call per step copies every (src, dst) page pair of that step in all layers,
K and V, donating the cache so the copy is in place. The pair arrays are padded with
(0, 0) (null page onto itself, harmless) to a power of two, which bounds compiles to
log2(max pairs) shapes.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from pagedjax.kernels.kv_write import copy_pages_in_kernel, writes_in_kernel

from .input_transfer import put

PAGE_AXIS = 1  # KV pools are [layers, pages, slots, kv_heads, head_dim]


def _copy_pages(kv_cache, src, dst):
    def copy(pool):
        pages = jax.numpy.take(pool, src, axis=PAGE_AXIS)
        index = (slice(None),) * PAGE_AXIS + (dst,)
        return pool.at[index].set(pages)
    return jax.tree.map(copy, kv_cache)


def _copy_pages_in_kernel(kv_cache, src, dst):
    # XLA CPU has no 16-bit scatter (it would widen the whole pool): the kernel copies.
    (k_cache, v_cache), tree = jax.tree.flatten(kv_cache)  # the pools, keys first
    return jax.tree.unflatten(tree, copy_pages_in_kernel(k_cache, v_cache, src, dst))


_copy_pages_donated = jax.jit(_copy_pages, donate_argnums=(0,))
_copy_pages_in_kernel_donated = jax.jit(_copy_pages_in_kernel, donate_argnums=(0,))


def _written_in_kernel(kv_cache) -> bool:
    # on CPU a pool is the native backend's or float32 (kv_pool.resolve_kv_dtype)
    pool = jax.tree.leaves(kv_cache)[0]
    return writes_in_kernel(pool, native=all(d.platform == "cpu" for d in pool.devices()))


def padded_pairs(pairs: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) int32 arrays padded with (0, 0) to the next power of two."""
    size = 1
    while size < len(pairs):
        size *= 2
    src = np.zeros(size, np.int32)
    dst = np.zeros(size, np.int32)
    for i, (s, d) in enumerate(pairs):
        src[i], dst[i] = s, d
    return src, dst


def copy_kv_blocks(kv_cache, pairs: Sequence[tuple[int, int]], sharding: Any = None):
    """Return `kv_cache` with page `dst` := page `src` for every pair (the input cache is
    donated). Destinations must be distinct; every source is read before any page is
    written, so a page may be a destination and a source at once. `sharding`:
    where the page numbers go (replicated over the pool's mesh; None: default device)."""
    if not pairs:
        return kv_cache
    src, dst = (put(pages, sharding) for pages in padded_pairs(pairs))
    copy = _copy_pages_in_kernel_donated if _written_in_kernel(kv_cache) else _copy_pages_donated
    return copy(kv_cache, src, dst)
