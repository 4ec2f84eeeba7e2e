"""The dense attention oracle (kernels.dense_oracle) on cases checkable by hand, and its
paged-cache gather against the true K/V of whole steps."""

import numpy as np
import pytest

from pagedjax.kernels.dense_oracle import dense_attention, dense_paged_attention
from tests.test_jnp_attention import STEPS, check_step


def random_qkv(n, num_keys, num_heads=6, num_kv_heads=2, head_dim=4, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, num_heads, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((num_keys, num_kv_heads, head_dim)).astype(np.float32)
            for _ in range(2))
    return q, k, v


def test_one_key_returns_its_value_for_every_head_of_its_group():
    q, k, v = random_qkv(1, 1)
    out = dense_attention(q, k, v, scale=0.5)
    np.testing.assert_allclose(out[0], np.repeat(v[0], 3, axis=0), rtol=1e-6)


def test_equal_scores_average_the_causal_prefix():
    q, k, v = random_qkv(3, 5)
    out = dense_attention(np.zeros_like(q), k, v, scale=1.0, soft_cap=2.0)
    for t, last in enumerate(range(2, 5)):  # query t sits at position last
        np.testing.assert_allclose(out[t, 4], v[:last + 1, 1].mean(axis=0), rtol=1e-5)
    windowed = dense_attention(np.zeros_like(q), k, v, scale=1.0, sliding_window=2)
    np.testing.assert_allclose(windowed[2, 0], v[3:5, 0].mean(axis=0), rtol=1e-5)


def test_window_of_one_sees_only_the_query_itself():
    q, k, v = random_qkv(4, 6)
    out = dense_attention(q, k, v, scale=1.0, sliding_window=1)
    np.testing.assert_allclose(out, np.repeat(v[2:], 3, axis=1), rtol=1e-6)


def test_soft_cap_bounds_the_scores():
    q, k, v = random_qkv(1, 2)
    k[1] = 0  # score 0 for the second key; the first one's is huge without the cap
    q[0, :3] = 100 * k[0, 0]
    capped = dense_attention(q, k, v, scale=1.0, soft_cap=1.0)
    weight = np.e / (np.e + 1)  # capped scores tanh(huge) = 1 and 0
    np.testing.assert_allclose(capped[0, 0], weight * v[0, 0] + (1 - weight) * v[1, 0],
                               rtol=1e-5)
    uncapped = dense_attention(q, k, v, scale=1.0)
    np.testing.assert_allclose(uncapped[0, 0], v[0, 0], rtol=1e-5)


@pytest.mark.parametrize("step", sorted(STEPS))
def test_paged_gather_matches_the_true_kv(step):
    check_step(STEPS[step], 6, 2, attention=dense_paged_attention)
    check_step(STEPS[step], 4, 4, window=7, soft_cap=2.0, attention=dense_paged_attention)
