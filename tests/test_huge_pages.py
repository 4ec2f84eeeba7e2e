"""Huge pages for a fresh KV pool: the advice changes no byte of the pool or of arrays
allocated around it."""

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.huge_pages import HUGE_PAGE_BYTES, back_zeros_with_huge_pages


def test_pool_stays_zero_and_neighbours_keep_their_values():
    before = jnp.full((HUGE_PAGE_BYTES // 4 + 3,), 7.0, jnp.float32)
    zeros = jnp.zeros((3 * HUGE_PAGE_BYTES // 4 + 5,), jnp.float32)
    after = jnp.full((HUGE_PAGE_BYTES // 4 + 3,), 9.0, jnp.float32)
    back_zeros_with_huge_pages(zeros)
    assert not np.asarray(zeros).any()
    assert (np.asarray(before) == 7.0).all() and (np.asarray(after) == 9.0).all()
    written = jax.jit(lambda x: x.at[::1000].set(1.0), donate_argnums=0)(zeros)
    got = np.asarray(written)
    assert got[::1000].sum() == got.sum() == len(got[::1000])
