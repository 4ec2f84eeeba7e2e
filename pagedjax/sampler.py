"""Token sampling inside the jitted step: greedy, temperature, top-k, top-p, min-p.

Each sequence draws with its own key, derived from (request seed, output-token index), so
what a request samples never depends on which other requests share the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .step_input import SamplingTensors

_NEG_INF = -jnp.inf


def request_keys(sampling: SamplingTensors) -> jax.Array:
    """One PRNG key per sequence: fold the output-token index into the request's seed."""

    def key_of(seed_words, index):  # seed_words: [2] uint32
        key = jax.random.wrap_key_data(seed_words, impl="threefry2x32")
        return jax.random.fold_in(key, index)

    return jax.vmap(key_of)(sampling.seed_words, sampling.sample_index)


def sample(logits: jax.Array, sampling: SamplingTensors) -> jax.Array:
    """Sample one token per row of logits [B, V] (float32); returns int32 [B].

    Rows with temperature 0 take the argmax. When every row is greedy the random path is
    skipped at run time (lax.cond), so greedy batches pay nothing for sampling support.
    """
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    all_greedy = jnp.all(sampling.temperature == 0.0)
    return jax.lax.cond(
        all_greedy,
        lambda: greedy_tokens,
        lambda: jnp.where(sampling.temperature == 0.0, greedy_tokens,
                          _sample_random(logits, sampling)),
    )


def _sample_random(logits: jax.Array, sampling: SamplingTensors) -> jax.Array:
    temperature = jnp.where(sampling.temperature > 0.0, sampling.temperature, 1.0)
    scaled = logits / temperature[:, None]
    needs_sort = jnp.any((sampling.top_k > 0) | (sampling.top_p < 1.0))
    scaled = jax.lax.cond(needs_sort, _apply_top_k_top_p, lambda s, _: s, scaled, sampling)
    scaled = _apply_min_p(scaled, sampling.min_p)
    # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits).
    keys = request_keys(sampling)
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (logits.shape[-1],)))(keys)
    return jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)


def _apply_top_k_top_p(scaled: jax.Array, sampling: SamplingTensors) -> jax.Array:
    """Mask logits outside each row's top-k and top-p nucleus to -inf.  scaled: [B, V]."""
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
    top_k = jnp.where((sampling.top_k > 0) & (sampling.top_k < vocab), sampling.top_k, vocab)
    kth_value = jnp.take_along_axis(sorted_desc, (top_k - 1)[:, None], axis=-1)  # [B, 1]
    # top-p over the top-k-filtered distribution, as vLLM and HF apply them in order.
    ranks = jnp.arange(vocab)[None, :]
    sorted_masked = jnp.where(ranks < top_k[:, None], sorted_desc, _NEG_INF)
    probs = jax.nn.softmax(sorted_masked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep a token while the mass strictly before it is below top_p (the first always).
    # top_p >= 1 keeps everything: float32 cumsum can round to 1.0 before the tail ends.
    in_nucleus = (mass_before < sampling.top_p[:, None]) | (sampling.top_p[:, None] >= 1.0)
    keep_sorted = in_nucleus & (ranks < top_k[:, None])
    num_kept = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (num_kept - 1)[:, None], axis=-1)
    threshold = jnp.maximum(threshold, kth_value)
    return jnp.where(scaled >= threshold, scaled, _NEG_INF)


def _apply_min_p(scaled: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drop tokens whose probability is below min_p times the top token's.  scaled: [B, V]."""
    probs = jax.nn.softmax(scaled, axis=-1)
    cutoff = min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs >= cutoff, scaled, _NEG_INF)
