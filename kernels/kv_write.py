"""Writing a step's K/V into the paged cache, before attention, whichever backend runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv(
    k_cache: jax.Array,  # [L, P, K, D, S] (keys transposed within a page)
    v_cache: jax.Array,  # [L, P, S, K, D]
    layer: jax.Array,  # [] int32
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    slot_mapping: jax.Array,  # [T] flat slot = page * S + offset; padding -> null page 0
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's K/V into `layer` of the paged cache (in place under donation)."""
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
