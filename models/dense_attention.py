"""Dense causal attention over one packed row of tokens: the training forward's attention
core (the engine's is paged, models/engine_step.py).

A row may pack several sequences: `segment_ids` [T] say which tokens belong together, and
a token attends to the tokens of its own segment at its index or before (the sliding
window counts tokens back from it). Scores, softmax and the weighted sum run in float32
like the engine's paged kernels, whatever the params dtype, so bfloat16 training keeps a
float32 softmax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pagedjax.kernels import exact_attention

from .config import ModelConfig
from .layers import layer_window

NEG_INF = -1e30  # an invisible key's score: finite, so a masked row's gradient is no NaN


def dense_causal_attention(
    q: jax.Array,  # [T, H, D]
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    segment_ids: jax.Array,  # [T] int
    scale: float,
    sliding_window: int | None = None,  # keys fewer than this many tokens back only
    soft_cap: float | None = None,  # scores -> soft_cap * tanh(scores / soft_cap)
    exact: bool = False,  # float64 sums rounded once (kernels/exact_attention.py)
) -> jax.Array:  # [T, H, D] in q's dtype
    """softmax(q k^T * scale) v over the same-segment keys at or before each query;
    query head h reads KV head h // (H / K)."""
    num_tokens, num_heads, head_dim = q.shape
    index = jnp.arange(num_tokens)
    visible = ((segment_ids[:, None] == segment_ids[None, :])
               & (index[None, :] <= index[:, None]))  # [T, T]; the diagonal always
    if sliding_window is not None:
        visible &= index[:, None] - index[None, :] < sliding_window
    if exact:
        return exact_attention.dense_attention(q, k, v, visible, scale, soft_cap)
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qg = (q.astype(jnp.float32) * scale).reshape(num_tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("tkgd,skd->kgts", qg, k.astype(jnp.float32))  # [K, G, T, T]
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    weights = jax.nn.softmax(jnp.where(visible, scores, NEG_INF), axis=-1)
    out = jnp.einsum("kgts,skd->tkgd", weights, v.astype(jnp.float32))
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:  # [T] -> [T] int32
    """Each token's position within its segment: how many earlier tokens share its id."""
    index = jnp.arange(segment_ids.shape[0])
    earlier_same = (segment_ids[:, None] == segment_ids[None, :]) & (
        index[None, :] < index[:, None])
    return jnp.sum(earlier_same, axis=-1, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class DenseAttention:
    """The training forward's attention core (models/layers.AttentionCore): dense causal
    attention within segments, with the config's scale, soft-cap and sliding window; it
    threads no state (`kv` passes through untouched)."""

    segment_ids: jax.Array  # [T] int
    config: ModelConfig

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, kv, layer: jax.Array,
                 window_flag: jax.Array | None = None) -> tuple[jax.Array, object]:
        # q: [T, H, D], k / v: [T, K, D]; returns (out [T, H, D], kv)
        c = self.config

        def run(window):
            return dense_causal_attention(q, k, v, self.segment_ids, c.attention_scale,
                                          window, c.attn_logit_softcap, c.exact)

        return layer_window(run, c, window_flag), kv
