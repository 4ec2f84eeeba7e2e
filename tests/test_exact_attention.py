"""The exact numerics (kernels.exact_attention, models.exact_numerics): attention as the
float64 oracle rounded once, to the bit, whichever program computes it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.kernels import resolve_attention_backend
from pagedjax.kernels.dense_oracle import dense_attention as oracle
from pagedjax.kernels.exact_attention import dense_attention, paged_attention
from pagedjax.models import exact_numerics
from pagedjax.models.layers import apply_rope, rms_norm
from tests.test_jnp_attention import STEPS, check_step


# Decodes over many pages, chunks after prefix hits and over query blocks, mixed rows.
@pytest.mark.parametrize("step", ["long_contexts", "prefix_hits", "chunk_over_blocks",
                                  "many_tokens"])
def test_paged_steps_equal_the_float64_oracle_to_the_bit(step):
    check_step(STEPS[step], 6, 2, attention=paged_attention, tolerance=0)
    check_step(STEPS[step], 4, 4, window=7, soft_cap=2.0, attention=paged_attention,
               tolerance=0)


def test_dense_core_equals_the_oracle_and_has_a_gradient():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((9, 6, 8)).astype(np.float32)
    k, v = (rng.standard_normal((9, 2, 8)).astype(np.float32) for _ in range(2))
    causal = jnp.tril(jnp.ones((9, 9), bool))
    out = jax.jit(lambda q: dense_attention(q, k, v, causal, 0.3, soft_cap=2.0))(q)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, oracle(q, k, v, 0.3, soft_cap=2.0))
    grad = jax.grad(lambda q: jnp.sum(dense_attention(q, k, v, causal, 0.3) ** 2))(q)
    reference = jax.grad(lambda q: jnp.sum(jnp.asarray(
        jax.nn.softmax(jnp.where(causal[None], jnp.einsum("thd,shd->hts", q * 0.3,
                                                          jnp.repeat(k, 3, 1)), -jnp.inf),
                       axis=-1) @ jnp.repeat(v, 3, 1).transpose(1, 0, 2)) ** 2))(q)
    np.testing.assert_allclose(grad, reference, rtol=1e-4, atol=1e-5)


def test_norm_and_rope_round_once_and_stay_close_to_float32():
    """Each element is float64's value rounded once (so no row count or fusion changes
    it), within float32 rounding of the plain float32 functions."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((5, 3, 16)) * 4).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
    normed = exact_numerics.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6)
    np.testing.assert_array_equal(normed, expected.astype(np.float32))
    np.testing.assert_allclose(normed, rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6),
                               rtol=1e-5, atol=1e-5)
    angles = rng.uniform(-3, 3, (5, 16)).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    rotated = np.concatenate([-x64[..., 8:], x64[..., :8]], axis=-1)
    expected = x64 * cos[:, None] + rotated * sin[:, None]
    roped = exact_numerics.apply_rope(jnp.asarray(x), jnp.asarray(cos), jnp.asarray(sin))
    np.testing.assert_array_equal(roped, expected.astype(np.float32))
    np.testing.assert_allclose(roped, apply_rope(jnp.asarray(x), cos, sin), atol=1e-5)


def test_exact_backend_is_never_swapped_and_needs_float64():
    assert resolve_attention_backend("exact", "cpu", head_dim=24, block_size=8,
                                     dtype=jnp.bfloat16, group=3) == "exact"
    assert resolve_attention_backend("exact", "gpu") == "exact"
    with pytest.raises(ValueError, match="float64"):
        resolve_attention_backend("exact", "tpu")
