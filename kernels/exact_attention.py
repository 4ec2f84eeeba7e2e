"""Attention that rounds once: scores, softmax and value sums in float64, the result
rounded to the query's dtype at the end. It is the "exact" backend of the engine and the
core of `pagedjax.forward(..., exact=True)`.

Float32 attention rounds its running sums in an order each program sets: the paged
backends merge page-sized partial softmaxes, a dense softmax sums a padded row, and
XLA's reductions follow the shapes. In float64 a row's sums carry ~1e-16 relative error
whatever their order, so the one rounding to float32 gives the same bits in any program
(short of a value within ~1e-16 of a float32 rounding boundary): the engine's decode
steps, chunked prefills and prefix-cache hits then attend exactly as the training
forward does, however either pads or splits its keys.

The float64 part is built from lax primitives inside `jax.enable_x64` (`in_float64`), so
the program around it stays 32-bit (jnp's helpers carry jit caches of their own that
would not see the switch). Float64 runs on CPU and GPU; TPUs have none.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .jnp_attention import (IN_STEP_BLOCK, chunk_query_blocks, in_step_visible,
                            sequence_starts, step_rows)

F64 = np.dtype(np.float64)
NEG = -1e300  # an invisible key's score (finite: a row that sees nothing stays NaN-free)


class _Part(NamedTuple):
    """Float64 softmax over one key set, not yet normalised (flash-attention parts)."""

    max: jax.Array  # [R] largest visible score
    total: jax.Array  # [R] sum of exp(score - max) over visible keys
    out: jax.Array  # [R, D] sum of exp(score - max) * value


def in_float64(fn: Callable) -> Callable:
    """`fn` (array arguments; lax primitives on float64 inside) run, differentiated and
    transposed inside `jax.enable_x64`: the gradient rules JAX traces later, outside that
    scope (a scan's body is differentiated after it was traced), would build float32
    arrays for float64 values. The backward pass recomputes `fn`."""

    @jax.custom_vjp
    def scoped(*args):
        with jax.enable_x64(True):
            return fn(*args)

    def forward(*args):
        return scoped(*args), args

    def backward(args, cotangent):
        with jax.enable_x64(True):
            return jax.vjp(fn, *args)[1](cotangent)

    scoped.defvjp(forward, backward)
    return scoped


def dense_attention(
    q: jax.Array,  # [T, H, D]
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    visible: jax.Array,  # [T, T] bool: query t sees key s
    scale: float,
    soft_cap: float | None = None,
) -> jax.Array:  # [T, H, D] in q's dtype
    """softmax(q k^T * scale) v over the visible keys, rounded once (differentiable);
    query head h reads KV head h // (H / K). Every row must see at least one key."""

    def attend(q, k, v, visible):
        num_tokens, num_heads, head_dim = q.shape
        qg = _scaled_queries(q, k.shape[1], scale)  # [T, K, G, D]
        scores = _cap(lax.dot_general(qg, as_float64(k), (((3,), (2,)), ((1,), (1,)))),
                      soft_cap)  # [K, T, G, S]
        part = _part(scores, lax.broadcast_in_dim(visible, scores.shape, (1, 3)),
                     lambda w: lax.dot_general(w, as_float64(v), (((3,), (0,)), ((0,), (1,)))))
        out = lax.transpose(_normalised(part), (1, 0, 2, 3))  # [T, K, G, D]
        return lax.convert_element_type(
            lax.reshape(out, (num_tokens, num_heads, head_dim)), q.dtype)

    return in_float64(attend)(q, k, v, visible)


def paged_attention(
    q: jax.Array,  # [T, H, D]
    k_new: jax.Array,  # [T, K, D] this step's keys
    v_new: jax.Array,  # [T, K, D] this step's values
    k_cache: jax.Array,  # [L, P, K, D, S] (keys transposed within a page)
    v_cache: jax.Array,  # [L, P, S, K, D]
    layer: jax.Array,  # [] int32
    token_seq: jax.Array,  # [T] sequence of each token; padding -1
    positions: jax.Array,  # [T] absolute position of each token
    context_lens: jax.Array,  # [B] cached tokens of each sequence before this step
    block_tables: jax.Array,  # [B, M] pages holding each sequence's cached context
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    slot_mapping: jax.Array | None = None,  # [T] unused: the step's K/V come as k_new
) -> jax.Array:  # [T, H, D] in q's dtype
    """jnp_attention.paged_attention's ragged attention (cached context through the block
    tables, then the step's own tokens of the same sequence), rounded once. As there, a
    sequence's one-token row (a decode) reads its pages alone and a multi-token chunk
    with context reads them once per query block of its tokens (chunk_query_blocks), page
    by page up to the longest context, the float64 parts merged as they come."""
    del slot_mapping
    num_tokens, num_heads, head_dim = q.shape
    layout = step_rows(token_seq, context_lens)
    seq, last_token = layout.seq, layout.last_token
    blocks = chunk_query_blocks(layout.valid, seq, layout.query_lens,
                                layout.chunks_with_context)
    block_lens = jnp.where(blocks.used, context_lens[blocks.owner], 0)  # [Nb]
    read = functools.partial(_read_context, k_cache=k_cache, v_cache=v_cache, layer=layer,
                             sliding_window=sliding_window, soft_cap=soft_cap)

    with jax.enable_x64(True):
        qg = _scaled_queries(q, k_new.shape[1], scale)  # [T, K, G, D]
        step_part = _in_step(qg, k_new, v_new, token_seq, positions, sliding_window,
                             soft_cap)  # [T, K, G(, D)]
        rows = read(qg[last_token][:, None], block_tables, context_lens,
                    positions[last_token][:, None])  # [B, 1, ...]
        chunks = read(qg[blocks.tokens], block_tables[blocks.owner], block_lens,
                      positions[blocks.tokens])  # [Nb, Q, ...]
        nothing = _empty(step_part.out.shape)
        context = _Part(*(
            _pick(layout.single, row[seq, 0],
                  _pick(blocks.in_chunk, chunk[blocks.token_block, blocks.token_offset], none))
            for row, chunk, none in zip(rows, chunks, nothing)))  # [T, K, G(, D)]
        out = _normalised(_combine(context, step_part))  # [T, K, G, D]
        return lax.convert_element_type(
            lax.reshape(out, (num_tokens, num_heads, head_dim)), q.dtype)


def _in_step(qg: jax.Array,  # [T, K, G, D] float64
             k_new: jax.Array, v_new: jax.Array,  # [T, K, D]
             token_seq: jax.Array, positions: jax.Array,  # [T]
             sliding_window: int | None, soft_cap: float | None) -> _Part:
    """The step's own tokens of the same sequence, causal by position (padding tokens see
    each other, so every row has a key): parts [T, K, G(, D)] (inside the float64 scope).
    As jnp_attention's in-step blocks: query block i reads key blocks only from the one
    holding its earliest sequence's first token, lax.switch choosing how many."""
    num_tokens, num_kv_heads, group, head_dim = qg.shape
    block = min(IN_STEP_BLOCK, num_tokens)
    num_blocks = -(-num_tokens // block)
    pad = num_blocks * block - num_tokens
    keys, values = as_float64(k_new), as_float64(v_new)
    if pad:
        qg = lax.pad(qg, lax.full((), 0.0, F64), ((0, pad, 0),) + ((0, 0, 0),) * 3)
        keys, values = (lax.pad(x, lax.full((), 0.0, F64), ((0, pad, 0),) + ((0, 0, 0),) * 2)
                        for x in (keys, values))
        token_seq = jnp.pad(token_seq, (0, pad), constant_values=-1)
        positions = jnp.pad(positions, (0, pad))
    first_of_sequence = sequence_starts(token_seq)  # [T']

    def attend(num_key_blocks: int, i: int) -> _Part:  # query block i, its last key blocks
        rows = slice(i * block, (i + 1) * block)
        cols = slice((i + 1 - num_key_blocks) * block, (i + 1) * block)
        seen = in_step_visible(token_seq, positions, rows, cols, sliding_window)  # [Q, N]
        scores = _cap(lax.dot_general(qg[rows], keys[cols], (((3,), (2,)), ((1,), (1,)))),
                      soft_cap)  # [K, Q, G, N]
        part = _part(scores, lax.broadcast_in_dim(seen, scores.shape, (1, 3)),
                     lambda w: lax.dot_general(w, values[cols],
                                               (((3,), (0,)), ((0,), (1,)))))
        return _Part(lax.transpose(part.max, (1, 0, 2)), lax.transpose(part.total, (1, 0, 2)),
                     lax.transpose(part.out, (1, 0, 2, 3)))  # [Q, K, G(, D)]

    parts = []
    for i in range(num_blocks):
        first = first_of_sequence[i * block] // block
        parts.append(lax.switch(i - first, [functools.partial(attend, n, i)
                                            for n in range(1, i + 2)]))
    return _Part(*(lax.slice_in_dim(lax.concatenate(list(x), 0), 0, num_tokens)
                   for x in zip(*parts)))


def _read_context(qg: jax.Array,  # [N, Q, K, G, D] float64: N groups of Q queries
                  tables: jax.Array,  # [N, M] the pages each group reads
                  lens: jax.Array,  # [N] cached tokens each group sees
                  query_positions: jax.Array,  # [N, Q]
                  *, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                  sliding_window: int | None, soft_cap: float | None) -> _Part:
    """Each group's float64 part [N, Q, K, G(, D)] over its cached keys, one page of
    every group per loop step, up to the longest `lens` (inside the float64 scope)."""
    groups, queries, num_kv_heads, group, head_dim = qg.shape
    page_size = v_cache.shape[2]

    def read_page(page, merged: _Part) -> _Part:
        pages = tables[:, page]
        keys = k_cache[layer, pages]  # [N, K, D, S]
        values = v_cache[layer, pages]  # [N, S, K, D]
        key_positions = page * page_size + jnp.arange(page_size)  # [S]
        seen = key_positions[None, None, :] < lens[:, None, None]  # [N, 1, S]
        if sliding_window is not None:
            seen = seen & (query_positions[:, :, None] - key_positions < sliding_window)
        seen = jnp.broadcast_to(seen, (groups, queries, page_size))
        scores = _cap(lax.dot_general(qg, as_float64(keys), (((4,), (2,)), ((0, 2), (0, 1)))),
                      soft_cap)  # [N, K, Q, G, S]
        part = _part(scores, lax.broadcast_in_dim(seen, scores.shape, (0, 2, 4)),
                     lambda w: lax.dot_general(w, as_float64(values),
                                               (((4,), (1,)), ((0, 1), (0, 2)))))
        # [N, K, Q, G(, D)] -> [N, Q, K, G(, D)]
        part = _Part(lax.transpose(part.max, (0, 2, 1, 3)),
                     lax.transpose(part.total, (0, 2, 1, 3)),
                     lax.transpose(part.out, (0, 2, 1, 3, 4)))
        return _combine(merged, part)

    nothing = _empty((groups, queries, num_kv_heads, group, head_dim))
    num_pages = (jnp.max(lens) + page_size - 1) // page_size
    return lax.fori_loop(0, num_pages, read_page, nothing)


def _empty(out_shape: tuple[int, ...]) -> _Part:  # out_shape [..., D]
    """The part of a key set with nothing visible."""
    rows = out_shape[:-1]
    return _Part(lax.full(rows, NEG, F64), lax.full(rows, 0.0, F64),
                 lax.full(out_shape, 0.0, F64))


def _pick(take: jax.Array,  # [T] bool
          a: jax.Array, b: jax.Array) -> jax.Array:  # [T, ...] each
    """Row-wise a where `take`, else b."""
    return lax.select(lax.broadcast_in_dim(take, a.shape, (0,)), a, b)


def as_float64(x: jax.Array) -> jax.Array:
    """x converted to float64 (inside the float64 scope)."""
    return lax.convert_element_type(x, F64)


def _scaled_queries(q: jax.Array,  # [T, H, D]
                    num_kv_heads: int, scale: float) -> jax.Array:  # [T, K, G, D] float64
    num_tokens, num_heads, head_dim = q.shape
    scaled = as_float64(q) * lax.full((), scale, F64)
    return lax.reshape(scaled, (num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim))


def _cap(scores: jax.Array, soft_cap: float | None) -> jax.Array:
    if soft_cap is None:
        return scores
    cap = lax.full((), soft_cap, F64)
    return cap * lax.tanh(scores / cap)


def _part(scores: jax.Array,  # [..., N] float64
          visible: jax.Array,  # [..., N] bool
          weigh_values: Callable) -> _Part:  # weights [..., N] -> [..., D]
    last = scores.ndim - 1
    scores = lax.select(visible, scores, lax.full(scores.shape, NEG, F64))
    # The shift only keeps exp in range (softmax does not depend on it): no gradient.
    top = lax.reduce_max(lax.stop_gradient(scores), (last,))
    weights = lax.exp(scores - lax.broadcast_in_dim(top, scores.shape, tuple(range(last))))
    weights = lax.select(visible, weights, lax.full(scores.shape, 0.0, F64))
    return _Part(top, lax.reduce_sum(weights, (last,)), weigh_values(weights))


def _combine(a: _Part, b: _Part) -> _Part:
    top = lax.max(a.max, b.max)
    wa, wb = lax.exp(a.max - top), lax.exp(b.max - top)
    dims = tuple(range(top.ndim))
    return _Part(top, wa * a.total + wb * b.total,
                 lax.broadcast_in_dim(wa, a.out.shape, dims) * a.out
                 + lax.broadcast_in_dim(wb, b.out.shape, dims) * b.out)


def _normalised(part: _Part) -> jax.Array:
    return part.out / lax.broadcast_in_dim(part.total, part.out.shape,
                                           tuple(range(part.total.ndim)))
