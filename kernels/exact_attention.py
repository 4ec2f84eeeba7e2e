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

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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
        scores = _cap(lax.dot_general(qg, _f64(k), (((3,), (2,)), ((1,), (1,)))),
                      soft_cap)  # [K, T, G, S]
        part = _part(scores, lax.broadcast_in_dim(visible, scores.shape, (1, 3)),
                     lambda w: lax.dot_general(w, _f64(v), (((3,), (0,)), ((0,), (1,)))))
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
    tables, then the step's own tokens of the same sequence), rounded once: every token
    reads its sequence's pages one at a time up to the longest context, the float64 parts
    merged as it goes."""
    del slot_mapping
    num_tokens, num_heads, head_dim = q.shape
    page_size = v_cache.shape[2]
    valid = token_seq >= 0
    seq = jnp.where(valid, token_seq, 0)
    cached = jnp.where(valid, context_lens[seq], 0)  # [T] keys each token reads from pages
    tables = block_tables[seq]  # [T, M]
    num_pages = (jnp.max(cached) + page_size - 1) // page_size
    # In-step keys: same sequence, causal by position (padding tokens see each other, so
    # every row has a key and a finite result).
    in_step = ((token_seq[:, None] == token_seq[None, :])
               & (positions[None, :] <= positions[:, None]))  # [T, T]
    if sliding_window is not None:
        in_step &= positions[:, None] - positions[None, :] < sliding_window

    def page_keys(page):  # page index -> keys [T, K, D, S], values [T, S, K, D], seen [T, S]
        pages = tables[:, page]
        key_positions = page * page_size + jnp.arange(page_size)
        seen = key_positions[None, :] < cached[:, None]
        if sliding_window is not None:
            seen &= positions[:, None] - key_positions[None, :] < sliding_window
        return k_cache[layer, pages], v_cache[layer, pages], seen

    with jax.enable_x64(True):
        qg = _scaled_queries(q, k_new.shape[1], scale)  # [T, K, G, D]
        scores = _cap(lax.dot_general(qg, _f64(k_new), (((3,), (2,)), ((1,), (1,)))),
                      soft_cap)  # [K, T, G, T]
        step_part = _part(scores, lax.broadcast_in_dim(in_step, scores.shape, (1, 3)),
                          lambda w: lax.dot_general(w, _f64(v_new),
                                                    (((3,), (0,)), ((0,), (1,)))))
        step_part = _Part(lax.transpose(step_part.max, (1, 0, 2)),
                          lax.transpose(step_part.total, (1, 0, 2)),
                          lax.transpose(step_part.out, (1, 0, 2, 3)))  # token rows first

        def read_page(page, merged: _Part) -> _Part:
            keys, values, seen = page_keys(page)
            page_scores = _cap(lax.dot_general(qg, _f64(keys), (((3,), (2,)), ((0, 1), (0, 1)))),
                               soft_cap)  # [T, K, G, S]
            part = _part(page_scores, lax.broadcast_in_dim(seen, page_scores.shape, (0, 3)),
                         lambda w: lax.dot_general(w, _f64(values),
                                                   (((3,), (1,)), ((0, 1), (0, 2)))))
            return _combine(merged, part)

        rows = step_part.max.shape
        nothing = _Part(lax.full(rows, NEG, F64), lax.full(rows, 0.0, F64),
                        lax.full(step_part.out.shape, 0.0, F64))
        context = lax.fori_loop(0, num_pages, read_page, nothing)
        out = _normalised(_combine(context, step_part))  # [T, K, G, D]
        return lax.convert_element_type(
            lax.reshape(out, (num_tokens, num_heads, head_dim)), q.dtype)


def _f64(x: jax.Array) -> jax.Array:
    return lax.convert_element_type(x, F64)


def _scaled_queries(q: jax.Array,  # [T, H, D]
                    num_kv_heads: int, scale: float) -> jax.Array:  # [T, K, G, D] float64
    num_tokens, num_heads, head_dim = q.shape
    scaled = _f64(q) * lax.full((), scale, F64)
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
