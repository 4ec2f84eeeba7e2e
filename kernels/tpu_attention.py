"""TPU: JAX's ragged paged attention op behind our paged_attention signature.

UNTESTED ON A TPU. On CPU the tests run this adapter with the op's jnp reference
(`ref_ragged_paged_attention`, same signature) in place of the kernel, which checks the
layout conversion below but not the Mosaic kernel itself.

The layout adapter lives only here. The op wants (a) one combined KV pool per layer,
[P, S, 2K, D] with K and V heads interleaved, and (b) page tables and KV lengths that
include this step's tokens (they are already written into the cache by write_kv). Our
pools are K [L, P, K, D, S] (keys transposed within a page) and V [L, P, S, K, D], and
our block tables cover only the cached context, so (a) costs one transposing and
interleaving copy of the layer's pool per layer per step (a combined TPU-native pool
would remove it) and (b) is rebuilt from `slot_mapping`.
"""

from __future__ import annotations

import jax.numpy as jnp


def unsupported_reason(head_dim: int, block_size: int, dtype) -> str | None:
    """Why the TPU op cannot run this shape (None: it can)."""
    del block_size
    if head_dim % 128:
        return f"head_dim {head_dim} (a multiple of 128 on TPU)"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return f"dtype {jnp.dtype(dtype).name}"
    return None


def paged_attention(q, k_new, v_new, k_cache, v_cache, layer, token_seq, positions,
                    context_lens, block_tables, scale, sliding_window=None, soft_cap=None,
                    *, slot_mapping, op=None):
    """jnp_attention.paged_attention's semantics via the TPU op; K/V of this step must
    already be in the cache (write_kv runs first). `op` overrides the kernel."""
    del k_new, v_new  # read back from the cache, where write_kv put them
    if op is None:
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
            ragged_paged_attention as op)
    num_tokens = q.shape[0]
    _, num_pages, page_size, num_kv_heads, head_dim = v_cache.shape
    num_seqs, width = block_tables.shape
    real = token_seq >= 0
    seq = jnp.where(real, token_seq, num_seqs)  # padding -> dropped by the scatters
    counts = jnp.zeros((num_seqs,), jnp.int32).at[seq].add(1, mode="drop")
    cu_q_lens = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts)]).astype(
        jnp.int32)
    kv_lens = (context_lens + counts).astype(jnp.int32)
    # Page tables covering context + this step's tokens: add each new token's page.
    full_width = width + -(-num_tokens // page_size) + 1
    tables = jnp.zeros((num_seqs, full_width), jnp.int32).at[:, :width].set(block_tables)
    tables = tables.at[seq, positions // page_size].set(slot_mapping // page_size, mode="drop")
    # K [P, K, D, S] -> [P, S, K, D]; with V -> [P, S, 2K, D], K at even and V at odd
    # combined heads.
    keys = jnp.moveaxis(k_cache[layer], -1, 1)
    kv = jnp.stack([keys, v_cache[layer]], axis=-2)  # [P, S, K, 2, D]
    kv = kv.reshape(num_pages, page_size, 2 * num_kv_heads, head_dim)
    num_real_seqs = jnp.sum(counts > 0).astype(jnp.int32).reshape(1)
    return op(q, kv, kv_lens, tables, cu_q_lens, num_real_seqs, sm_scale=scale,
              sliding_window=sliding_window, soft_cap=soft_cap)
