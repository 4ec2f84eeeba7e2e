"""Ragged paged attention in plain jnp: the "reference" backend (the CPU path, and the
base of the "native" one). kernels.dense_oracle is what tests check it against.

A step holds T ragged tokens from B sequences (decodes and prefill chunks mixed). Each
token attends to two key sets, merged as two parts of one softmax:

* the sequence's **cached context**: positions before this step's first token of that
  sequence, read from the paged cache through the sequence's block table;
* the **in-step tokens** of the same sequence at positions <= its own, taken straight
  from this step's freshly projected K/V (no cache read needed).

So a prefill of fresh prompts reads no pages at all, a decode token reads exactly its own
sequence's pages, and a continuing prefill chunk reads its pages once per block of its
tokens; no Python loop over sequences. Shaped for XLA CPU: einsums keep their batch axes
leading (a trailing one makes XLA transpose its operand per call), and in-step scores are
computed only for the query / key blocks that can share a sequence.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from .paged_context import PagedContext
from .softmax_parts import PartialSoftmax, soft_cap_fn

IN_STEP_BLOCK = 128  # query / key tokens per block of the in-step attention
CHUNK_QUERY_BLOCK = 32  # query tokens per block of a chunk reading its cached context


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

    The cached context is read per *sequence*: each decode row reads its own pages, and
    each multi-token chunk with cached context (a continuing chunked prefill, a prompt
    after a prefix-cache hit) reads its pages once per block of CHUNK_QUERY_BLOCK of its
    own tokens; a step without such a chunk reads no pages for its prefills. Context is
    read page by page up to the longest context among the rows read together, so the
    width M of the block tables costs nothing. `sliding_window` and `soft_cap` default off.

    `row_attention` replaces the jnp read of one-query-token rows (the native backend's
    C++ kernel): called as row_attention(q, tables, lens, query_positions, k_cache=,
    v_cache=, layer=, sliding_window=, soft_cap=), it returns what
    PagedContext.attend_rows does. It then reads the chunks' context too, every chunk
    token as a row of its own (rows with no context: lens 0): the kernel walks the rows
    of one chunk together, so each page is read once per group of rows.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[1]
    group = num_heads // num_kv_heads
    q_tokens = (q.astype(jnp.float32) * scale).reshape(
        num_tokens, num_kv_heads, group, head_dim)  # [T, K, G, D]
    qg = jnp.swapaxes(q_tokens, 0, 1)  # [K, T, G, D]
    cap = soft_cap_fn(soft_cap)

    layout = step_rows(token_seq, context_lens)
    valid, seq, query_lens = layout.valid, layout.seq, layout.query_lens
    chunks_with_context, token_is_single = layout.chunks_with_context, layout.single
    k_step, v_step = (jnp.swapaxes(x.astype(jnp.float32), 0, 1) for x in (k_new, v_new))

    # In-step tokens of the same sequence, causal by absolute position. The diagonal is
    # always visible, so this part gives every row a finite maximum to merge against.
    def among_step_tokens():
        return _in_step_blocks(qg, k_step, v_step, token_seq, positions, cap, sliding_window)

    def own_token_only():  # one token per sequence: the same numbers, without [T, T] scores
        score = cap(jnp.einsum("ktgd,ktd->ktg", qg, k_step))
        return PartialSoftmax(score, jnp.ones_like(score),
                              jnp.broadcast_to(v_step[:, :, None], qg.shape))

    in_step = jax.lax.cond(jnp.all(token_is_single | ~valid), own_token_only,
                           among_step_tokens)
    if row_attention is not None:
        row_attention = functools.partial(
            row_attention, k_cache=k_cache, v_cache=v_cache, layer=layer,
            sliding_window=sliding_window, soft_cap=soft_cap)
    pages = PagedContext(k_cache, v_cache, layer, cap, sliding_window, row_attention)

    # Single-token rows: each sequence's last query against that sequence's pages.
    last_token = layout.last_token
    decode = pages.attend_rows(q_tokens[last_token], block_tables, context_lens,
                               positions[last_token])  # [K, B, G]
    decode = PartialSoftmax(*(x[:, seq] for x in decode))  # back to token rows [K, T, G]

    def chunk_context():  # multi-token chunks with cached context: [K, T, G]
        if row_attention is not None:  # each chunk token a row; the kernel reads a
            in_chunk = valid & chunks_with_context[seq]  # chunk's pages once for its rows
            return pages.attend_rows(q_tokens, block_tables[seq],
                                     jnp.where(in_chunk, context_lens[seq], 0), positions)
        return _chunks_over_context(pages, qg, seq, valid, positions, query_lens,
                                    context_lens, block_tables, chunks_with_context)

    # A step without such a chunk (every decode-only step) never reads its pages.
    chunk = jax.lax.cond(jnp.any(chunks_with_context), chunk_context,
                         lambda: PartialSoftmax.empty(qg.shape))
    context = decode.select(token_is_single[None, :, None], chunk)
    out = context.merge(in_step)  # [K, T, G, D]
    return jnp.swapaxes(out, 0, 1).reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def _chunks_over_context(pages: PagedContext, qg, seq, valid, positions, query_lens,
                         context_lens, block_tables, chunks_with_context) -> PartialSoftmax:
    """Every multi-token chunk with cached context (a prompt after a prefix-cache hit, a
    continuing chunked prefill) over its own sequence's pages: qg [K, T, G, D] ->
    PartialSoftmax [K, T, G], nothing visible for the step's other tokens. The chunks are
    read in query blocks (chunk_query_blocks), all blocks together
    (PagedContext.attend_blocks)."""
    blocks = chunk_query_blocks(valid, seq, query_lens, chunks_with_context)
    parts = pages.attend_blocks(jnp.moveaxis(qg[:, blocks.tokens], 0, 1),  # [Nb, K, Q, G, D]
                                block_tables[blocks.owner],
                                jnp.where(blocks.used, context_lens[blocks.owner], 0),
                                positions[blocks.tokens])
    rows = PartialSoftmax(*(jnp.swapaxes(x[blocks.token_block, :, blocks.token_offset], 0, 1)
                            for x in parts))  # [K, T, G]
    return rows.select(blocks.in_chunk[None, :, None], PartialSoftmax.empty(qg.shape))


class StepRows(NamedTuple):
    """Where a ragged step's tokens belong (its sequences' tokens are contiguous)."""

    valid: jax.Array  # [T] bool: a real token (not padding)
    seq: jax.Array  # [T] its sequence (padding: 0)
    query_lens: jax.Array  # [B] tokens of each sequence in the step
    single: jax.Array  # [T] bool: the only token of its sequence (decodes, 1-token chunks)
    last_token: jax.Array  # [B] each sequence's last token (empty sequences: clipped)
    chunks_with_context: jax.Array  # [B] bool: 2+ tokens after cached ones


def step_rows(token_seq: jax.Array,  # [T] sequence of each token; padding -1
              context_lens: jax.Array) -> StepRows:  # [B] cached tokens of each sequence
    """The step's token layout every paged backend reads its context by."""
    num_tokens = token_seq.shape[0]
    num_seqs = context_lens.shape[0]
    valid = token_seq >= 0
    seq = jnp.where(valid, token_seq, 0)
    query_lens = jax.ops.segment_sum(valid.astype(jnp.int32), seq, num_segments=num_seqs)
    last_token = jax.ops.segment_max(jnp.where(valid, jnp.arange(num_tokens), 0), seq,
                                     num_segments=num_seqs)
    return StepRows(valid, seq, query_lens, valid & (query_lens[seq] == 1),
                    jnp.clip(last_token, 0, num_tokens - 1),
                    (query_lens > 1) & (context_lens > 0))


class ChunkBlocks(NamedTuple):
    """A step's multi-token chunks with cached context cut into query blocks of Q tokens
    (CHUNK_QUERY_BLOCK), so each block reads its sequence's pages once for its tokens."""

    tokens: jax.Array  # [Nb, Q] step tokens of each block (clipped past the chunk's end)
    owner: jax.Array  # [Nb] the sequence each block reads
    used: jax.Array  # [Nb] bool: the block holds chunk tokens (else: no context to read)
    token_block: jax.Array  # [T] the block of each chunk token (0 for the others)
    token_offset: jax.Array  # [T] its index within that block
    in_chunk: jax.Array  # [T] bool: the token belongs to such a chunk


def chunk_query_blocks(valid: jax.Array,  # [T] bool: a real token
                       seq: jax.Array,  # [T] its sequence (padding: 0)
                       query_lens: jax.Array,  # [B] tokens of each sequence in the step
                       chunks_with_context: jax.Array,  # [B] bool
                       ) -> ChunkBlocks:
    """The query blocks of the chunks with context (a sequence's tokens are contiguous):
    a chunk has at least 2 tokens, so T // Q + min(B, T // 2) blocks always suffice; the
    unused ones hold no context and cost almost nothing."""
    num_tokens = valid.shape[0]
    num_seqs = query_lens.shape[0]
    block = min(CHUNK_QUERY_BLOCK, num_tokens)
    num_blocks = num_tokens // block + min(num_seqs, num_tokens // 2)
    index = jnp.arange(num_tokens)
    first_token = jax.ops.segment_min(jnp.where(valid, index, num_tokens), seq,
                                      num_segments=num_seqs)  # [B]
    blocks_per_seq = jnp.where(chunks_with_context, -(-query_lens // block), 0)  # [B]
    blocks_end = jnp.cumsum(blocks_per_seq)
    first_block = blocks_end - blocks_per_seq  # [B]

    ids = jnp.arange(num_blocks)
    owner = jnp.searchsorted(blocks_end, ids, side="right")  # [Nb]; B past the last block
    used = owner < num_seqs
    owner = jnp.minimum(owner, num_seqs - 1)
    start = first_token[owner] + (ids - first_block[owner]) * block
    tokens = jnp.clip(start[:, None] + jnp.arange(block), 0, num_tokens - 1)  # [Nb, Q]
    in_chunk = valid & chunks_with_context[seq]  # [T]
    offset = index - first_token[seq]
    token_block = jnp.where(in_chunk, first_block[seq] + offset // block, 0)
    return ChunkBlocks(tokens, owner, used, token_block, offset % block, in_chunk)


def _in_step_blocks(qg, k_step, v_step, token_seq, positions, cap, sliding_window):
    """Attention among the step's own tokens, same sequence and causal: qg [K, T, G, D],
    k_step / v_step [K, T, D] -> PartialSoftmax [K, T, G].

    A sequence's in-step tokens are contiguous and in position order, so query block i
    needs key blocks only from the block holding the first token of its earliest sequence
    up to block i itself (a 512-token prefill of one sequence: 10 of the 16 blocks; four
    128-token prompts: the 4 diagonal ones). Each query block takes its key blocks in one
    softmax pass, lax.switch choosing how many (the key range is static in every branch),
    rather than folding them one at a time with an online softmax."""
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
    first_of_sequence = sequence_starts(token_seq)  # [T']

    def attend(num_key_blocks, i):  # query block i over key blocks i+1-num_key_blocks..i
        rows = slice(i * block, (i + 1) * block)
        keys = slice((i + 1 - num_key_blocks) * block, (i + 1) * block)
        visible = in_step_visible(token_seq, positions, rows, keys, sliding_window)
        return PartialSoftmax.of(
            cap(jnp.einsum("ktgd,kdn->ktgn", qg[:, rows], keys_t[:, :, keys])),
            visible[None, :, None, :],
            lambda w: jnp.einsum("ktgn,knd->ktgd", w, v_step[:, keys]))

    parts = []
    for i in range(num_blocks):
        first = first_of_sequence[i * block] // block
        branches = [functools.partial(attend, n, i) for n in range(1, i + 2)]
        parts.append(jax.lax.switch(i - first, branches))
    return PartialSoftmax(*(jnp.concatenate(x, axis=1)[:, :num_tokens] for x in zip(*parts)))


def sequence_starts(token_seq: jax.Array) -> jax.Array:  # [T] -> [T] int
    """The index of the first step token of each token's sequence (a sequence's tokens are
    contiguous)."""
    index = jnp.arange(token_seq.shape[0])
    starts = jnp.concatenate([jnp.ones(1, bool), token_seq[1:] != token_seq[:-1]])
    return jax.lax.cummax(jnp.where(starts, index, 0))


def in_step_visible(token_seq: jax.Array, positions: jax.Array,  # [T] each
                    rows: slice, cols: slice,
                    sliding_window: int | None) -> jax.Array:  # [rows, cols] bool
    """Which in-step keys `cols` the queries `rows` see: same sequence, causal by position
    (padding, sequence -1, sees padding), within the sliding window."""
    visible = (token_seq[rows, None] == token_seq[None, cols]) & (
        positions[None, cols] <= positions[rows, None])
    if sliding_window is not None:
        visible &= positions[rows, None] - positions[None, cols] < sliding_window
    return visible
