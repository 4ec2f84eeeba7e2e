"""Ragged paged attention as a Pallas kernel (GPU via Triton; CPU in interpret mode).

Same contract as `jnp_attention.paged_attention`: T ragged query tokens of B sequences
(prefill chunks and decodes mixed); token t of sequence token_seq[t] at positions[t] sees
its sequence's cached context (context_lens[b] tokens through block_tables[b]) and the
in-step tokens of its sequence at positions <= its own, read from k_new / v_new. The
engine's block tables cover only the cached context, so the kernel reads the in-step keys
from k_new / v_new exactly like the jnp backend (no engine change, no extra cache read).

One pass, flash-attention style (float32 softmax state), one program per (query block,
KV head) so GQA query heads share every loaded K/V tile; lowered by Triton on GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

NEG_INF = -1e30
MIN_ROWS = 16  # Triton's dot needs every tile dimension >= 16
MAX_ROWS = 64
NEW_KEYS_PER_BLOCK = 16
MAX_GPU_PAGE = 128  # keys of one page are one tile on GPU


def _gpu_compiler_params(head_dim: int):
    """The one place that picks the GPU lowering: Pallas' Triton backend. Mosaic GPU
    targets Hopper+ warpgroup / TMA programming with a different kernel model; Triton
    lowers this gather-heavy, tile-per-program kernel on every CUDA GPU JAX supports and
    is the lowering JAX's own GPU paged-attention op uses."""
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dim_chunks(head_dim: int) -> tuple[tuple[int, int], ...]:
    """Split head_dim into power-of-two column chunks (offset, width): 96 -> 64 + 32."""
    chunks, offset = [], 0
    for bit in reversed(range(head_dim.bit_length())):
        width = 1 << bit
        if head_dim & width:
            chunks.append((offset, width))
            offset += width
    return tuple(chunks)


def unsupported_reason(head_dim: int, block_size: int, dtype, platform: str) -> str | None:
    """Why the Pallas kernel cannot run this shape on `platform` (None: it can)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name} (float32 / bfloat16 / float16 only)"
    if platform == "gpu":
        if head_dim % 16:
            return f"head_dim {head_dim} (a multiple of 16 on GPU)"
        if block_size & (block_size - 1) or not MIN_ROWS <= block_size <= MAX_GPU_PAGE:
            return (f"block_size {block_size} (a power of two from {MIN_ROWS} to "
                    f"{MAX_GPU_PAGE} on GPU)")
    return None


def _kernel(layer_ref, first_ref, last_ref, start_ref, end_ref, ctx_ref, table_ref,
            row_seq_ref, row_pos_ref, q_ref, k_ref, v_ref, kn_ref, vn_ref, key_seq_ref,
            key_pos_ref, o_ref, *, scale, head_dim, num_pages, page_size, block_tokens,
            new_keys, chunks, sliding_window, soft_cap, precision):
    """One query block of one KV head over the context and in-step keys of its sequences.

    * A query block is `block_tokens` consecutive tokens of the flat token axis times the
      (power-of-two padded) query heads of one KV head: R = block_tokens * group rows of
      a [R, D] tile. Output blocks never overlap, so there are no masked stores.
    * A block may hold tokens of several sequences (decode steps: one token each). It
      loops over them; for each, it walks the sequence's context one page at a time
      (each page read once per query block; keys are stored transposed, [K * D, S], so a
      head's [D, S] tile is the right operand of q @ k as it is), then the sequence's
      in-step keys up to the block's last token, updating the online softmax (m, l,
      acc) of that sequence's rows (others masked).
    * With a sliding window, pages below every row's window are skipped, not masked.
    * Head dims that are not a power of two (96 = 64 + 32) are split into power-of-two
      column chunks, because Triton tiles must be powers of two.
    """
    query_block, kv_head = pl.program_id(0), pl.program_id(1)
    rows = q_ref.shape[0]
    row_seq = row_seq_ref[...]  # [R] sequence of each row (-1: padding)
    row_pos = row_pos_ref[...]  # [R] position of each row's token
    qs = [q_ref[:, pl.ds(off, width)] for off, width in chunks]
    page_base = layer_ref[0] * num_pages
    head_base = kv_head * head_dim  # this head's rows of a [K * D, S] key page
    block_end = (query_block + 1) * block_tokens  # first token index after this block

    def update(carry, keys, values, visible, keys_transposed):
        m, l, acc = carry
        s = None
        for qc, kc in zip(qs, keys):  # kc [width, N] if keys_transposed else [N, width]
            part = pltriton.dot(qc, kc, trans_b=not keys_transposed, precision=precision)
            s = part if s is None else s + part
        s = s * scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(visible, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = [alpha[:, None] * a
               + pltriton.dot(p.astype(vc.dtype), vc, precision=precision)
               for a, vc in zip(acc, values)]
        return m_new, l, acc

    def window_ok(key_pos):  # [N] -> [R, N]
        return row_pos[:, None] - key_pos[None, :] < sliding_window

    def seq_body(seq, carry):
        in_seq = row_seq == seq  # [R]
        ctx_len = ctx_ref[seq]

        def ctx_body(j, carry):
            page = table_ref[seq, j] + page_base
            keys = [k_ref[page, pl.ds(head_base + off, width), :] for off, width in chunks]
            values = [v_ref[page, :, pl.ds(head_base + off, width)] for off, width in chunks]
            key_pos = j * page_size + lax.broadcasted_iota(jnp.int32, (page_size,), 0)
            visible = in_seq[:, None] & (key_pos < ctx_len)[None, :]
            if sliding_window is not None:
                visible &= window_ok(key_pos)
            return update(carry, keys, values, visible, keys_transposed=True)

        first_page = 0
        if sliding_window is not None:  # skip pages no row of this sequence can see
            lowest = jnp.min(jnp.where(in_seq, row_pos, jnp.iinfo(jnp.int32).max))
            first_page = jnp.maximum(lowest - sliding_window + 1, 0) // page_size
        carry = lax.fori_loop(first_page, pl.cdiv(ctx_len, page_size), ctx_body, carry)

        start = start_ref[seq]
        stop = jnp.minimum(end_ref[seq], block_end)  # causal: no key after the block

        def new_body(j, carry):
            first = start + j * new_keys
            keys = [kn_ref[pl.ds(first, new_keys), pl.ds(off, width)] for off, width in chunks]
            values = [vn_ref[pl.ds(first, new_keys), pl.ds(off, width)]
                      for off, width in chunks]
            key_seq = key_seq_ref[pl.ds(first, new_keys)]
            key_pos = key_pos_ref[pl.ds(first, new_keys)]
            visible = (in_seq[:, None] & (key_seq == seq)[None, :]
                       & (key_pos[None, :] <= row_pos[:, None]))
            if sliding_window is not None:
                visible &= window_ok(key_pos)
            return update(carry, keys, values, visible, keys_transposed=False)

        num_new = pl.cdiv(jnp.maximum(stop - start, 0), new_keys)
        return lax.fori_loop(0, num_new, new_body, carry)

    carry = (jnp.full((rows,), NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32),
             [jnp.zeros((rows, width), jnp.float32) for _, width in chunks])
    _, l, acc = lax.fori_loop(first_ref[0], last_ref[0] + 1, seq_body, carry)
    l = jnp.where(l == 0.0, 1.0, l)  # rows with no key (padding tokens) -> 0
    for (off, width), a in zip(chunks, acc):
        o_ref[:, pl.ds(off, width)] = (a / l[:, None]).astype(o_ref.dtype)


def paged_attention(
    q: jax.Array,  # [T, H, D]
    k_new: jax.Array,  # [T, K, D]
    v_new: jax.Array,  # [T, K, D]
    k_cache: jax.Array,  # [L, P, K, D, S] (keys transposed within a page)
    v_cache: jax.Array,  # [L, P, S, K, D]
    layer: jax.Array,  # [] int32
    token_seq: jax.Array,  # [T]; padding -1; a sequence's tokens contiguous, in order
    positions: jax.Array,  # [T]
    context_lens: jax.Array,  # [B]
    block_tables: jax.Array,  # [B, M] pages of the cached context
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    *,
    interpret: bool | None = None,  # None: interpret unless running on a GPU
    block_tokens: int | None = None,  # tokens per query block (None: from T / B)
) -> jax.Array:  # [T, H, D]
    """Pallas ragged paged attention; same semantics and arguments as
    jnp_attention.paged_attention."""
    num_tokens, num_heads, head_dim = q.shape
    num_layers, num_pages, page_size, num_kv_heads, _ = v_cache.shape
    num_seqs, width = block_tables.shape
    group = num_heads // num_kv_heads
    group_pad = _next_pow2(group)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if block_tokens is None:
        per_seq = _next_pow2(max(1, num_tokens // max(num_seqs, 1)))
        block_tokens = max(per_seq, max(1, MIN_ROWS // group_pad))
        block_tokens = min(block_tokens, max(1, MAX_ROWS // group_pad))
    padded_tokens = -(-num_tokens // block_tokens) * block_tokens
    num_blocks = padded_tokens // block_tokens
    rows = block_tokens * group_pad
    new_keys = NEW_KEYS_PER_BLOCK
    key_tokens = padded_tokens + new_keys  # the last in-step key block may overhang

    i32 = jnp.int32
    token_seq = token_seq.astype(i32)
    positions = positions.astype(i32)
    tok_seq = jnp.full((key_tokens,), -1, i32).at[:num_tokens].set(token_seq)
    tok_pos = jnp.zeros((key_tokens,), i32).at[:num_tokens].set(positions)

    # Queries: [T, H, D] -> [K, T' * G', D], rows of one KV head grouped token by token.
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, padded_tokens - num_tokens), (0, 0), (0, group_pad - group), (0, 0)))
    qg = qg.transpose(1, 0, 2, 3).reshape(num_kv_heads, padded_tokens * group_pad, head_dim)
    row_seq = jnp.repeat(tok_seq[:padded_tokens], group_pad)
    row_pos = jnp.repeat(tok_pos[:padded_tokens], group_pad)

    # Sequences present in each query block, and each sequence's token range.
    blk = tok_seq[:padded_tokens].reshape(num_blocks, block_tokens)
    big = jnp.iinfo(i32).max
    first_seq = jnp.min(jnp.where(blk >= 0, blk, big), axis=1)
    first_seq = jnp.where(first_seq == big, 0, first_seq).astype(i32)
    last_seq = jnp.max(blk, axis=1).astype(i32)  # -1 for an all-padding block: no loop
    index = jnp.arange(num_tokens, dtype=i32)
    seq_ids = jnp.where(token_seq >= 0, token_seq, num_seqs)  # padding -> dropped
    seq_start = jnp.full((num_seqs,), big, i32).at[seq_ids].min(index, mode="drop")
    seq_end = jnp.zeros((num_seqs,), i32).at[seq_ids].max(index + 1, mode="drop")
    seq_start = jnp.minimum(seq_start, seq_end)

    tables = block_tables.astype(i32)
    kn = jnp.pad(k_new, ((0, key_tokens - num_tokens), (0, 0), (0, 0))).transpose(1, 0, 2)
    vn = jnp.pad(v_new, ((0, key_tokens - num_tokens), (0, 0), (0, 0))).transpose(1, 0, 2)
    k_flat = k_cache.reshape(num_layers * num_pages, num_kv_heads * head_dim, page_size)
    v_flat = v_cache.reshape(num_layers * num_pages, page_size, num_kv_heads * head_dim)

    f32 = jnp.dtype(q.dtype) == jnp.float32 or jnp.dtype(k_cache.dtype) == jnp.float32
    kernel = functools.partial(
        _kernel, scale=float(scale), head_dim=head_dim, num_pages=num_pages,
        page_size=page_size, block_tokens=block_tokens,
        new_keys=new_keys, chunks=_dim_chunks(head_dim), sliding_window=sliding_window,
        soft_cap=None if soft_cap is None else float(soft_cap),
        precision=lax.Precision.HIGHEST if f32 else None)
    whole = lambda shape: pl.BlockSpec(shape, lambda i, h: (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads),
        in_specs=[
            whole((1,)),  # layer
            pl.BlockSpec((1,), lambda i, h: (i,)),  # first sequence of the block
            pl.BlockSpec((1,), lambda i, h: (i,)),  # last sequence of the block
            whole((num_seqs,)),  # seq_start
            whole((num_seqs,)),  # seq_end
            whole((num_seqs,)),  # context_lens
            whole((num_seqs, width)),  # block tables
            pl.BlockSpec((rows,), lambda i, h: (i,)),  # row_seq
            pl.BlockSpec((rows,), lambda i, h: (i,)),  # row_pos
            pl.BlockSpec((None, rows, head_dim), lambda i, h: (h, i, 0)),  # q
            whole(k_flat.shape),  # k cache, all layers / pages, heads stacked
            whole(v_flat.shape),  # v cache, heads side by side
            pl.BlockSpec((None, key_tokens, head_dim), lambda i, h: (h, 0, 0)),  # k_new
            pl.BlockSpec((None, key_tokens, head_dim), lambda i, h: (h, 0, 0)),  # v_new
            whole((key_tokens,)),  # key_seq
            whole((key_tokens,)),  # key_pos
        ],
        out_specs=pl.BlockSpec((None, rows, head_dim), lambda i, h: (h, i, 0)),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        interpret=interpret,
        compiler_params=None if interpret else _gpu_compiler_params(head_dim),
        name="ragged_paged_attention",
    )(jnp.reshape(layer, (1,)).astype(i32), first_seq, last_seq, seq_start, seq_end,
      context_lens.astype(i32), tables, row_seq, row_pos, qg, k_flat, v_flat, kn, vn,
      tok_seq, tok_pos)

    out = out.reshape(num_kv_heads, padded_tokens, group_pad, head_dim)
    out = out[:, :num_tokens, :group].transpose(1, 0, 2, 3)
    return out.reshape(num_tokens, num_heads, head_dim)
