"""StepInput: the one host->device contract of a step (all arrays padded to buckets)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax


class SamplingTensors(NamedTuple):
    """Per-sequence sampling controls for one step."""

    temperature: jax.Array  # [B] float32; 0 = greedy
    top_p: jax.Array  # [B] float32; 1 = off
    top_k: jax.Array  # [B] int32; 0 = off
    min_p: jax.Array  # [B] float32; 0 = off
    seed_words: jax.Array  # [B, 2] uint32: the request's 64-bit seed
    sample_index: jax.Array  # [B] int32: index of the token being sampled in its output
    # [B, W] int32 allowed-token bits (token_bitmask.py), only in programs for constrained
    # batches (BucketKey.bitmask_words = W); None elsewhere, so other programs are as before.
    token_bitmask: Optional[jax.Array] = None


class PenaltyTensors(NamedTuple):
    """Per-sequence penalties, logit bias and allowed tokens, sent sparsely.

    Each row lists the W token ids it touches (prompt/output tokens for the penalties,
    logit_bias keys, allowed_token_ids), padded with -1. W is a bucket dimension
    (BucketKey.penalty_width) that is 0 when no sequence in the step uses any of this, so
    the default path sends nothing and compiles nothing extra.
    """

    repetition_penalty: jax.Array  # [B] float32; 1 = off
    presence_penalty: jax.Array  # [B] float32; 0 = off
    frequency_penalty: jax.Array  # [B] float32; 0 = off
    token_ids: jax.Array  # [B, W] int32 distinct ids per row; padding -1
    output_counts: jax.Array  # [B, W] int32 occurrences in the output so far
    flags: jax.Array  # [B, W] int32 bit 0: in prompt+output (repetition);
    #   bit 1: allowed; bit 2: banned (bad_words)
    bias: jax.Array  # [B, W] float32 logit_bias value (0 if none)


PENALTY_IN_CONTEXT = 1
PENALTY_ALLOWED = 2
PENALTY_BANNED = 4  # a bad word's last token, banned this step


class StepInput(NamedTuple):
    """What the jitted step reads. Padding tokens write to the null page 0, padded
    sequences point at it, so no real KV block is ever touched by padding."""

    input_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32
    slot_mapping: jax.Array  # [T] int32 flat KV slot (page * S + offset)
    token_seq: jax.Array  # [T] int32 sequence index of each token; padding -> -1
    block_tables: jax.Array  # [B, M] int32 pages of each sequence's cached context
    context_lens: jax.Array  # [B] int32 tokens cached before this step
    seq_lens: jax.Array  # [B] int32 tokens cached after this step
    query_start_loc: jax.Array  # [B + 1] int32 ragged token ranges
    logits_indices: jax.Array  # [B] int32 last scheduled token of each sequence
    sampling: SamplingTensors
    penalties: PenaltyTensors


class KVCache(NamedTuple):
    """The preallocated paged KV pool of every layer; page 0 is the null page."""

    k: jax.Array  # [L, P, K, D, S]: keys transposed within a page
    v: jax.Array  # [L, P, S, K, D]
