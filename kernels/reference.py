"""Reference paged attention in plain jnp: the test oracle and the CPU production path.

A step holds T ragged tokens from B sequences (decodes and prefill chunks mixed). Each
token attends to two key sets, merged as two parts of one softmax:

* the sequence's **cached context**: positions before this step's first token of that
  sequence, read from the paged cache through the sequence's block table;
* the **in-step tokens** of the same sequence at positions <= its own, taken straight
  from this step's freshly projected K/V (no cache read needed).

Splitting it so means a prefill of fresh prompts reads no pages at all, a decode token
reads exactly its own sequence's pages, and a continuing prefill chunk reads its pages once
for all of its tokens; no Python loop over sequences.

CPU performance shapes the code (decode steps of SmolLM2 with 128 sequences, measured):
every operand is KV-head first ([K, rows, ..., D]) so each einsum is one batched GEMM
with leading batch axes (a trailing batch axis, as in [B, N, K, D], made XLA CPU transpose
the whole context per call: 30 ms against 8 ms per layer); context is read one chunk of
pages at a time up to the step's longest context (_PagedContext), never materialised
whole; and a step of single-token sequences skips the [T, T] in-step scores.
"""

from __future__ import annotations

from typing import NamedTuple

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


class _Partial(NamedTuple):
    """Softmax over one key set, not yet normalised: merging two gives the softmax over
    their union (the flash-attention rescaling)."""

    max: jax.Array  # [..., G] largest visible score (NEG_INF when nothing is visible)
    total: jax.Array  # [..., G] sum of exp(score - max) over visible keys
    out: jax.Array  # [..., G, D] sum of exp(score - max) * value

    @staticmethod
    def of(scores, visible, weigh_values):  # scores [..., N], visible broadcasts to it
        top = jnp.max(jnp.where(visible, scores, NEG_INF), axis=-1)
        weights = jnp.where(visible, jnp.exp(scores - top[..., None]), 0.0)
        return _Partial(top, jnp.sum(weights, axis=-1), weigh_values(weights))

    @staticmethod
    def empty(out_shape):  # out_shape [..., G, D]: a key set with nothing visible
        rows = out_shape[:-1]
        return _Partial(jnp.full(rows, NEG_INF, jnp.float32), jnp.zeros(rows, jnp.float32),
                        jnp.zeros(out_shape, jnp.float32))

    def select(self, take_self, other: _Partial) -> _Partial:
        """Row-wise choice: self where take_self ([K, T, 1] bool) is set, else other."""
        return _Partial(jnp.where(take_self, self.max, other.max),
                        jnp.where(take_self, self.total, other.total),
                        jnp.where(take_self[..., None], self.out, other.out))

    def combine(self, other: _Partial) -> _Partial:
        """The unnormalised softmax over both key sets (a part that sees nothing adds 0
        as long as the other part, or a later one, sees a key)."""
        top = jnp.maximum(self.max, other.max)
        a, b = jnp.exp(self.max - top), jnp.exp(other.max - top)
        return _Partial(top, a * self.total + b * other.total,
                        a[..., None] * self.out + b[..., None] * other.out)

    def merge(self, other: _Partial) -> jax.Array:
        """Normalised output [..., G, D]; `other` must see at least one key per row."""
        both = self.combine(other)
        return both.out / both.total[..., None]


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
    its tokens, and not at all in a step without such a chunk. Otherwise every token
    gathers its sequence's pages itself (correct for any step, but it moves T x context
    bytes). Context is read in chunks of pages up to the longest context of the step, so
    the width M of the block tables costs nothing. `sliding_window` and `soft_cap` default
    off.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[1]
    group = num_heads // num_kv_heads
    num_seqs = block_tables.shape[0]
    qg = jnp.swapaxes((q.astype(jnp.float32) * scale).reshape(
        num_tokens, num_kv_heads, group, head_dim), 0, 1)  # [K, T, G, D]
    cap = _soft_cap(soft_cap)

    valid = token_seq >= 0
    seq = jnp.where(valid, token_seq, 0)
    query_lens = jax.ops.segment_sum(valid.astype(jnp.int32), seq, num_segments=num_seqs)
    chunks_with_context = (query_lens > 1) & (context_lens > 0)  # [B]
    token_is_single = valid & (query_lens[seq] == 1)  # [T] decodes and 1-token chunks
    k_step, v_step = (jnp.swapaxes(x.astype(jnp.float32), 0, 1) for x in (k_new, v_new))

    # In-step tokens of the same sequence, causal by absolute position. The diagonal is
    # always visible, so this part gives every row a finite maximum to merge against.
    def among_step_tokens():
        visible = (token_seq[:, None] == token_seq[None, :]) & (
            positions[None, :] <= positions[:, None])  # [T, T]
        if sliding_window is not None:
            visible &= positions[:, None] - positions[None, :] < sliding_window
        return _Partial.of(cap(jnp.einsum("ktgd,kud->ktgu", qg, k_step)),
                           visible[None, :, None, :],
                           lambda w: jnp.einsum("ktgu,kud->ktgd", w, v_step))

    def own_token_only():  # one token per sequence: the same numbers, without [T, T] scores
        score = cap(jnp.einsum("ktgd,ktd->ktg", qg, k_step))
        return _Partial(score, jnp.ones_like(score), jnp.broadcast_to(v_step[:, :, None],
                                                                      qg.shape))

    in_step = jax.lax.cond(jnp.all(token_is_single | ~valid), own_token_only,
                           among_step_tokens)
    pages = _PagedContext(k_cache, v_cache, layer, cap, sliding_window)

    def per_sequence():
        # Single-token rows: each sequence's last query against that sequence's pages.
        last_token = jax.ops.segment_max(jnp.where(valid, jnp.arange(num_tokens), 0), seq,
                                         num_segments=num_seqs)
        last_token = jnp.clip(last_token, 0, num_tokens - 1)  # empty (padded) sequences
        decode = pages.attend(qg[:, last_token], block_tables, context_lens[:, None],
                              positions[last_token][:, None])  # [K, B, G]
        decode = _Partial(*(x[:, seq] for x in decode))  # back to token rows [K, T, G]

        def chunk_context():  # the (at most one) multi-token chunk with context: [K, T, G]
            chunk = jnp.argmax(chunks_with_context)
            lens = jnp.where(token_seq == chunk, context_lens[chunk], 0)  # [T]
            # All T tokens' query heads as the rows of one table row.
            part = pages.attend(qg.reshape(num_kv_heads, 1, num_tokens * group, head_dim),
                                block_tables[chunk][None], jnp.repeat(lens, group)[None],
                                jnp.repeat(positions, group)[None])
            return _Partial(*(x.reshape(num_kv_heads, num_tokens, group, *x.shape[3:])
                              for x in part))

        # A step without such a chunk (every decode-only step) never reads its pages.
        chunk = jax.lax.cond(jnp.any(chunks_with_context), chunk_context,
                             lambda: _Partial.empty(qg.shape))
        return decode.select(token_is_single[None, :, None], chunk)

    def per_token():
        lens = jnp.where(valid, context_lens[seq], 0)
        return pages.attend(qg, block_tables[seq], lens[:, None], positions[:, None])

    context = jax.lax.cond(jnp.sum(chunks_with_context) <= 1, per_sequence, per_token)
    out = context.merge(in_step)  # [K, T, G, D]
    return jnp.swapaxes(out, 0, 1).reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


CONTEXT_CHUNK_TOKENS = 16  # keys per loop step; 16 beat 64 by 5-10% per decode step


class _PagedContext:
    """Attention of query rows over paged context, one chunk of pages at a time.

    Gathering a whole context at once materialises [K, R, N, D] K and V, then reads them
    twice: on XLA CPU that is memory traffic (and fresh buffer pages) that dominates a
    decode step. A loop over chunks of CONTEXT_CHUNK_TOKENS keys with an online softmax
    reads every page once while its K/V are still in cache, and stops at the step's
    longest context instead of the table width.
    """

    def __init__(self, k_cache, v_cache, layer, cap, sliding_window):
        self.k_cache, self.v_cache, self.layer = k_cache, v_cache, layer
        self.cap, self.sliding_window = cap, sliding_window

    def attend(self, q, tables, lens, query_positions) -> _Partial:
        """q [K, R, Q, D] (R table rows of Q query rows each), tables [R, M]; keys at
        positions < lens ([R, Q] or [R, 1]) are visible (and within the sliding window of
        query_positions, same shape). Returns the context part [K, R, Q]."""
        page_size = self.k_cache.shape[3]
        chunk_pages = max(1, CONTEXT_CHUNK_TOKENS // page_size)
        width = -(-tables.shape[1] // chunk_pages) * chunk_pages
        tables = jnp.pad(tables, ((0, 0), (0, width - tables.shape[1])))
        chunk_keys = chunk_pages * page_size
        num_chunks = (jnp.max(lens) + chunk_keys - 1) // chunk_keys

        def step(i, acc: _Partial) -> _Partial:
            cols = jax.lax.dynamic_slice_in_dim(tables, i * chunk_pages, chunk_pages, axis=1)
            k = _gather_context(self.k_cache, self.layer, cols)  # [K, R, C, D]
            v = _gather_context(self.v_cache, self.layer, cols)
            keys = i * chunk_keys + jnp.arange(chunk_keys)  # [C]
            seen = keys < lens[..., None]  # [R, Q or 1, C]
            if self.sliding_window is not None:
                seen &= query_positions[..., None] - keys < self.sliding_window
            part = _Partial.of(self.cap(jnp.einsum("krqd,krnd->krqn", q, k)), seen[None],
                               lambda w: jnp.einsum("krqn,krnd->krqd", w, v))
            return acc.combine(part)

        return jax.lax.fori_loop(0, num_chunks, step, _Partial.empty(q.shape))


def _gather_context(cache, layer, tables):  # [L, K, P, S, D], [R, M] -> [K, R, M*S, D]
    """Pages of each table row for every KV head, gathered straight from the full cache
    (flat page rows: no per-layer slice copy) into float32."""
    num_layers, num_kv_heads, num_pages, page_size, head_dim = cache.shape
    rows, width = tables.shape
    flat = cache.reshape(num_layers * num_kv_heads * num_pages, page_size, head_dim)
    first_row = (layer * num_kv_heads + jnp.arange(num_kv_heads)) * num_pages  # [K]
    index = first_row[:, None, None] + tables[None]  # [K, R, M]
    pages = flat.at[index].get(mode="promise_in_bounds")  # [K, R, M, S, D]
    return pages.reshape(num_kv_heads, rows, width * page_size, head_dim).astype(jnp.float32)


def _soft_cap(cap: float | None):
    """scores -> cap * tanh(scores / cap), or the identity when cap is None."""
    if cap is None:
        return lambda scores: scores
    return lambda scores: cap * jnp.tanh(scores / cap)
