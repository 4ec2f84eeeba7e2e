"""KV page copies (copy-on-write): every pair lands, in all layers, K and V, and every
source is read before any page is written."""

import jax.numpy as jnp
import numpy as np

from pagedjax.kv_copy import copy_kv_blocks


def test_pairs_copy_old_contents_even_when_a_destination_is_also_a_source():
    pool = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)  # [L, P, slots]
    cache = {"k": jnp.asarray(pool), "v": jnp.asarray(-pool)}  # donated
    # page 2 := page 1, and page 1 := page 3 in the same call: page 2 gets page 1's old data
    out = copy_kv_blocks(cache, [(1, 2), (3, 1)])
    want = pool.copy()
    want[:, 2], want[:, 1] = pool[:, 1], pool[:, 3]
    np.testing.assert_array_equal(np.asarray(out["k"]), want)
    np.testing.assert_array_equal(np.asarray(out["v"]), -want)
