"""The jnp backend (kernels.jnp_attention) and the cache write against the dense oracle
(kernels.dense_oracle); the native backend's tests run the same STEPS through check_step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.kernels import paged_attention, write_kv
from pagedjax.kernels.dense_oracle import dense_attention


# (cached context length, new tokens this step) of each sequence in one step.
STEPS = {
    # Decodes, a fresh prefill and ONE continuing chunk.
    "one_chunk": [(9, 1), (0, 6), (5, 3), (1, 1), (12, 1)],
    # Two continuing chunks (5+3 and 12+2, mid-page), each over its own pages.
    "two_chunks": [(9, 1), (0, 6), (5, 3), (1, 1), (12, 2)],
    "decodes_only": [(9, 1), (3, 1), (16, 1), (1, 1)],
    # Contexts over several loop chunks of CONTEXT_CHUNK_TOKENS keys, lengths apart.
    "long_contexts": [(70, 1), (5, 1), (41, 3), (33, 1), (0, 4)],
    # Enough rows for attend_rows' tiers (MIN_TIER_ROWS): decodes of contexts 0-90 in a
    # shuffled order, which the tiers sort longest first and must put back.
    "many_decodes": [(int(ctx), 1) for ctx in np.random.default_rng(7).integers(0, 90, 41)],
    # The same rows next to two continuing chunks.
    "many_tokens": [(int(ctx), 1) for ctx in np.random.default_rng(8).integers(0, 90, 30)]
    + [(37, 3), (12, 2)],
    # Over IN_STEP_BLOCK tokens: in-step blocks that start mid-sequence, hold several
    # sequences, and a padded last block.
    "long_prefills": [(0, 150), (10, 100), (0, 20), (5, 1), (0, 40)],
    # A continuing chunk (tokens 130-329) read in query blocks that start at its first
    # token, the last one running past the chunk into other sequences' tokens.
    "chunk_over_blocks": [(0, 130), (70, 200), (3, 1), (0, 50)],
    # Prompts after prefix-cache hits: many chunks with context in one step, of 2 to 40
    # tokens (over CHUNK_QUERY_BLOCK), next to decodes and a fresh prompt.
    "prefix_hits": [(40, 5), (33, 40), (0, 7), (64, 2), (8, 1), (17, 33), (4, 3)],
}


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_mixed_prefill_and_decode_over_scattered_pages(num_heads, num_kv_heads, step):
    check_step(STEPS[step], num_heads, num_kv_heads)


@pytest.mark.parametrize("window,soft_cap", [(7, None), (None, 2.0), (20, 1.5)])
def test_sliding_window_and_soft_cap_over_chunked_context(window, soft_cap):
    check_step(STEPS["long_contexts"], 6, 2, window=window, soft_cap=soft_cap)
    check_step(STEPS["two_chunks"], 4, 4, window=window, soft_cap=soft_cap)
    check_step(STEPS["long_prefills"], 6, 2, window=window, soft_cap=soft_cap)
    check_step(STEPS["chunk_over_blocks"], 6, 2, window=window, soft_cap=soft_cap)


def check_step(seqs, num_heads, num_kv_heads, window=None, soft_cap=None,
               attention=paged_attention, tolerance=1e-5):
    """One step of `seqs` ((cached, new) per sequence) through `attention` (a backend's
    paged_attention) against the dense oracle (to the bit with `tolerance` 0), and the
    cache write landing exactly at the scheduled slots."""
    rng = np.random.default_rng(num_heads * 10 + num_kv_heads)
    S, D = 4, 8
    L, layer = 2, 1
    P = 1 + sum(-(-(ctx + new) // S) for ctx, new in seqs) + 4
    free_pages = list(rng.permutation(np.arange(1, P)))  # scattered, never the null page
    tables = []
    for ctx, new in seqs:
        tables.append([free_pages.pop() for _ in range(-(-(ctx + new) // S))])

    # Keys are stored transposed within a page: K [L, P, K, D, S], V [L, P, S, K, D].
    k_cache = rng.standard_normal((L, P, num_kv_heads, D, S)).astype(np.float32)
    v_cache = rng.standard_normal((L, P, S, num_kv_heads, D)).astype(np.float32)
    full_k, full_v = [], []  # every token's K/V per sequence, cached ones written now
    for (ctx, new), table in zip(seqs, tables):
        ks = rng.standard_normal((ctx + new, num_kv_heads, D)).astype(np.float32)
        vs = rng.standard_normal((ctx + new, num_kv_heads, D)).astype(np.float32)
        for pos in range(ctx):
            k_cache[layer, table[pos // S], :, :, pos % S] = ks[pos]
            v_cache[layer, table[pos // S], pos % S] = vs[pos]
        full_k.append(ks)
        full_v.append(vs)

    T = sum(new for _, new in seqs) + 3  # three padding tokens
    B = len(seqs) + 1  # one padded sequence
    M = max(-(-ctx // S) for ctx, _ in seqs) + 2  # table columns past the longest context
    q = rng.standard_normal((T, num_heads, D)).astype(np.float32)
    k_new = rng.standard_normal((T, num_kv_heads, D)).astype(np.float32)
    v_new = rng.standard_normal((T, num_kv_heads, D)).astype(np.float32)
    token_seq = np.full(T, -1, np.int32)
    positions = np.zeros(T, np.int32)
    slots = np.zeros(T, np.int32)
    block_tables = np.zeros((B, M), np.int32)
    context_lens = np.zeros(B, np.int32)
    offset = 0
    for i, ((ctx, new), table) in enumerate(zip(seqs, tables)):
        sl = slice(offset, offset + new)
        token_seq[sl] = i
        positions[sl] = np.arange(ctx, ctx + new)
        slots[sl] = [table[p // S] * S + p % S for p in range(ctx, ctx + new)]
        k_new[sl] = full_k[i][ctx:]
        v_new[sl] = full_v[i][ctx:]
        pages = -(-ctx // S)
        block_tables[i, :pages] = table[:pages]
        context_lens[i] = ctx
        offset += new

    scale = D ** -0.5
    k_after, v_after = write_kv(jnp.asarray(k_cache), jnp.asarray(v_cache), jnp.int32(layer),
                                jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(slots))
    out = np.asarray(attention(
        jnp.asarray(q), jnp.asarray(k_new), jnp.asarray(v_new), k_after, v_after,
        jnp.int32(layer), token_seq=jnp.asarray(token_seq), positions=jnp.asarray(positions),
        context_lens=jnp.asarray(context_lens), block_tables=jnp.asarray(block_tables),
        scale=scale, sliding_window=window, soft_cap=soft_cap))
    assert np.isfinite(out).all()

    offset = 0
    for i, (ctx, new) in enumerate(seqs):
        expected = dense_attention(q[offset:offset + new], full_k[i], full_v[i], scale,
                                   window, soft_cap)
        np.testing.assert_allclose(out[offset:offset + new], expected, rtol=tolerance,
                                   atol=tolerance)
        offset += new

    # The write landed at exactly the scheduled slots of the right layer, nowhere else
    # except the null page that padding tokens target.
    k_after, v_after = np.asarray(k_after), np.asarray(v_after)
    for i, ((ctx, new), table) in enumerate(zip(seqs, tables)):
        for pos in range(ctx + new):
            np.testing.assert_array_equal(k_after[layer, table[pos // S], :, :, pos % S],
                                          full_k[i][pos])
            np.testing.assert_array_equal(v_after[layer, table[pos // S], pos % S],
                                          full_v[i][pos])
    touched = {p for table in tables for p in table} | {0}
    untouched = [p for p in range(P) if p not in touched]
    for after, before in ((k_after, k_cache), (v_after, v_cache)):
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[layer][untouched], before[layer][untouched])


@pytest.mark.parametrize("tokens", [1, 2])
def test_write_kv_in_a_layer_loop_updates_the_pool_in_place(tokens):
    """A one-token step (a decode of one sequence in the 1-token bucket) writes its slot
    and copies no pool-sized array: XLA CPU once turned its one-index scatter into a
    select over the whole pool, a copy at every layer."""
    L, P, K, D, S = 3, 40, 2, 8, 4
    k_cache = jnp.zeros((L, P, K, D, S))
    v_cache = jnp.zeros((L, P, S, K, D))
    k = jnp.arange(tokens * K * D, dtype=jnp.float32).reshape(tokens, K, D) + 1
    slots = jnp.asarray([9 * S + 2, 0][:tokens], jnp.int32)  # page 9, offset 2; padding

    def layers(k_cache, v_cache, k, slots):
        def body(carry, layer):  # each layer reads its pages after the write, as attention
            k_cache, v_cache, total = carry
            k_cache, v_cache = write_kv(k_cache, v_cache, layer, k, -k, slots)
            total = total + k_cache[layer, 9].sum() + v_cache[layer, 9].sum()
            return (k_cache, v_cache, total), None
        return jax.lax.scan(body, (k_cache, v_cache, 0.0), jnp.arange(L))[0][:2]
    program = jax.jit(layers, donate_argnums=(0, 1))
    hlo = program.lower(k_cache, v_cache, k, slots).compile().as_text()
    # Every pool-shaped result of the program is a scatter fusion: no copy, and no loop
    # over the whole pool (XLA names a fusion after the ops it holds).
    pools = (f"[{L},{P},{K},{D},{S}]", f"[{L},{P},{S},{K},{D}]")
    pool_ops = [name.strip() for name, _, op in (line.partition(" = ") for line in
                                                 hlo.splitlines())
                if any(op.startswith(f"f32{pool}") for pool in pools)
                and any(f" {kind}(" in op for kind in ("copy", "fusion"))]
    assert pool_ops and all("scatter" in name for name in pool_ops), pool_ops
    k_after, v_after = (np.array(x) for x in program(k_cache, v_cache, k, slots))
    for layer in range(L):
        np.testing.assert_array_equal(k_after[layer, 9, :, :, 2], np.asarray(k[0]))
        np.testing.assert_array_equal(v_after[layer, 9, 2], -np.asarray(k[0]))
    k_after[:, 9, :, :, 2] = 0
    k_after[:, 0] = 0  # the null page takes padding's (and the one-token path's) write
    assert not k_after.any()
