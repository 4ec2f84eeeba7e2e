"""Reference paged attention in plain jnp: the test oracle and the CPU production path.

A step holds T ragged tokens from B sequences (decodes and prefill chunks mixed). Each
token attends to two key sets, merged in one softmax:

* the sequence's **cached context**: positions before this step's first token of that
  sequence, read from the paged cache through the sequence's block table;
* the **in-step tokens** of the same sequence at positions <= its own, taken straight
  from this step's freshly projected K/V (no cache read needed).

Splitting it so means a prefill of fresh prompts reads no pages at all, a decode token
reads exactly its own sequence's pages, and a continuing prefill chunk reads its pages once
for all of its tokens; no Python loop over sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def write_kv(
    k_cache: jax.Array,  # [L, K, P, S, D]
    v_cache: jax.Array,  # [L, K, P, S, D]
    layer: jax.Array,  # [] int32
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    slot_mapping: jax.Array,  # [T] flat slot = page * S + offset; padding -> null page 0
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's K/V into `layer` of the paged cache (in place under donation)."""
    page_size = k_cache.shape[3]
    pages = slot_mapping // page_size
    offsets = slot_mapping % page_size
    # Indexing [layer, :, pages, offsets] puts the advanced (token) axis first, so the
    # update is laid out [T, K, D] exactly like k and v.
    k_cache = k_cache.at[layer, :, pages, offsets].set(k.astype(k_cache.dtype),
                                                      mode="promise_in_bounds")
    v_cache = v_cache.at[layer, :, pages, offsets].set(v.astype(v_cache.dtype),
                                                      mode="promise_in_bounds")
    return k_cache, v_cache


def paged_attention(
    q: jax.Array,  # [T, H, D] (already scaled or not: `scale` is applied here)
    k_new: jax.Array,  # [T, K, D] this step's keys
    v_new: jax.Array,  # [T, K, D] this step's values
    k_cache: jax.Array,  # [L, K, P, S, D]
    v_cache: jax.Array,  # [L, K, P, S, D]
    layer: jax.Array,  # [] int32
    token_seq: jax.Array,  # [T] sequence index of each token; padding -> -1
    positions: jax.Array,  # [T] absolute position of each token
    context_lens: jax.Array,  # [B] cached tokens of each sequence before this step
    block_tables: jax.Array,  # [B, M] pages holding each sequence's cached context
    scale: float,
    sliding_window: int | None = None,  # keys at positions > (query position - window) only
    soft_cap: float | None = None,  # scores -> soft_cap * tanh(scores / soft_cap)
) -> jax.Array:  # [T, H, D]
    """Attention of ragged query tokens over their sequences' paged context + in-step tokens.

    The cached context is read per *sequence* whenever a step has at most one multi-token
    chunk with cached context (the usual case: decodes, fresh prefills and one continuing
    chunk): each decode reads its own pages, the one chunk's pages are read once for all
    its tokens. Otherwise every token gathers its sequence's pages itself (correct for
    any step, but it moves T x context bytes). `sliding_window` and `soft_cap` default off.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[1]
    group = num_heads // num_kv_heads
    num_seqs = block_tables.shape[0]
    qg = (q.astype(jnp.float32) * scale).reshape(num_tokens, num_kv_heads, group, head_dim)
    ctx = _ContextMasker(sliding_window, soft_cap)

    # In-step tokens of the same sequence, causal by absolute position.
    s_new = jnp.einsum("tkgd,ukd->tkgu", qg, k_new.astype(jnp.float32))
    same_seq = token_seq[:, None] == token_seq[None, :]
    causal = positions[None, :] <= positions[:, None]
    new_visible = same_seq & causal  # [T, T]; the diagonal is always visible
    if soft_cap is not None:
        s_new = soft_cap * jnp.tanh(s_new / soft_cap)
    if sliding_window is not None:
        new_visible &= positions[:, None] - positions[None, :] < sliding_window
    s_new = jnp.where(new_visible[:, None, None, :], s_new, NEG_INF)
    v_new = v_new.astype(jnp.float32)

    valid = token_seq >= 0
    seq = jnp.where(valid, token_seq, 0)
    query_lens = jax.ops.segment_sum(valid.astype(jnp.int32), seq, num_segments=num_seqs)
    chunks_with_context = (query_lens > 1) & (context_lens > 0)  # [B]
    token_is_single = valid & (query_lens[seq] == 1)  # [T] decodes and 1-token chunks

    def per_sequence():
        last_token = jax.ops.segment_max(jnp.where(valid, jnp.arange(num_tokens), 0), seq,
                                         num_segments=num_seqs)
        last_token = jnp.clip(last_token, 0, num_tokens - 1)  # empty (padded) sequences
        # Single-token rows: one query per sequence against that sequence's pages.
        k_seq, v_seq = _gather_pages(k_cache, v_cache, layer, block_tables)  # [B, N, K, D]
        s_seq = jnp.einsum("bkgd,bnkd->bkgn", qg[last_token], k_seq)
        s_seq = ctx.mask(s_seq, context_lens, positions[last_token])
        # The (at most one) multi-token chunk with context: its pages, read once.
        chunk = jnp.argmax(chunks_with_context)
        has_chunk = chunks_with_context[chunk]
        k_chunk, v_chunk = _gather_pages(k_cache, v_cache, layer, block_tables[chunk][None])
        s_chunk = jnp.einsum("tkgd,nkd->tkgn", qg, k_chunk[0])
        chunk_lens = jnp.where(has_chunk & (token_seq == chunk), context_lens[chunk], 0)
        s_chunk = ctx.mask(s_chunk, chunk_lens, positions)
        s_ctx = jnp.where(token_is_single[:, None, None, None], s_seq[seq], s_chunk)
        p_ctx, p_new = _softmax_split(s_ctx, s_new)
        out_seq = jnp.einsum("bkgn,bnkd->bkgd", p_ctx[last_token], v_seq)
        out_chunk = jnp.einsum("tkgn,nkd->tkgd", p_ctx, v_chunk[0])
        out_ctx = jnp.where(token_is_single[:, None, None, None], out_seq[seq], out_chunk)
        return out_ctx + jnp.einsum("tkgu,ukd->tkgd", p_new, v_new)

    def per_token():
        k_tok, v_tok = _gather_pages(k_cache, v_cache, layer, block_tables[seq])  # [T, N, K, D]
        s_ctx = jnp.einsum("tkgd,tnkd->tkgn", qg, k_tok)
        s_ctx = ctx.mask(s_ctx, jnp.where(valid, context_lens[seq], 0), positions)
        p_ctx, p_new = _softmax_split(s_ctx, s_new)
        out = jnp.einsum("tkgn,tnkd->tkgd", p_ctx, v_tok)
        return out + jnp.einsum("tkgu,ukd->tkgd", p_new, v_new)

    out = jax.lax.cond(jnp.sum(chunks_with_context) <= 1, per_sequence, per_token)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def _gather_pages(k_cache, v_cache, layer, tables):  # tables: [R, M] -> K, V [R, M*S, K, D]
    """One gather straight from the full cache (no per-layer slice copy) per table row."""
    rows, pages = tables.shape
    page_size, num_kv_heads, head_dim = k_cache.shape[3], k_cache.shape[1], k_cache.shape[4]

    def gather(cache):
        pages_kv = cache[layer, :, tables].astype(jnp.float32)  # [R, M, K, S, D]
        pages_kv = jnp.swapaxes(pages_kv, 2, 3)  # [R, M, S, K, D]
        return pages_kv.reshape(rows, pages * page_size, num_kv_heads, head_dim)

    return gather(k_cache), gather(v_cache)


def _softmax_split(s_ctx, s_new):  # [..., N], [..., T] -> probabilities of each part
    probs = jax.nn.softmax(jnp.concatenate([s_ctx, s_new], axis=-1), axis=-1)
    ctx_len = s_ctx.shape[-1]
    return probs[..., :ctx_len], probs[..., ctx_len:]


class _ContextMasker:
    """Soft-cap and visibility mask of cached-context scores [R, K, G, N]."""

    def __init__(self, sliding_window, soft_cap):
        self.sliding_window = sliding_window
        self.soft_cap = soft_cap

    def mask(self, scores, lens, query_positions):  # lens, query_positions: [R]
        if self.soft_cap is not None:
            scores = self.soft_cap * jnp.tanh(scores / self.soft_cap)
        key_positions = jnp.arange(scores.shape[-1])[None, :]
        visible = key_positions < lens[:, None]  # [R, N]
        if self.sliding_window is not None:
            visible &= query_positions[:, None] - key_positions < self.sliding_window
        return jnp.where(visible[:, None, None, :], scores, NEG_INF)
