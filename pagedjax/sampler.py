"""Token sampling inside the jitted step: penalties and logit bias, then greedy,
temperature, top-k, top-p, min-p; and the logprobs of what was drawn, raw or processed
(`LOGPROBS_MODES`).

Each sequence draws with its own key, derived from (request seed, output-token index), so
what a request samples never depends on which other requests share the batch.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from pagedjax.models import exact_numerics

from .sampling_params import MAX_LOGPROBS
from .step_input import (PENALTY_ALLOWED, PENALTY_BANNED, PENALTY_IN_CONTEXT, PenaltyTensors,
                         SamplingTensors)
from .token_bitmask import apply_token_bitmask

_NEG_INF = -jnp.inf

# How a program samples besides "any", which decides at run time with lax.cond (every
# row greedy? some row with top-k / top-p?). These are chosen on the host and compiled
# without a cond: "greedy" (argmax only), "random" (no top-k / top-p sort), "top_k_top_p".
STATIC_SAMPLERS = ("greedy", "random", "top_k_top_p")

# What a step's logprobs are (vLLM's `logprobs_mode`, an engine option): log_softmax of
# the model's logits ("raw_logprobs", the default) or of the logits the token was drawn
# from ("processed_logprobs": after penalties and logit bias, then, for sampled rows,
# temperature, top-k, top-p and min-p), or those logits themselves, unnormalised.
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")


def static_sampler(params: Iterable) -> str:
    """The sampler that gives the SamplingParams `params` of a batch's rows exactly what
    "any" gives them: the choice its run-time conds would make."""
    params = list(params)
    if all(p.temperature == 0 for p in params):
        return "greedy"
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        return "top_k_top_p"
    return "random"


def request_keys(sampling: SamplingTensors) -> jax.Array:
    """One PRNG key per sequence: fold the output-token index into the request's seed."""

    def key_of(seed_words, index):  # seed_words: [2] uint32
        key = jax.random.wrap_key_data(seed_words, impl="threefry2x32")
        return jax.random.fold_in(key, index)

    return jax.vmap(key_of)(sampling.seed_words, sampling.sample_index)


def sample(logits: jax.Array, sampling: SamplingTensors,
           penalties: Optional[PenaltyTensors] = None, sampler: str = "any",
           with_processed: bool = False):
    """Sample one token per row of logits [B, V] (float32); returns int32 [B], and with
    `with_processed` (static) also the processed logits [B, V] each row drew from.

    A constrained batch's allowed-token bitmask (sampling.token_bitmask) applies first,
    then penalties, logit bias and allowed_token_ids, to greedy rows too (as in
    vLLM). Rows with temperature 0 take the argmax. With `sampler` "any", when every row
    is greedy the random path is skipped at run time (lax.cond), so greedy batches pay
    nothing for sampling support; a static `sampler` (STATIC_SAMPLERS, static_sampler)
    compiles only the path its batches take, with no cond.
    """
    logits = apply_penalties(apply_token_bitmask(logits, sampling.token_bitmask), penalties)
    greedy_tokens = argmax_rows(logits)

    def all_greedy():  # greedy rows draw from the penalized logits
        return (greedy_tokens, logits) if with_processed else greedy_tokens

    def greedy_or_random(sort: Optional[bool]):
        greedy = sampling.temperature == 0.0
        processed = _process_random(logits, sampling, sort)
        tokens = jnp.where(greedy, greedy_tokens, _draw(processed, sampling))
        if with_processed:
            return tokens, jnp.where(greedy[:, None], logits, processed)
        return tokens

    if sampler == "greedy":
        return all_greedy()
    if sampler != "any":
        return greedy_or_random(sort=sampler == "top_k_top_p")
    return jax.lax.cond(jnp.all(sampling.temperature == 0.0), all_greedy,
                        lambda: greedy_or_random(sort=None))


def sample_with_logprobs(logits: jax.Array, sampling: SamplingTensors,
                         penalties: Optional[PenaltyTensors], sampler: str,
                         mode: str, exact: bool = False) -> tuple[jax.Array, StepLogprobs]:
    """`sample`, plus the StepLogprobs of the drawn tokens [B] in logprobs `mode`
    (LOGPROBS_MODES): of the model's logits [B, V] or of the processed ones (`exact`:
    compute_logprobs')."""
    if mode.startswith("processed"):
        tokens, processed = sample(logits, sampling, penalties, sampler, with_processed=True)
        return tokens, compute_logprobs(processed, tokens, mode == "processed_logprobs", exact)
    tokens = sample(logits, sampling, penalties, sampler)
    return tokens, compute_logprobs(logits, tokens, mode == "raw_logprobs", exact)


ARGMAX_BLOCK = 512  # vocabulary entries per block of argmax_rows


def argmax_rows(x: jax.Array) -> jax.Array:  # [B, V] -> [B] int32
    """jnp.argmax(x, axis=-1) (first index of the maximum), in two levels: the block
    holding the row's maximum, then the maximum within that block.

    XLA CPU runs a plain argmax over [B, V] as a slow scalar (value, index) reduction; a
    max over blocks vectorises, and the (value, index) reductions then see only
    V / ARGMAX_BLOCK + ARGMAX_BLOCK entries per row."""
    rows, vocab = x.shape
    blocks = -(-vocab // ARGMAX_BLOCK)
    padded = jnp.pad(x, ((0, 0), (0, blocks * ARGMAX_BLOCK - vocab)), constant_values=-jnp.inf)
    padded = padded.reshape(rows, blocks, ARGMAX_BLOCK)
    best_block = jnp.argmax(jnp.max(padded, axis=-1), axis=-1)  # [B] first block with the max
    block = jnp.take_along_axis(padded, best_block[:, None, None], axis=1)[:, 0]  # [B, 512]
    return (best_block * ARGMAX_BLOCK + jnp.argmax(block, axis=-1)).astype(jnp.int32)


class StepLogprobs(NamedTuple):
    """Per-row logprobs of one step: the sampled token's logprob [B] and rank [B], and the
    top MAX_LOGPROBS ids [B, K] and logprobs [B, K] (K = min(MAX_LOGPROBS, vocab))."""

    sampled_logprob: jax.Array
    sampled_rank: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def compute_logprobs(logits: jax.Array, tokens: jax.Array,
                     normalize: bool = True, exact: bool = False) -> StepLogprobs:
    """log_softmax of logits [B, V] (the model's: RAW logprobs, vLLM v1's default, before
    penalties, logit bias, allowed/bad words and temperature) at tokens [B] and the top
    ones; with `normalize` False the logits themselves; `exact`: the float64 log_softmax
    rounded once (models/exact_numerics.py). The rank is 1 + the number of tokens with a
    strictly higher value."""
    logprobs = logits.astype(jnp.float32)
    if normalize:
        logprobs = (exact_numerics.log_softmax(logprobs) if exact
                    else jax.nn.log_softmax(logprobs, axis=-1))
    sampled = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)  # [B, 1]
    rank = 1 + jnp.sum(logprobs > sampled, axis=-1).astype(jnp.int32)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, logits.shape[-1]))
    return StepLogprobs(sampled[:, 0], rank, top_ids.astype(jnp.int32), top_logprobs)


def _process_random(logits: jax.Array, sampling: SamplingTensors,
                    sort: Optional[bool] = None) -> jax.Array:
    """The logits [B, V] a sampled row draws from: temperature, top-k / top-p (with `sort`
    None: only if some row asks, decided at run time), then min-p."""
    temperature = jnp.where(sampling.temperature > 0.0, sampling.temperature, 1.0)
    scaled = logits / temperature[:, None]
    if sort is None:
        needs_sort = jnp.any((sampling.top_k > 0) | (sampling.top_p < 1.0))
        scaled = jax.lax.cond(needs_sort, _apply_top_k_top_p, lambda s, _: s, scaled,
                              sampling)
    elif sort:
        scaled = _apply_top_k_top_p(scaled, sampling)
    return _apply_min_p(scaled, sampling.min_p)


def _draw(processed: jax.Array, sampling: SamplingTensors) -> jax.Array:
    """One token per row of processed logits [B, V] from each row's own key."""
    # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits).
    keys = request_keys(sampling)
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (processed.shape[-1],)))(keys)
    return argmax_rows(processed + gumbel)


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


def apply_penalties(logits: jax.Array, penalties: Optional[PenaltyTensors]) -> jax.Array:
    """Apply allowed_token_ids, bad_words, logit_bias, then repetition, frequency and presence
    penalties (vLLM v1's order) to logits [B, V] float32.

    Work is O(B * W) gathers and scatters over each row's sparse entries; with W == 0
    (no sequence in the step uses any of these) it is skipped when tracing, and a run-time
    lax.cond skips it when every row is neutral.
    """
    if penalties is None or penalties.token_ids.shape[-1] == 0:
        return logits
    return jax.lax.cond(_any_active(penalties), _apply_penalties, lambda x, _: x,
                        logits, penalties)


def _any_active(p: PenaltyTensors) -> jax.Array:
    return (jnp.any(p.repetition_penalty != 1.0) | jnp.any(p.presence_penalty != 0.0)
            | jnp.any(p.frequency_penalty != 0.0) | jnp.any(p.token_ids >= 0))


def _apply_penalties(logits: jax.Array, p: PenaltyTensors) -> jax.Array:
    batch, vocab = logits.shape
    ids = p.token_ids  # [B, W], distinct per row
    valid = (ids >= 0) & (ids < vocab)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], ids.shape)
    scatter_ids = jnp.where(valid, ids, vocab)  # out of bounds: dropped by the scatter

    allowed = valid & ((p.flags & PENALTY_ALLOWED) != 0)
    has_allowed = jnp.any(allowed, axis=-1)  # [B]
    allowed_mask = jnp.zeros((batch, vocab), bool).at[rows, scatter_ids].set(
        allowed, mode="drop")
    logits = jnp.where(has_allowed[:, None] & ~allowed_mask, _NEG_INF, logits)

    values = jnp.take_along_axis(logits, jnp.where(valid, ids, 0), axis=-1)  # [B, W]
    values = jnp.where((p.flags & PENALTY_BANNED) != 0, _NEG_INF, values)
    values = values + p.bias
    # Repetition penalty (HF/vLLM) over prompt + output tokens.
    rep = p.repetition_penalty[:, None]
    in_context = (p.flags & PENALTY_IN_CONTEXT) != 0
    values = jnp.where(in_context, jnp.where(values > 0, values / rep, values * rep), values)
    # Frequency and presence penalties (OpenAI/vLLM) over output tokens only.
    counts = p.output_counts.astype(jnp.float32)
    values = (values - p.frequency_penalty[:, None] * counts
              - p.presence_penalty[:, None] * (counts > 0).astype(jnp.float32))
    return logits.at[rows, scatter_ids].set(values, mode="drop")
