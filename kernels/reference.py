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
a page of one layer is one contiguous read of all KV heads, V as [S, K*D] and K stored
transposed as [K*D, S], so both products of a decode row are plain [M, K] x [K, N]
GEMMs (keys in [S, K*D] order needed a transposed operand: the context read of a
64-token page ran ~1.5x slower); a decode row's scores are per-head GEMMs over the
head-major keys, its values one block-diagonal GEMM over all heads
(_PagedContext.attend_rows); einsums keep their batch axes leading (a trailing batch
axis made XLA CPU transpose the whole context per call); context is read one chunk of
pages at a time, never materialised whole, decode rows sorted by context length so
that short rows stop early; in-step scores are computed only for 128-token blocks that
can share a sequence, and a step of single-token sequences skips them.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30


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
    # Both index one [K, D] slot per token (the update is [T, K, D]); a key's slot is
    # strided across its page because keys are stored transposed.
    k_cache = k_cache.at[layer, pages, :, :, offsets].set(k.astype(k_cache.dtype),
                                                         mode="promise_in_bounds")
    v_cache = v_cache.at[layer, pages, offsets].set(v.astype(v_cache.dtype),
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
    k_cache: jax.Array,  # [L, P, K, D, S] (keys transposed within a page)
    v_cache: jax.Array,  # [L, P, S, K, D]
    layer: jax.Array,  # [] int32
    token_seq: jax.Array,  # [T] sequence of each token (a sequence's tokens contiguous, in
    #                        position order, as the scheduler lays them out); padding -1
    positions: jax.Array,  # [T] absolute position of each token
    context_lens: jax.Array,  # [B] cached tokens of each sequence before this step
    block_tables: jax.Array,  # [B, M] pages holding each sequence's cached context
    scale: float,
    sliding_window: int | None = None,  # keys at positions > (query position - window) only
    soft_cap: float | None = None,  # scores -> soft_cap * tanh(scores / soft_cap)
    row_attention: Callable | None = None,
) -> jax.Array:  # [T, H, D]
    """Attention of ragged query tokens over their sequences' paged context + in-step tokens.

    The cached context is read per *sequence* whenever a step has at most one multi-token
    chunk with cached context (the usual case: decodes, fresh prefills and one continuing
    chunk): each decode reads its own pages, the one chunk's pages are read once for all
    its tokens, and not at all in a step without such a chunk. Otherwise every token
    gathers its sequence's pages itself (correct for any step, but it moves T x context
    bytes). Context is read page by page up to the longest context among the rows read
    together, so the width M of the block tables costs nothing. `sliding_window` and
    `soft_cap` default off.

    `row_attention` replaces the jnp read of one-query-token rows (the native backend's
    C++ kernel): called as row_attention(q, tables, lens, query_positions, k_cache=,
    v_cache=, layer=, sliding_window=, soft_cap=), it returns what
    _PagedContext.attend_rows does.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[1]
    group = num_heads // num_kv_heads
    num_seqs = block_tables.shape[0]
    q_tokens = (q.astype(jnp.float32) * scale).reshape(
        num_tokens, num_kv_heads, group, head_dim)  # [T, K, G, D]
    qg = jnp.swapaxes(q_tokens, 0, 1)  # [K, T, G, D]
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
        return _in_step_blocks(qg, k_step, v_step, token_seq, positions, cap, sliding_window)

    def own_token_only():  # one token per sequence: the same numbers, without [T, T] scores
        score = cap(jnp.einsum("ktgd,ktd->ktg", qg, k_step))
        return _Partial(score, jnp.ones_like(score), jnp.broadcast_to(v_step[:, :, None],
                                                                      qg.shape))

    in_step = jax.lax.cond(jnp.all(token_is_single | ~valid), own_token_only,
                           among_step_tokens)
    if row_attention is not None:
        row_attention = functools.partial(
            row_attention, k_cache=k_cache, v_cache=v_cache, layer=layer,
            sliding_window=sliding_window, soft_cap=soft_cap)
    pages = _PagedContext(k_cache, v_cache, layer, cap, sliding_window, row_attention)

    def per_sequence():
        # Single-token rows: each sequence's last query against that sequence's pages.
        last_token = jax.ops.segment_max(jnp.where(valid, jnp.arange(num_tokens), 0), seq,
                                         num_segments=num_seqs)
        last_token = jnp.clip(last_token, 0, num_tokens - 1)  # empty (padded) sequences
        decode = pages.attend_rows(q_tokens[last_token], block_tables, context_lens,
                                   positions[last_token])  # [K, B, G]
        decode = _Partial(*(x[:, seq] for x in decode))  # back to token rows [K, T, G]

        def chunk_context():  # the (at most one) multi-token chunk with context: [K, T, G]
            chunk = jnp.argmax(chunks_with_context)
            lens = jnp.where(token_seq == chunk, context_lens[chunk], 0)  # [T]
            return pages.attend_chunk(qg, block_tables[chunk], lens, positions)

        # A step without such a chunk (every decode-only step) never reads its pages.
        chunk = jax.lax.cond(jnp.any(chunks_with_context), chunk_context,
                             lambda: _Partial.empty(qg.shape))
        return decode.select(token_is_single[None, :, None], chunk)

    def per_token():
        lens = jnp.where(valid, context_lens[seq], 0)
        return pages.attend_rows(q_tokens, block_tables[seq], lens, positions)

    context = jax.lax.cond(jnp.sum(chunks_with_context) <= 1, per_sequence, per_token)
    out = context.merge(in_step)  # [K, T, G, D]
    return jnp.swapaxes(out, 0, 1).reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


IN_STEP_BLOCK = 128  # query / key tokens per block of the in-step attention


def _in_step_blocks(qg, k_step, v_step, token_seq, positions, cap, sliding_window):
    """Attention among the step's own tokens, same sequence and causal: qg [K, T, G, D],
    k_step / v_step [K, T, D] -> _Partial [K, T, G].

    A sequence's in-step tokens are contiguous and in position order (the scheduler lays
    out every step so), so query block i needs key blocks only from the block holding the
    first token of its earliest sequence up to block i itself: a 512-token prefill of one
    sequence computes 10 of the 16 [128, 128] score blocks, a step of four 128-token
    prompts only the 4 diagonal ones, instead of the whole [T, T]. Each query block takes
    its key blocks in one softmax pass (lax.switch over how many it needs: the key range
    is static in every branch), which ran 1.3-2x faster than folding them one at a time
    with an online softmax."""
    num_kv_heads, num_tokens, group, head_dim = qg.shape
    block = min(IN_STEP_BLOCK, num_tokens)
    num_blocks = -(-num_tokens // block)
    pad = num_blocks * block - num_tokens
    if pad:  # padding tokens (sequence -1) see only each other
        qg = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k_step, v_step = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (k_step, v_step))
        token_seq = jnp.pad(token_seq, (0, pad), constant_values=-1)
        positions = jnp.pad(positions, (0, pad))
    keys_t = jnp.swapaxes(k_step, 1, 2)  # [K, D, T']: scores as a plain [M, K] x [K, N]
    index = jnp.arange(num_blocks * block)
    starts_sequence = jnp.concatenate([jnp.ones(1, bool), token_seq[1:] != token_seq[:-1]])
    first_of_sequence = jax.lax.cummax(jnp.where(starts_sequence, index, 0))  # [T']

    def attend(num_key_blocks, i):  # query block i over key blocks i+1-num_key_blocks..i
        rows = slice(i * block, (i + 1) * block)
        keys = slice((i + 1 - num_key_blocks) * block, (i + 1) * block)
        visible = (token_seq[rows, None] == token_seq[None, keys]) & (
            positions[None, keys] <= positions[rows, None])  # [block, N]
        if sliding_window is not None:
            visible &= positions[rows, None] - positions[None, keys] < sliding_window
        return _Partial.of(cap(jnp.einsum("ktgd,kdn->ktgn", qg[:, rows], keys_t[:, :, keys])),
                           visible[None, :, None, :],
                           lambda w: jnp.einsum("ktgn,knd->ktgd", w, v_step[:, keys]))

    parts = []
    for i in range(num_blocks):
        first = first_of_sequence[i * block] // block
        branches = [functools.partial(attend, n, i) for n in range(1, i + 2)]
        parts.append(jax.lax.switch(i - first, branches))
    return _Partial(*(jnp.concatenate(x, axis=1)[:, :num_tokens] for x in zip(*parts)))


CONTEXT_CHUNK_TOKENS = 64  # keys per loop step (whole pages)
MIN_TIER_ROWS = 16  # attend_rows halves its row set down to this many rows


class _PagedContext:
    """Attention of queries over paged context, one chunk of pages at a time.

    A page of one layer holds every KV head of its S tokens (keys as [K, D, S], values as
    [S, K*D]), so each page read is one contiguous piece (48 KB each for SmolLM2's 64-token
    pages; a per-head layout read smaller pieces and ran at about half the speed on CPU).
    Loops over chunks of whole pages with an online softmax read every page once while
    its K/V are still in cache, and stop at the longest context of the rows they serve;
    the whole context is never materialised.
    """

    def __init__(self, k_cache, v_cache, layer, cap, sliding_window, row_attention=None):
        num_layers, num_pages, page_size, num_kv_heads, head_dim = v_cache.shape
        # Free reshapes; keys stay head-major ([K, D, S]) because scores are per head.
        self.k_pages = k_cache.reshape(num_layers * num_pages, num_kv_heads, head_dim,
                                       page_size)
        self.v_pages = v_cache.reshape(num_layers * num_pages, page_size,
                                       num_kv_heads * head_dim)
        self.page_size = page_size
        self.first_page = layer * num_pages
        self.chunk_pages = max(1, CONTEXT_CHUNK_TOKENS // page_size)
        self.chunk_keys = self.chunk_pages * page_size
        self.cap, self.sliding_window = cap, sliding_window
        self.row_attention = row_attention  # a kernel that replaces attend_rows' read

    def _chunks_for(self, length):  # [] keys -> [] loop steps that cover them
        return (length + self.chunk_keys - 1) // self.chunk_keys

    def _loop(self, tables, first, stop, fold_chunk, acc: _Partial) -> _Partial:
        """Fold fold_chunk(acc, k, v, keys) over chunks first..stop-1 of the pages in
        tables [R, M]; k is [R, chunk_pages, K, D, S] (keys transposed), v [R, N, K*D],
        both float32, keys [N] their positions."""
        chunk_pages, chunk_keys = self.chunk_pages, self.chunk_keys
        width = -(-tables.shape[1] // chunk_pages) * chunk_pages
        tables = jnp.pad(tables, ((0, 0), (0, width - tables.shape[1])))
        rows = tables.shape[0]

        def step(i, acc: _Partial) -> _Partial:
            cols = jax.lax.dynamic_slice_in_dim(tables, i * chunk_pages, chunk_pages, axis=1)
            index = self.first_page + cols  # [R, chunk_pages]
            k = self.k_pages.at[index].get(mode="promise_in_bounds").astype(jnp.float32)
            v = self.v_pages.at[index].get(mode="promise_in_bounds").reshape(
                rows, chunk_keys, -1).astype(jnp.float32)
            return fold_chunk(acc, k, v, i * chunk_keys + jnp.arange(chunk_keys))

        return jax.lax.fori_loop(first, stop, step, acc)

    def _visible(self, keys, lens, query_positions):  # [N], [Q], [Q] -> [Q, N]
        seen = keys[None, :] < lens[:, None]
        if self.sliding_window is not None:
            seen &= query_positions[:, None] - keys[None, :] < self.sliding_window
        return seen

    def attend_rows(self, q, tables, lens, query_positions) -> _Partial:
        """One query token per table row: q [R, K, G, D], tables [R, M], keys at positions
        < lens [R] visible (within the window of query_positions [R]). Returns [K, R, G].

        Scores are per KV head: a page's keys are stored head-major and transposed
        ([K, D, S]), so each head's [G, D] x [D, S] product reads one contiguous block.
        Values ([S, K*D] per page) are weighed for all heads at once with the weights
        placed block-diagonally ([R, K*G, N] x [R, N, K*D]); the other heads' blocks are
        computed and dropped (attention is a small part of the FLOPs). That ran faster
        than per-head value GEMMs over the strided [S, D] slices, and as fast as over a
        head-major V. Per-head scores instead of block-diagonal ones took a 30-layer
        decode step of 128 rows over 320 cached tokens from 255 to 233 ms.

        Rows are sorted longest context first and read in tiers: all R rows up to the
        longest context of the shorter half, the longer half on to the longest of its own
        shorter half, and so on down to MIN_TIER_ROWS rows, so a step whose contexts
        differ (16 to 640 tokens) reads close to each row's own context rather than every
        row up to the longest."""
        if self.row_attention is not None:
            return _Partial(*self.row_attention(q, tables, lens, query_positions))
        rows, num_kv_heads, group, head_dim = q.shape
        order = jnp.argsort(-lens)  # longest first
        q, tables, lens, query_positions = (x[order] for x in
                                            (q, tables, lens, query_positions))
        acc, done = _Partial.empty((rows, num_kv_heads * group, num_kv_heads * head_dim)), 0
        tier_rows = rows
        while tier_rows:
            rest = tier_rows // 2 if tier_rows // 2 >= MIN_TIER_ROWS else 0
            # Rows rest.. of this tier are complete once the longest of them is read; stop
            # never decreases from tier to tier (lens is sorted longest first).
            stop = self._chunks_for(lens[rest])

            def fold_chunk(acc, k, v, keys, q=q[:tier_rows], lens=lens[:tier_rows],
                           query_positions=query_positions[:tier_rows]):
                seen = self._visible(keys, lens, query_positions)  # [n, N]
                scores = jnp.einsum("rkgd,rpkds->rkgps", q, k).reshape(
                    q.shape[0], num_kv_heads * group, -1)  # [n, K*G, N]
                part = _Partial.of(self.cap(scores),
                                   seen[:, None, :],
                                   lambda w: jnp.einsum("rhn,rnx->rhx", w, v))
                return acc.combine(part)

            tier = self._loop(tables[:tier_rows], done, stop, fold_chunk,
                              _Partial(*(x[:tier_rows] for x in acc)))
            acc = _Partial(*(jnp.concatenate([t, x[tier_rows:]]) for t, x in zip(tier, acc)))
            done, tier_rows = stop, rest

        back = jnp.argsort(order)  # sorted rows -> original rows
        out = acc.out[back].reshape(rows, num_kv_heads, group, num_kv_heads, head_dim)
        out = jnp.moveaxis(jnp.diagonal(out, axis1=1, axis2=3), -1, 0)  # [K, R, G, D]
        return _Partial(*(jnp.swapaxes(x[back].reshape(rows, num_kv_heads, group), 0, 1)
                          for x in (acc.max, acc.total)), out)

    def attend_chunk(self, q, table, lens, query_positions) -> _Partial:
        """Many query tokens over one sequence's pages: q [K, T, G, D], table [M], keys
        at positions < lens [T] visible (within the window of query_positions [T]); lens
        is 0 outside the chunk's tokens, which are contiguous. Returns [K, T, G].

        Only the IN_STEP_BLOCK-token query blocks that hold chunk tokens are computed (a
        short chunk in a 512-token step costs one block, not four). A page's keys are
        already head-first ([K, D, S]); its values are regrouped so ([K, N, D], a small
        copy), and the per-head GEMMs run over all block * G query rows at once."""
        num_kv_heads, num_tokens, _, head_dim = q.shape
        block = min(IN_STEP_BLOCK, num_tokens)
        if num_tokens % block:
            block = num_tokens

        def query_block(b, acc: _Partial) -> _Partial:
            rows = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=b * block,
                                     slice_size=block, axis=0)
            q_rows = jax.lax.dynamic_slice_in_dim(q, b * block, block, axis=1)
            block_lens, block_positions = rows(lens), rows(query_positions)

            def fold_chunk(acc, k, v, keys):
                v = jnp.swapaxes(v.reshape(-1, num_kv_heads, head_dim), 0, 1)  # [K, N, D]
                seen = self._visible(keys, block_lens, block_positions)  # [block, N]
                scores = jnp.einsum("ktgd,pkds->ktgps", q_rows, k[0]).reshape(
                    *q_rows.shape[:3], -1)
                part = _Partial.of(self.cap(scores), seen[None, :, None, :],
                                   lambda w: jnp.einsum("ktgn,knd->ktgd", w, v))
                return acc.combine(part)

            part = self._loop(table[None], 0, self._chunks_for(jnp.max(block_lens)),
                              fold_chunk, _Partial.empty(q_rows.shape))
            return _Partial(*(jax.lax.dynamic_update_slice_in_dim(a, p, b * block, axis=1)
                              for a, p in zip(acc, part)))

        in_chunk = lens > 0
        first = jnp.argmax(in_chunk)
        last = num_tokens - 1 - jnp.argmax(in_chunk[::-1])
        return jax.lax.fori_loop(first // block, last // block + 1, query_block,
                                 _Partial.empty(q.shape))


def _soft_cap(cap: float | None):
    """scores -> cap * tanh(scores / cap), or the identity when cap is None."""
    if cap is None:
        return lambda scores: scores
    return lambda scores: cap * jnp.tanh(scores / cap)
