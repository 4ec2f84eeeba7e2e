"""Dense causal attention in numpy, one sequence at a time: the oracle every paged-attention
backend is tested against (slow, and obviously correct: no paging, chunking or tiling)."""

from __future__ import annotations

import numpy as np


def dense_attention(
    q: np.ndarray,  # [n, H, D] queries of the sequence's last n positions
    k: np.ndarray,  # [N, K, D] keys of all N positions (cached context + the n queries')
    v: np.ndarray,  # [N, K, D]
    scale: float,
    sliding_window: int | None = None,  # keys at positions > (query position - window) only
    soft_cap: float | None = None,  # scores -> soft_cap * tanh(scores / soft_cap)
) -> np.ndarray:  # [n, H, D] float32
    """softmax(q k^T * scale) v with causal masking; query head h reads KV head h // G."""
    n, num_heads, _ = q.shape
    num_keys, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k, v = (np.repeat(np.asarray(x, np.float64), group, axis=1) for x in (k, v))  # [N, H, D]
    scores = np.einsum("qhd,khd->hqk", np.asarray(q, np.float64), k) * scale
    if soft_cap is not None:
        scores = soft_cap * np.tanh(scores / soft_cap)
    query_pos = np.arange(num_keys - n, num_keys)[:, None]  # [n, 1]
    key_pos = np.arange(num_keys)[None, :]  # [1, N]
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= query_pos - key_pos < sliding_window
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", weights, v).astype(np.float32)


def dense_paged_attention(
    q: np.ndarray,  # [T, H, D]
    k_new: np.ndarray,  # [T, K, D] this step's keys
    v_new: np.ndarray,  # [T, K, D] this step's values
    k_cache: np.ndarray,  # [L, P, K, D, S] (keys transposed within a page)
    v_cache: np.ndarray,  # [L, P, S, K, D]
    layer: int,
    token_seq: np.ndarray,  # [T] sequence of each token; padding -1
    positions: np.ndarray,  # [T] absolute position of each token
    context_lens: np.ndarray,  # [B] cached tokens of each sequence before this step
    block_tables: np.ndarray,  # [B, M] pages holding each sequence's cached context
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> np.ndarray:  # [T, H, D] float32; padding tokens 0
    """The backends' paged_attention contract, densely: per sequence, its cached context
    gathered from the pages, its in-step K/V appended, then dense_attention."""
    q, k_new, v_new, k_cache, v_cache = (np.asarray(x, np.float32)
                                         for x in (q, k_new, v_new, k_cache, v_cache))
    token_seq, positions, context_lens, block_tables = (
        np.asarray(x) for x in (token_seq, positions, context_lens, block_tables))
    layer, page_size = int(layer), v_cache.shape[2]
    out = np.zeros(q.shape, np.float32)
    for seq in np.unique(token_seq[token_seq >= 0]):
        rows = np.flatnonzero(token_seq == seq)
        cached = np.arange(context_lens[seq])
        assert (positions[rows] == len(cached) + np.arange(len(rows))).all(), (
            "a sequence's step tokens follow its cached context, in position order")
        pages, offsets = block_tables[seq, cached // page_size], cached % page_size
        k = np.concatenate([k_cache[layer, pages, :, :, offsets], k_new[rows]])  # [N, K, D]
        v = np.concatenate([v_cache[layer, pages, offsets], v_new[rows]])  # [N, K, D]
        out[rows] = dense_attention(q[rows], k, v, scale, sliding_window, soft_cap)
    return out
