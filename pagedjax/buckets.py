"""Power-of-two shape buckets: the finite set of step shapes the engine ever compiles.

Block tables are always `pages_per_seq` wide (max_model_len / block_size, as in vLLM V1):
attention reads context up to the step's longest one at run time, so a wider table
costs a few bytes of transfer, not compute, and adds no shape to compile."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from .sampler import STATIC_SAMPLERS


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def _powers(low: int, high: int) -> tuple[int, ...]:
    out, value = [], next_power_of_two(low)
    while value < high:
        out.append(value)
        value *= 2
    out.append(max(next_power_of_two(high), out[-1] if out else 1))
    return tuple(sorted(set(out)))


# From here up a CPU step's time grows with its padded tokens (default model, 2 cores:
# 16 tokens 18 ms, 32 33 ms, 64 ~68 ms, 128 108 ms, 256 ~210 ms, 512 ~400 ms); below it
# a step's fixed cost makes an extra step dearer than the padding it saves.
ALIGNED_FROM_TOKENS = 32


def bucket_aligned_total(total: int, ladder: tuple[int, ...]) -> int:
    """The tokens a step of `total` tokens should stop at: the bucket of `ladder` below it
    (from ALIGNED_FROM_TOKENS up) when `total` lies in the lower half of the gap between
    that bucket and the next, else `total`. On CPU a step computes its padding like real
    tokens: 280 tokens padded to 512 cost about twice 256 now and the other 24 later."""
    lower = max((b for b in ladder if ALIGNED_FROM_TOKENS <= b < total), default=0)
    upper = min((b for b in ladder if b >= total), default=total)
    return lower if lower and total - lower < upper - total else total


@dataclass(frozen=True)
class BucketKey:
    """One compiled step shape: T tokens, B sequences, and W sparse penalty/bias entries
    per sequence (0 when no sequence uses penalties, logit bias, allowed_token_ids or
    bad_words; such shapes are compiled on first use, not by warmup).
    `with_logprobs` is True when some sequence asked for logprobs: only then does the step
    compute and return them (also compiled on first use; warmup covers False only).
    `with_prompt_logprobs` likewise: some sequence asked for prompt logprobs, so the step
    also projects every token to logits and returns each token's top logprobs.
    `decode_call` marks a pure-decode program that runs `num_steps` decode steps in one
    call and returns the next call's input (EngineConfig.num_scheduler_steps and
    async_scheduling, see multi_step.py). `sampler` is how the program samples: "any"
    decides at run time (sampler.sample); decode calls with Buckets.static_samplers
    get the sampler their batch needs, decided on the host. `bitmask_words` W > 0 marks a
    program for batches with a constrained sequence (structured outputs): its input holds
    an allowed-token bitmask [B, W] (token_bitmask.py), applied before sampling; every
    other program takes none (0), as before (compiled on first use, not by warmup)."""

    num_tokens: int
    num_seqs: int
    penalty_width: int = 0
    with_logprobs: bool = False
    with_prompt_logprobs: bool = False
    num_steps: int = 1
    sampler: str = "any"
    decode_call: bool = False
    bitmask_words: int = 0


@dataclass(frozen=True)
class Buckets:
    """Bucket ladders for tokens (T) and sequences (B); the block-table width M is fixed.

    With `static_samplers`, decode calls get a program per sampler their batches need
    (greedy; random; random with top-k / top-p), chosen on the host, rather than one
    program whose sampler picks its path at run time with lax.cond: on a GPU, XLA reads
    a conditional's predicate back to the host, so the dispatching thread waits for the
    device up to the call's last cond and the host's work cannot overlap the call.
    Plain steps keep one program: the host waits for their tokens right after dispatch
    anyway. On CPU a dispatch returns at once either way, so there nothing is split."""

    tokens: tuple[int, ...]
    seqs: tuple[int, ...]
    pages_per_seq: int
    static_samplers: bool = False

    @classmethod
    def for_limits(cls, *, max_num_batched_tokens: int, max_num_seqs: int,
                   max_pages_per_seq: int, min_token_bucket: int = 16,
                   static_samplers: bool = False, min_rows: int = 1) -> "Buckets":
        """Ladders from the smallest bucket up to the first power of two covering each limit;
        `min_rows` is the smallest of both (2: no step runs a one-row product)."""
        return cls(
            tokens=_powers(min(max(min_token_bucket, min_rows), max_num_batched_tokens),
                           max_num_batched_tokens),
            seqs=_powers(min_rows, max_num_seqs),
            pages_per_seq=max_pages_per_seq,
            static_samplers=static_samplers,
        )

    def key_for(self, num_tokens: int, num_seqs: int, penalty_entries: int = 0,
                with_logprobs: bool = False, with_prompt_logprobs: bool = False,
                decode_steps: int = 0, sampler: str = "any",
                bitmask_words: int = 0) -> BucketKey:
        """The one place a step's program is chosen: the smallest bucket holding a step of
        these sizes; with `decode_steps` > 0 the decode-call program running that many
        steps, sampling with `sampler` (sampler.static_sampler) under static_samplers;
        with `bitmask_words` > 0 (a constrained batch; never a decode call) the program
        taking allowed-token bitmasks of that many int32 words per sequence."""
        key = BucketKey(_fit(self.tokens, num_tokens, "tokens"),
                        _fit(self.seqs, num_seqs, "sequences"),
                        penalty_width(penalty_entries), bool(with_logprobs),
                        bool(with_prompt_logprobs))
        if bitmask_words > 0:
            if decode_steps > 0:
                raise ValueError("bitmask_words: a decode call takes no token bitmask")
            return replace(key, bitmask_words=bitmask_words)
        if decode_steps <= 0:
            return key
        return replace(key, num_steps=decode_steps, decode_call=True,
                       sampler=sampler if self.static_samplers else "any")

    def all_keys(self, num_steps: int = 1, decode_calls: bool = False) -> list[BucketKey]:
        """Every shape a step can take (a step never has more sequences than tokens), and
        with `num_steps` > 1 or `decode_calls` the decode-call shape of each sequence
        bucket (with static_samplers, one per sampler)."""
        keys = [BucketKey(t, b) for t, b in itertools.product(self.tokens, self.seqs) if b <= t]
        samplers = STATIC_SAMPLERS if self.static_samplers else ("any",)
        if num_steps > 1 or decode_calls:
            keys += [self.key_for(b, b, decode_steps=num_steps, sampler=sampler)
                     for b in self.seqs if b <= self.tokens[-1] for sampler in samplers]
        return keys


MIN_PENALTY_WIDTH = 16


def penalty_width(entries: int) -> int:
    """W bucket for the widest row's sparse penalty entries: 0, or a power of two >= 16."""
    return 0 if entries <= 0 else next_power_of_two(max(entries, MIN_PENALTY_WIDTH))


def _fit(ladder: tuple[int, ...], value: int, what: str) -> int:
    for bucket in ladder:
        if value <= bucket:
            return bucket
    raise ValueError(f"a step with {value} {what} exceeds the largest bucket {ladder[-1]}")
