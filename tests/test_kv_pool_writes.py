"""A bfloat16 KV pool on CPU: the in-place write and page-copy kernels against XLA's
float32 scatter, the attention kernel reading it bitwise as a float32 pool of the same
values, and a bfloat16 engine giving the same outputs with either pool."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import SamplingParams
from pagedjax import engine as engine_module
from pagedjax.kernels import native_attention, native_build
from pagedjax.kernels.kv_write import write_kv
from pagedjax.kv_copy import copy_kv_blocks
from pagedjax.step_input import KVCache
from tests.helpers.engines import make_llm

needs_compiler = pytest.mark.skipif(native_build.find_compiler() is None,
                                    reason="no C++ compiler on this machine")
L, P, K, D, S = 2, 5, 2, 8, 4  # layers, pages, KV heads, head dim, page size


def random_pools(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 pools [L, P, K, D, S] and [L, P, S, K, D] holding bfloat16 values."""
    rng = np.random.default_rng(seed)
    return tuple(np.asarray(jnp.asarray(rng.standard_normal(shape), jnp.bfloat16),
                            np.float32)
                 for shape in ((L, P, K, D, S), (L, P, S, K, D)))


@needs_compiler
def test_kernel_write_is_xla_scatter_of_the_same_values():
    """Tokens into slots of several pages (a key's [K, D] strided across its page), the
    rest of both pools untouched; as jitted with the pools donated, as the engine runs it."""
    k_pool, v_pool = random_pools(0)
    rng = np.random.default_rng(1)
    slots = jnp.asarray([5, 6, 0, 19, 8], jnp.int32)  # pages 1, 1, 0 (padding), 4, 2
    k, v = (jnp.asarray(rng.standard_normal((5, K, D)), jnp.bfloat16) for _ in range(2))
    write = jax.jit(write_kv, static_argnames="native", donate_argnums=(0, 1))
    got = write(jnp.asarray(k_pool, jnp.bfloat16), jnp.asarray(v_pool, jnp.bfloat16),
                jnp.int32(1), k, v, slots, native=True)
    want = write_kv(jnp.asarray(k_pool), jnp.asarray(v_pool), jnp.int32(1),
                    k.astype(jnp.float32), v.astype(jnp.float32), slots)
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w))


@needs_compiler
def test_kernel_write_rejects_a_slot_outside_the_pool():
    pools = [jnp.zeros(shape, jnp.bfloat16) for shape in ((L, P, K, D, S), (L, P, S, K, D))]
    kv = jnp.zeros((1, K, D), jnp.bfloat16)
    with pytest.raises(Exception, match="slot is outside the KV pool"):
        jax.block_until_ready(write_kv(*pools, jnp.int32(0), kv, kv,
                                       jnp.asarray([P * S], jnp.int32), native=True))


@needs_compiler
def test_kernel_page_copy_reads_every_source_first():
    k_pool, v_pool = random_pools(2)
    cache = KVCache(jnp.asarray(k_pool, jnp.bfloat16), jnp.asarray(v_pool, jnp.bfloat16))
    out = copy_kv_blocks(cache, [(1, 2), (3, 1)])  # page 2 gets page 1's old contents
    for pool, got in ((k_pool, out.k), (v_pool, out.v)):
        want = pool.copy()
        want[:, 2], want[:, 1] = pool[:, 1], pool[:, 3]
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)


@needs_compiler
def test_attention_reads_a_bfloat16_pool_as_the_float32_one():
    """Bitwise: the kernel widens each bfloat16 element exactly and adds as before."""
    pool_shape = (1, 6, 3, 64, 64)  # SmolLM2's K, D and the default 64-token pages
    rng = np.random.default_rng(3)
    k_pool = jnp.asarray(rng.standard_normal(pool_shape), jnp.bfloat16)
    v_pool = jnp.asarray(rng.standard_normal((1, 6, 64, 3, 64)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((3, 3, 3, 64)) * 0.125, jnp.float32)
    tables = jnp.asarray([[1, 2, 0], [3, 4, 5], [5, 0, 0]], jnp.int32)
    lens = jnp.asarray([70, 150, 1], jnp.int32)

    def rows(k_cache, v_cache):
        return native_attention.decode_rows(q, tables, lens, lens - 1, k_cache=k_cache,
                                            v_cache=v_cache, layer=jnp.int32(0),
                                            sliding_window=None, soft_cap=None)
    got = rows(k_pool, v_pool)
    want = rows(k_pool.astype(jnp.float32), v_pool.astype(jnp.float32))
    for g, w in zip(got, want):
        assert np.array_equal(np.asarray(g).view(np.uint32), np.asarray(w).view(np.uint32))


@needs_compiler
def test_bfloat16_engine_outputs_do_not_depend_on_the_pool_dtype(tiny_llama_dir,
                                                                 monkeypatch):
    """Greedy and seeded n=2 samples (forks: copy-on-write page copies) with logprobs,
    through chunked prefill, from the bfloat16 pool and from a float32 pool (the K/V are
    bfloat16 values either way): identical."""
    params = [SamplingParams(temperature=0, max_tokens=10, logprobs=0),
              SamplingParams(temperature=1.0, n=2, seed=3, max_tokens=10, logprobs=0)]
    prompts = [{"prompt_token_ids": list(range(5, 40))}, {"prompt_token_ids": [9, 8, 7]}]
    outputs = {}
    for pool in ("bfloat16", "float32"):
        if pool == "float32":
            monkeypatch.setattr(engine_module, "resolve_kv_dtype",
                                lambda dtype, platform, native=False: jnp.dtype(jnp.float32))
        llm = make_llm(tiny_llama_dir, dtype="bfloat16", max_num_batched_tokens=16)
        assert llm.engine.runner.kv_cache.k.dtype == np.dtype(pool)
        assert llm.engine.attention_backend == "native"
        outputs[pool] = [[(c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs,
                                                                      c.token_ids)])
                          for c in o.outputs]
                         for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs["bfloat16"] == outputs["float32"]
    assert len(outputs["bfloat16"][1]) == 2
