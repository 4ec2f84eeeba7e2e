"""Decode calls, device side: several decode steps of one batch inside one program.

Each step's sampled tokens feed the next step's input on the device (`advance_decode_input`),
so `num_steps` steps run without the host. Sampling keys depend on (seed, token index) only,
so seeded and greedy outputs equal the single-step ones. The host side (when a batch runs
as a decode call, page reservation, chaining calls) is decode_calls.py.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from .sampler import sample
from .step_input import KVCache, StepInput


def advance_decode_input(step_input: StepInput, tokens: jax.Array,
                         page_size: int) -> StepInput:
    """The next decode step's input: each sequence's one token is the token it just
    sampled (tokens [B]), one position further, written to the slot its block table
    gives that position. Padding tokens and padded sequences stay as they are."""
    real_token = step_input.token_seq >= 0  # [T]
    seq = jnp.maximum(step_input.token_seq, 0)  # [T]
    real_seq = step_input.seq_lens > 0  # [B]
    sampling = step_input.sampling._replace(
        sample_index=jnp.where(real_seq, step_input.sampling.sample_index + 1,
                               step_input.sampling.sample_index))
    return with_slots(step_input._replace(
        input_ids=jnp.where(real_token, tokens[seq], step_input.input_ids),
        positions=jnp.where(real_token, step_input.positions + 1, step_input.positions),
        context_lens=jnp.where(real_seq, step_input.context_lens + 1,
                               step_input.context_lens),
        seq_lens=jnp.where(real_seq, step_input.seq_lens + 1, step_input.seq_lens),
        sampling=sampling), page_size)


def with_slots(step_input: StepInput, page_size: int) -> StepInput:
    """`step_input` with each real token's KV slot taken from its block table (a chained
    call gets new tables after its input was advanced with the previous call's)."""
    real_token = step_input.token_seq >= 0  # [T]
    seq = jnp.maximum(step_input.token_seq, 0)  # [T]
    pages = step_input.block_tables[seq, step_input.positions // page_size]  # [T]
    return step_input._replace(slot_mapping=jnp.where(
        real_token, pages * page_size + step_input.positions % page_size,
        step_input.slot_mapping))


def decode_steps(apply_fn: Callable, params, kv_cache: KVCache, step_input: StepInput,
                 num_steps: int, sampler: str = "any"
                 ) -> tuple[jax.Array, KVCache, StepInput]:
    """Run `num_steps` decode steps from `step_input` (a pure-decode batch without
    penalties; `sampler`: see sampler.sample); returns the sampled tokens int32
    [num_steps, B], the updated pool and the input of the step after the last (for a
    chained call)."""
    page_size = kv_cache.v.shape[2]

    def one_step(carry, _):
        kv, current = carry
        logits, kv = apply_fn(params, current, kv)
        tokens = sample(logits, current.sampling, sampler=sampler)
        return (kv, advance_decode_input(current, tokens, page_size)), tokens

    (kv_cache, next_input), tokens = jax.lax.scan(
        one_step, (kv_cache, with_slots(step_input, page_size)), None, length=num_steps)
    return tokens, kv_cache, next_input
