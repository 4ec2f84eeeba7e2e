"""Reference paged attention in plain jnp: the test oracle and the CPU production path.

A step holds T ragged tokens from B sequences (decodes and prefill chunks mixed). Each
token attends to two key sets, merged in one softmax:

* the sequence's **cached context**: positions before this step's first token of that
  sequence, read from the paged cache through the sequence's block table;
* the **in-step tokens** of the same sequence at positions <= its own, taken straight
  from this step's freshly projected K/V (no cache read needed).

Splitting it so means a prefill of fresh prompts reads no pages at all, and a decode
token reads exactly its own sequence's pages; no Python loop over sequences.
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

    `sliding_window` and `soft_cap` default off (the models here use neither); they exist so
    the Pallas kernels can be checked against this oracle with them on.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[1]
    group = num_heads // num_kv_heads
    page_size = k_cache.shape[3]
    num_pages_per_seq = block_tables.shape[1]

    qg = (q.astype(jnp.float32) * scale).reshape(num_tokens, num_kv_heads, group, head_dim)

    # Cached context, gathered per token through its sequence's block table.
    seq = jnp.maximum(token_seq, 0)
    token_tables = block_tables[seq]  # [T, M]
    token_ctx_lens = jnp.where(token_seq >= 0, context_lens[seq], 0)  # [T]
    # One gather straight from the full cache (no per-layer slice copy): [T, M, K, S, D].
    k_ctx = k_cache[layer, :, token_tables].astype(jnp.float32)
    v_ctx = v_cache[layer, :, token_tables].astype(jnp.float32)
    ctx_len = num_pages_per_seq * page_size
    s_ctx = jnp.einsum("tkgd,tmksd->tkgms", qg, k_ctx).reshape(
        num_tokens, num_kv_heads, group, ctx_len)
    if soft_cap is not None:
        s_ctx = soft_cap * jnp.tanh(s_ctx / soft_cap)
    ctx_visible = jnp.arange(ctx_len)[None, :] < token_ctx_lens[:, None]  # [T, N]
    if sliding_window is not None:
        ctx_visible &= positions[:, None] - jnp.arange(ctx_len)[None, :] < sliding_window
    s_ctx = jnp.where(ctx_visible[:, None, None, :], s_ctx, NEG_INF)

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

    scores = jnp.concatenate([s_ctx, s_new], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    p_ctx, p_new = probs[..., :ctx_len], probs[..., ctx_len:]
    p_ctx = p_ctx.reshape(num_tokens, num_kv_heads, group, num_pages_per_seq, page_size)
    out = jnp.einsum("tkgms,tmksd->tkgd", p_ctx, v_ctx)
    out = out + jnp.einsum("tkgu,ukd->tkgd", p_new, v_new.astype(jnp.float32))
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
