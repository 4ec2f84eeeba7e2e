"""The Pallas ragged paged-attention kernel (interpret mode on CPU) and the TPU adapter
against the dense oracle."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.kernels import resolve_attention_backend, write_kv
from pagedjax.kernels.backend import get_paged_attention
from pagedjax.kernels.dense_oracle import dense_paged_attention
from pagedjax.kernels.pallas_attention import _dim_chunks, paged_attention as pallas_attention

POISON = 1e4  # unused pages and the null page: any masking error shows up as a huge error


def make_case(seqs, *, num_heads, num_kv_heads, head_dim, page_size, num_pad_tokens=2,
              num_pad_seqs=1, dtype=np.float32, seed=0, num_layers=2, layer=1):
    """Random step: `seqs` = [(cached context, new tokens)], pages scattered over the pool,
    K/V of the new tokens already written (as the model does before attention)."""
    rng = np.random.default_rng(seed)
    pages_needed = sum(-(-(c + n) // page_size) for c, n in seqs)
    num_pages = pages_needed + 4
    free = list(rng.permutation(np.arange(1, num_pages)))
    tables = [[free.pop() for _ in range(-(-(c + n) // page_size))] for c, n in seqs]
    k_cache = np.full((num_layers, num_pages, num_kv_heads, head_dim, page_size), POISON,
                      np.float32)  # keys transposed within a page
    v_cache = np.full((num_layers, num_pages, page_size, num_kv_heads, head_dim), POISON,
                      np.float32)
    T = sum(n for _, n in seqs) + num_pad_tokens
    B = len(seqs) + num_pad_seqs
    M = max(1, max(-(-c // page_size) for c, _ in seqs))
    q = rng.standard_normal((T, num_heads, head_dim)).astype(np.float32)
    k_new = rng.standard_normal((T, num_kv_heads, head_dim)).astype(np.float32)
    v_new = rng.standard_normal((T, num_kv_heads, head_dim)).astype(np.float32)
    token_seq = np.full(T, -1, np.int32)
    positions = np.zeros(T, np.int32)
    slots = np.zeros(T, np.int32)  # padding tokens write to the null page
    block_tables = np.zeros((B, M), np.int32)  # padded sequences point at the null page
    context_lens = np.zeros(B, np.int32)
    offset = 0
    for i, ((ctx, new), table) in enumerate(zip(seqs, tables)):
        for pos in range(ctx):
            k_cache[layer, table[pos // page_size], :, :, pos % page_size] = (
                rng.standard_normal((num_kv_heads, head_dim)))
            v_cache[layer, table[pos // page_size], pos % page_size] = (
                rng.standard_normal((num_kv_heads, head_dim)))
        sl = slice(offset, offset + new)
        token_seq[sl] = i
        positions[sl] = np.arange(ctx, ctx + new)
        slots[sl] = [table[p // page_size] * page_size + p % page_size
                     for p in range(ctx, ctx + new)]
        pages = -(-ctx // page_size)
        block_tables[i, :pages] = table[:pages]
        context_lens[i] = ctx
        offset += new
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    k_cache, v_cache = write_kv(cast(k_cache), cast(v_cache), jnp.int32(layer), cast(k_new),
                                cast(v_new), jnp.asarray(slots))
    args = (cast(q), cast(k_new), cast(v_new), k_cache, v_cache, jnp.int32(layer))
    kwargs = dict(token_seq=jnp.asarray(token_seq), positions=jnp.asarray(positions),
                  context_lens=jnp.asarray(context_lens),
                  block_tables=jnp.asarray(block_tables), scale=head_dim ** -0.5)
    return args, kwargs, token_seq >= 0, slots


def _jit(fn, **kwargs):  # jitted, the array keyword arguments traced too
    static = {k: v for k, v in kwargs.items() if not isinstance(v, jax.Array)}
    traced = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
    run = jax.jit(lambda args, traced: fn(*args, **traced, **static))
    return lambda *args: run(args, traced)


def check(args, kwargs, real, tol, **options):
    extra = {k: options.pop(k) for k in ("sliding_window", "soft_cap") if k in options}
    want = dense_paged_attention(*args, **kwargs, **extra)
    got = _jit(pallas_attention, **kwargs, **extra, interpret=True, **options)(*args)
    assert got.shape == args[0].shape and got.dtype == args[0].dtype
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all()
    assert np.abs(want[real]).max() > 0.05  # a real signal, not zeros
    np.testing.assert_allclose(got[real], want[real], atol=tol, rtol=tol)


# A decode, a fresh prefill, a continuing chunk, a decode at length 1 (context 0 + 1 token),
# a context ending mid-page and a one-token context.
MIXED = [(9, 1), (0, 6), (5, 3), (0, 1), (13, 2), (1, 1)]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2), (8, 2), (8, 1)])
def test_mixed_prefill_and_decode_gqa(num_heads, num_kv_heads):
    args, kwargs, real, _ = make_case(MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                      head_dim=8, page_size=4, seed=num_heads)
    check(args, kwargs, real, 1e-5)


@pytest.mark.parametrize("page_size", [4, 8, 16])
def test_block_sizes(page_size):
    seqs = [(2 * page_size + 3, 1), (page_size - 1, 4), (0, 3), (page_size, 2)]
    args, kwargs, real, _ = make_case(seqs, num_heads=4, num_kv_heads=2, head_dim=8,
                                      page_size=page_size, seed=page_size)
    check(args, kwargs, real, 1e-5)


def test_decode_batch_many_sequences_per_query_block():
    seqs = [(c, 1) for c in (1, 7, 4, 12, 3, 9, 16, 5)]
    args, kwargs, real, _ = make_case(seqs, num_heads=4, num_kv_heads=1, head_dim=8,
                                      page_size=4, num_pad_tokens=0, num_pad_seqs=0)
    check(args, kwargs, real, 1e-5)  # 4 decodes share each 16-row query block


def test_small_query_blocks_split_a_prefill():
    args, kwargs, real, _ = make_case([(6, 9), (3, 5)], num_heads=2, num_kv_heads=1,
                                      head_dim=8, page_size=4)
    check(args, kwargs, real, 1e-5, block_tokens=4)


@pytest.mark.parametrize("head_dim", [96, 6])
def test_head_dims_split_into_power_of_two_chunks(head_dim):
    assert _dim_chunks(96) == ((0, 64), (64, 32)) and _dim_chunks(128) == ((0, 128),)
    args, kwargs, real, _ = make_case([(5, 1), (0, 3)], num_heads=2, num_kv_heads=1,
                                      head_dim=head_dim, page_size=4)
    check(args, kwargs, real, 1e-5)


def test_bfloat16_accumulates_in_float32():
    args, kwargs, real, _ = make_case(MIXED, num_heads=4, num_kv_heads=2, head_dim=16,
                                      page_size=4, dtype=jnp.bfloat16)
    check(args, kwargs, real, 2e-2)


@pytest.mark.parametrize("options", [dict(sliding_window=3), dict(soft_cap=2.0),
                                     dict(sliding_window=5, soft_cap=1.5)])
def test_sliding_window_and_soft_cap(options):
    args, kwargs, real, _ = make_case(MIXED, num_heads=4, num_kv_heads=2, head_dim=8,
                                      page_size=4, seed=7)
    base = dense_paged_attention(*args, **kwargs)
    changed = dense_paged_attention(*args, **kwargs, **options)
    assert np.abs(base[real] - changed[real]).max() > 1e-3  # the option does something
    check(args, kwargs, real, 1e-5, **options)  # skips whole pages


def test_tpu_adapter_layout_with_the_ops_jnp_reference():
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
        ref_ragged_paged_attention)

    from pagedjax.kernels.tpu_attention import paged_attention as tpu_attention
    args, kwargs, real, slots = make_case([(5, 1), (0, 3), (6, 2)], num_heads=6,
                                          num_kv_heads=2, head_dim=8, page_size=4)
    want = dense_paged_attention(*args, **kwargs)
    got = np.asarray(tpu_attention(*args, **kwargs, slot_mapping=jnp.asarray(slots),
                                   op=ref_ragged_paged_attention))
    n = int(real.sum())  # the op's jnp reference returns the real tokens only
    np.testing.assert_allclose(got[:n], want[:n], atol=1e-5, rtol=1e-5)


def test_backend_resolution():
    assert resolve_attention_backend("auto", "cpu") == "native"
    assert resolve_attention_backend("auto", "gpu", head_dim=64, block_size=16,
                                     dtype=jnp.bfloat16) == "pallas"
    assert resolve_attention_backend("pallas", "cpu", head_dim=8, block_size=4,
                                     dtype=jnp.float32) == "pallas"
    assert resolve_attention_backend("reference", "gpu") == "reference"
    with pytest.warns(UserWarning, match="head_dim 72"):
        assert resolve_attention_backend("auto", "gpu", head_dim=72, block_size=16,
                                         dtype=jnp.bfloat16) == "reference"
    # One page is one key tile on GPU: a power of two from 16 (Triton's smallest dot) up.
    for block_size in (12, 8, 256):
        with pytest.warns(UserWarning, match=f"block_size {block_size}"):
            assert resolve_attention_backend("pallas", "gpu", head_dim=64,
                                             block_size=block_size,
                                             dtype=jnp.bfloat16) == "reference"
    assert resolve_attention_backend("auto", "gpu", head_dim=64, block_size=128,
                                     dtype=jnp.bfloat16) == "pallas"
    with pytest.warns(UserWarning, match="head_dim 64"):
        assert resolve_attention_backend("auto", "tpu", head_dim=64, block_size=16,
                                         dtype=jnp.bfloat16) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_attention_backend("auto", "tpu", head_dim=128, block_size=16,
                                         dtype=jnp.bfloat16) == "pallas"
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_attention_backend("magic", "cpu")
    assert get_paged_attention("pallas") is not get_paged_attention("reference")


def test_kernel_benchmark_runs_tiny_on_cpu(capsys):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "pallas_kernel.py"
    spec = importlib.util.spec_from_file_location("benchmark_pallas_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--iters", "1", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and out.count(" ok") == len(module.TINY_BUCKETS)


@pytest.mark.parametrize("shape", [
    dict(T=256, H=32, K=8, D=128, S=16, B=256, M=64, dtype=jnp.bfloat16),  # decode bucket
    dict(T=512, H=9, K=3, D=64, S=16, B=4, M=32, dtype=jnp.float32),  # prefill, GQA 3
    dict(T=64, H=12, K=4, D=96, S=32, B=8, M=8, dtype=jnp.bfloat16,
         sliding_window=128, soft_cap=30.0),  # head dim 64 + 32 chunks
])
def test_lowers_to_triton_for_cuda_without_a_gpu(shape):
    """The GPU path's Pallas -> Triton lowering runs here (cross-platform export); only
    Triton's own compile to PTX, on the device, is left untested."""
    from jax import export
    T, H, K, D, S, B, M, dtype = (shape.pop(k) for k in "T H K D S B M dtype".split())
    sds = jax.ShapeDtypeStruct
    i32 = jnp.int32
    specs = (sds((T, H, D), dtype), sds((T, K, D), dtype), sds((T, K, D), dtype),
             sds((2, 1000, K, D, S), dtype), sds((2, 1000, S, K, D), dtype), sds((), i32),
             sds((T,), i32), sds((T,), i32), sds((B,), i32), sds((B, M), i32))
    fn = jax.jit(lambda *a: pallas_attention(*a, D ** -0.5, interpret=False, **shape))
    exported = export.export(fn, platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*specs)
    assert "xla.gpu.triton" in exported.mlir_module()
