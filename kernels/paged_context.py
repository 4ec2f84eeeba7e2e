"""Attention of queries over their sequences' cached context in the paged pool (jnp).

Pages are read one chunk at a time into an online softmax (PartialSoftmax) and never
gathered whole; each loop stops at the longest context among the rows it serves.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from .softmax_parts import PartialSoftmax

CONTEXT_CHUNK_TOKENS = 64  # keys per loop step (whole pages)
MIN_TIER_ROWS = 16  # attend_rows halves its row set down to this many rows


class PagedContext:
    """One layer's paged K/V pool, read by query rows through block tables.

    A page of one layer holds every KV head of its S tokens (keys [K, D, S], values
    [S, K*D]), so reading a page is one contiguous read; the per-head products then run
    as plain [M, K] x [K, N] GEMMs without a transposed operand.
    """

    def __init__(
        self,
        k_cache: jax.Array,  # [L, P, K, D, S] (keys transposed within a page)
        v_cache: jax.Array,  # [L, P, S, K, D]
        layer: jax.Array,  # [] int32
        cap: Callable[[jax.Array], jax.Array],  # the soft cap applied to scores
        sliding_window: int | None,
        row_attention: Callable | None = None,  # a kernel that replaces attend_rows' read
    ):
        """Views of `layer` of the pools (free reshapes; keys stay head-major, [K, D, S],
        because scores are per head)."""
        num_layers, num_pages, page_size, num_kv_heads, head_dim = v_cache.shape
        self.k_pages = k_cache.reshape(num_layers * num_pages, num_kv_heads, head_dim,
                                       page_size)
        self.v_pages = v_cache.reshape(num_layers * num_pages, page_size,
                                       num_kv_heads * head_dim)
        self.page_size = page_size
        self.first_page = layer * num_pages
        self.chunk_pages = max(1, CONTEXT_CHUNK_TOKENS // page_size)
        self.chunk_keys = self.chunk_pages * page_size
        self.cap, self.sliding_window = cap, sliding_window
        self.row_attention = row_attention

    def _chunks_for(self, length):  # [] keys -> [] loop steps that cover them
        return (length + self.chunk_keys - 1) // self.chunk_keys

    def _loop(self, tables, first, stop, fold_chunk, acc: PartialSoftmax) -> PartialSoftmax:
        """Fold fold_chunk(acc, k, v, keys) over chunks first..stop-1 of the pages in
        tables [R, M]; k is [R, chunk_pages, K, D, S] (keys transposed), v [R, N, K*D],
        both float32, keys [N] their positions."""
        chunk_pages, chunk_keys = self.chunk_pages, self.chunk_keys
        width = -(-tables.shape[1] // chunk_pages) * chunk_pages
        tables = jnp.pad(tables, ((0, 0), (0, width - tables.shape[1])))
        rows = tables.shape[0]

        def step(i, acc: PartialSoftmax) -> PartialSoftmax:
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

    def _read_in_tiers(self, tables, lens, fold_for, acc: PartialSoftmax,
                       min_tier_rows: int = MIN_TIER_ROWS) -> PartialSoftmax:
        """Fold each row's context chunks into acc for rows sorted longest context first
        (tables [R, M], lens [R]), in tiers: all rows up to the longest context of the
        shorter half, the longer half on to the longest of its own shorter half, and so
        on down to min_tier_rows rows, so each row reads close to its own context rather
        than the longest. fold_for(n) folds a chunk into the first n rows."""
        done, tier_rows = 0, lens.shape[0]
        while tier_rows:
            rest = tier_rows // 2 if tier_rows // 2 >= min_tier_rows else 0
            # Rows rest.. of this tier are complete once the longest of them is read; stop
            # never decreases from tier to tier (lens is sorted longest first).
            stop = self._chunks_for(lens[rest])
            tier = self._loop(tables[:tier_rows], done, stop, fold_for(tier_rows),
                              PartialSoftmax(*(x[:tier_rows] for x in acc)))
            acc = PartialSoftmax(*(jnp.concatenate([t, x[tier_rows:]])
                                   for t, x in zip(tier, acc)))
            done, tier_rows = stop, rest
        return acc

    def attend_rows(
        self,
        q: jax.Array,  # [R, K, G, D] float32, already scaled: one query token per row
        tables: jax.Array,  # [R, M] pages of each row's sequence
        lens: jax.Array,  # [R] keys at positions < lens are visible
        query_positions: jax.Array,  # [R] each row's own position (for the window)
    ) -> PartialSoftmax:  # [K, R, G]
        """Each row over its own sequence's cached context.

        Scores are per KV head (a page's keys are head-major); values are weighed for all
        heads in one block-diagonal GEMM ([R, K*G, N] x [R, N, K*D], the other heads'
        blocks computed and dropped). Rows are read in tiers (_read_in_tiers)."""
        if self.row_attention is not None:
            return PartialSoftmax(*self.row_attention(q, tables, lens, query_positions))
        rows, num_kv_heads, group, head_dim = q.shape
        order = jnp.argsort(-lens)  # longest first
        q, tables, lens, query_positions = (x[order] for x in
                                            (q, tables, lens, query_positions))

        def fold_for(tier_rows):
            def fold_chunk(acc, k, v, keys, q=q[:tier_rows], lens=lens[:tier_rows],
                           query_positions=query_positions[:tier_rows]):
                seen = self._visible(keys, lens, query_positions)  # [n, N]
                scores = jnp.einsum("rkgd,rpkds->rkgps", q, k).reshape(
                    q.shape[0], num_kv_heads * group, -1)  # [n, K*G, N]
                part = PartialSoftmax.of(self.cap(scores), seen[:, None, :],
                                         lambda w: jnp.einsum("rhn,rnx->rhx", w, v))
                return acc.combine(part)
            return fold_chunk

        acc = self._read_in_tiers(tables, lens, fold_for, PartialSoftmax.empty(
            (rows, num_kv_heads * group, num_kv_heads * head_dim)))
        back = jnp.argsort(order)  # sorted rows -> original rows
        out = acc.out[back].reshape(rows, num_kv_heads, group, num_kv_heads, head_dim)
        out = jnp.moveaxis(jnp.diagonal(out, axis1=1, axis2=3), -1, 0)  # [K, R, G, D]
        max_, total = (jnp.swapaxes(x[back].reshape(rows, num_kv_heads, group), 0, 1)
                       for x in (acc.max, acc.total))
        return PartialSoftmax(max_, total, out)

    def attend_blocks(
        self,
        q: jax.Array,  # [R, K, Q, G, D] float32, already scaled: Q query tokens per row
        tables: jax.Array,  # [R, M] pages of each row's sequence
        lens: jax.Array,  # [R] keys at positions < lens are visible (0: an empty row)
        query_positions: jax.Array,  # [R, Q] each token's own position (for the window)
    ) -> PartialSoftmax:  # [R, K, Q, G]
        """Rows of Q tokens of one sequence each (blocks of multi-token chunks: prompts
        after a prefix-cache hit, continuing chunked prefills) over that sequence's cached
        context, all rows read together in tiers (_read_in_tiers), so a step with many
        such chunks loops over its longest context once, not once per chunk. A page's
        values are regrouped head-first ([K, N, D], a small copy) so each head's GEMMs
        cover the Q * G query rows at once."""
        rows, num_kv_heads, num_queries, group, head_dim = q.shape
        order = jnp.argsort(-lens)  # longest first
        q, tables, lens, query_positions = (x[order] for x in
                                            (q, tables, lens, query_positions))

        def fold_for(tier_rows):
            def fold_chunk(acc, k, v, keys, q=q[:tier_rows], lens=lens[:tier_rows],
                           query_positions=query_positions[:tier_rows]):
                n = q.shape[0]
                # Plain batched GEMMs over (row, head) pairs: keys [n*K, D, N] and values
                # [n*K, N, D] regrouped from the pages (small copies), queries [n*K, Q*G, D].
                keys_t = jnp.moveaxis(k, 1, 3).reshape(n * num_kv_heads, head_dim, -1)
                values = jnp.swapaxes(v.reshape(n, -1, num_kv_heads, head_dim), 1, 2).reshape(
                    n * num_kv_heads, -1, head_dim)
                seen = keys[None, None, :] < lens[:, None, None]  # [n, 1, N]
                if self.sliding_window is not None:
                    seen = seen & (query_positions[:, :, None] - keys[None, None, :]
                                   < self.sliding_window)  # [n, Q, N]
                scores = jnp.matmul(q.reshape(n * num_kv_heads, -1, head_dim), keys_t)
                part = PartialSoftmax.of(
                    self.cap(scores.reshape(n, num_kv_heads, num_queries, group, -1)),
                    seen[:, None, :, None, :],
                    lambda w: jnp.matmul(w.reshape(n * num_kv_heads, -1, w.shape[-1]),
                                         values).reshape(q.shape))
                return acc.combine(part)
            return fold_chunk

        # Down to single rows: a row here is a block of Q tokens, too heavy to read along.
        acc = self._read_in_tiers(tables, lens, fold_for, PartialSoftmax.empty(q.shape),
                                  min_tier_rows=1)
        back = jnp.argsort(order)  # sorted rows -> original rows
        return PartialSoftmax(*(x[back] for x in acc))
