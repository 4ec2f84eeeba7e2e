"""Turn a scheduler decision into a padded numpy StepInput (host side, no JAX)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .buckets import BucketKey, Buckets
from .sampler import static_sampler
from .step_input import (PENALTY_ALLOWED, PENALTY_BANNED, PENALTY_IN_CONTEXT, PenaltyTensors,
                         SamplingTensors, StepInput)

_UINT32_MASK = (1 << 32) - 1


def build_step_input(scheduled: Sequence, buckets: Buckets, block_size: int,
                     decode_steps: int = 0,
                     token_bitmask: Optional[np.ndarray] = None,  # [len(scheduled), W] int32
                     ) -> tuple[BucketKey, StepInput]:
    """Pack scheduled chunks (objects with .request, .start_position, .num_new_tokens) into
    one StepInput padded to the smallest bucket that holds them, and pick its program.

    `token_bitmask` [len(scheduled), W] int32 (grammar_bitmasks.py) holds the rows'
    allowed-token bitmasks when some row is constrained; the step then runs the program
    taking bitmasks, padded rows allowing every token.

    With `decode_steps` > 0 the step is a decode call of that many steps (multi_step.py):
    each row's block table then lists every page it holds, so step j reads what the
    steps before it wrote. Padding tokens write to slot 0 of the null page and attend
    only to each other; padded sequences have empty context and read logits of token 0
    (their samples are ignored).
    """
    num_tokens = sum(s.num_new_tokens for s in scheduled)
    entries = [_penalty_entries(s.request) for s in scheduled]
    widest = max((len(e[0]) for e in entries if e is not None), default=0)
    with_logprobs = any(s.request.sampling_params.logprobs is not None for s in scheduled)
    with_prompt_logprobs = any(needs_prompt_logprobs(s) for s in scheduled)
    sampler = (static_sampler(s.request.sampling_params for s in scheduled) if decode_steps
               else "any")
    bitmask_words = 0 if token_bitmask is None else token_bitmask.shape[-1]
    key = buckets.key_for(num_tokens, len(scheduled), widest, with_logprobs,
                          with_prompt_logprobs, decode_steps, sampler, bitmask_words)
    T, B, M = key.num_tokens, key.num_seqs, buckets.pages_per_seq

    # Per-token and per-sequence values are gathered in Python lists and written into
    # the padded arrays once each: a decode step of a few hundred sequences would
    # otherwise spend more host time in small numpy calls than in its own work.
    token_ids: list[int] = []
    token_positions: list[int] = []
    token_slots: list[int] = []
    token_seqs: list[int] = []
    tables: list[list[int]] = []  # each sequence's pages to read
    starts, ends, logits_at_rows = [], [], []
    query_start_loc = np.full(B + 1, num_tokens, np.int32)
    offset = 0
    logits_at = {}  # id(request) -> index of its last token this step
    for i, chunk in enumerate(scheduled):
        request, start, n = chunk.request, chunk.start_position, chunk.num_new_tokens
        end = offset + n
        if n == 0:
            # A just-forked parallel-sampling child (scheduled after every chunk with
            # tokens): an empty sequence, like padding, that samples with its own params
            # and seed from its parent's last-token logits.
            logits_at_rows.append(logits_at[id(chunk.logits_source)])
            tables.append([])
            starts.append(0)
            ends.append(0)
            continue  # query_start_loc stays num_tokens, like padding's
        prompt = request.prompt_token_ids
        if start + n <= len(prompt):
            token_ids.extend(prompt[start:start + n])
        elif start >= len(prompt):  # decodes: skip building prompt + output
            generated = start - len(prompt)
            token_ids.extend(request.output_token_ids[generated:generated + n])
        else:
            token_ids.extend(request.all_token_ids[start:start + n])
        blocks = request.block_ids
        if n == 1:
            token_positions.append(start)
            token_slots.append(blocks[start // block_size] * block_size + start % block_size)
        else:
            pos = np.arange(start, start + n, dtype=np.int32)
            token_positions.extend(range(start, start + n))
            pages = np.asarray(blocks, np.int32)[pos // block_size]
            token_slots.extend((pages * block_size + pos % block_size).tolist())
        token_seqs.extend([i] * n)
        tables.append(blocks if decode_steps else blocks[:-(-start // block_size)])
        starts.append(start)
        ends.append(start + n)
        query_start_loc[i] = offset
        logits_at_rows.append(end - 1)
        logits_at[id(request)] = end - 1
        offset = end

    input_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slot_mapping = np.zeros(T, np.int32)
    token_seq = np.full(T, -1, np.int32)
    input_ids[:num_tokens] = token_ids
    positions[:num_tokens] = token_positions
    slot_mapping[:num_tokens] = token_slots
    token_seq[:num_tokens] = token_seqs
    block_tables = fill_block_tables(tables, B, M)
    n_seqs = len(scheduled)
    context_lens = np.zeros(B, np.int32)
    seq_lens = np.zeros(B, np.int32)
    logits_indices = np.zeros(B, np.int32)
    context_lens[:n_seqs] = starts
    seq_lens[:n_seqs] = ends
    logits_indices[:n_seqs] = logits_at_rows

    requests = [chunk.request for chunk in scheduled]
    params = [request.sampling_params for request in requests]
    temperature = np.zeros(B, np.float32)
    top_p = np.ones(B, np.float32)
    top_k = np.zeros(B, np.int32)
    min_p = np.zeros(B, np.float32)
    seed_words = np.zeros((B, 2), np.uint32)
    sample_index = np.zeros(B, np.int32)
    temperature[:n_seqs] = [p.temperature for p in params]
    top_p[:n_seqs] = [p.top_p for p in params]
    top_k[:n_seqs] = [max(p.top_k, 0) for p in params]
    min_p[:n_seqs] = [p.min_p for p in params]
    seed_words[:n_seqs] = [((r.seed >> 32) & _UINT32_MASK, r.seed & _UINT32_MASK)
                           for r in requests]
    sample_index[:n_seqs] = [len(r.output_token_ids) for r in requests]

    W = key.penalty_width
    repetition_penalty = np.ones(B, np.float32)
    presence_penalty = np.zeros(B, np.float32)
    frequency_penalty = np.zeros(B, np.float32)
    penalty_ids = np.full((B, W), -1, np.int32)
    output_counts = np.zeros((B, W), np.int32)
    penalty_flags = np.zeros((B, W), np.int32)
    bias = np.zeros((B, W), np.float32)
    for i, entry in enumerate(entries):
        if entry is None:
            continue
        repetition_penalty[i] = params[i].repetition_penalty
        presence_penalty[i] = params[i].presence_penalty
        frequency_penalty[i] = params[i].frequency_penalty
        ids, counts_i, flags, values = entry
        n_ids = len(ids)
        penalty_ids[i, :n_ids] = ids
        output_counts[i, :n_ids] = counts_i
        penalty_flags[i, :n_ids] = flags
        bias[i, :n_ids] = values

    bitmask = None
    if token_bitmask is not None:
        bitmask = np.full((B, bitmask_words), -1, np.int32)
        bitmask[:n_seqs] = token_bitmask
    sampling = SamplingTensors(temperature, top_p, top_k, min_p, seed_words, sample_index,
                               bitmask)
    return key, StepInput(input_ids, positions, slot_mapping, token_seq, block_tables,
                          context_lens, seq_lens, query_start_loc, logits_indices, sampling,
                          PenaltyTensors(repetition_penalty, presence_penalty,
                                         frequency_penalty, penalty_ids, output_counts,
                                         penalty_flags, bias))


def fill_block_tables(tables: Sequence[Sequence[int]], num_rows: int,
                      width: int) -> np.ndarray:  # [B, M]
    """Block tables int32 [num_rows, width]: row i lists the pages `tables[i]` (at most
    `width`), the rest points at the null page 0."""
    out = np.zeros((num_rows, width), np.int32)
    counts = np.asarray([min(len(t), width) for t in tables], np.int64)
    rows = np.repeat(np.arange(len(counts)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    out[rows, np.arange(len(rows)) - first] = [p for t in tables for p in t[:width]]
    return out


def needs_prompt_logprobs(chunk) -> bool:
    """True when `chunk`'s request asked for prompt logprobs and the chunk holds a prompt
    position whose next prompt token has no entry yet (a recompute after preemption
    needs none again)."""
    request = chunk.request
    if request.sampling_params.prompt_logprobs is None or chunk.num_new_tokens == 0:
        return False
    prompt_len = len(request.prompt_token_ids)
    done = len(request.prompt_logprobs or [None])  # entries for prompt positions < done
    return chunk.start_position + 1 < prompt_len and done < prompt_len


def build_prompt_targets(scheduled: Sequence, key: BucketKey) -> Optional[np.ndarray]:
    """int32 [T]: for each scheduled token at prompt position p of a request that needs
    prompt logprobs, the prompt token at p + 1 (the one whose logprob that token's logits
    give); 0 elsewhere. None when the step computes no prompt logprobs."""
    if not key.with_prompt_logprobs:
        return None
    targets = np.zeros(key.num_tokens, np.int32)
    offset = 0
    for chunk in scheduled:
        start, n = chunk.start_position, chunk.num_new_tokens
        if needs_prompt_logprobs(chunk):
            prompt = chunk.request.prompt_token_ids
            stop = min(start + n, len(prompt) - 1)
            targets[offset:offset + stop - start] = prompt[start + 1:stop + 1]
        offset += n
    return targets


def _penalty_entries(request):
    """A request's sparse penalty entries (distinct ids, output counts, flags, bias), or
    None when it uses no penalty, logit_bias or allowed_token_ids."""
    params = request.sampling_params
    if not params.uses_penalties:
        return None
    use_repetition = params.repetition_penalty != 1.0
    use_counts = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    output = np.asarray(request.output_token_ids, np.int32)
    context = np.unique(np.concatenate(
        [np.asarray(request.prompt_token_ids, np.int32), output])) if use_repetition else None
    out_ids, out_counts = (np.unique(output, return_counts=True) if use_counts
                           else (np.zeros(0, np.int32), None))
    bias_ids = np.asarray([t for t, _ in params.logit_bias or ()], np.int32)
    allowed = np.asarray(params.allowed_token_ids or (), np.int32)
    banned = np.asarray(sorted(_banned_tokens(request)), np.int32)
    parts = [out_ids, bias_ids, allowed, banned] + ([context] if context is not None else [])
    ids = np.unique(np.concatenate(parts).astype(np.int32))
    counts = np.zeros(len(ids), np.int32)
    flags = np.zeros(len(ids), np.int32)
    values = np.zeros(len(ids), np.float32)
    if out_counts is not None:
        counts[np.searchsorted(ids, out_ids)] = out_counts
    if context is not None:
        flags[np.searchsorted(ids, context)] |= PENALTY_IN_CONTEXT
    if len(allowed):
        flags[np.searchsorted(ids, allowed)] |= PENALTY_ALLOWED
    if len(banned):
        flags[np.searchsorted(ids, banned)] |= PENALTY_BANNED
    if len(bias_ids):
        values[np.searchsorted(ids, bias_ids)] = [v for _, v in params.logit_bias]
    return ids, counts, flags, values


def _banned_tokens(request) -> set[int]:
    """vLLM's bad-words rule: ban a bad word's last token when the output so far ends with
    the word's other tokens (a one-token word is always banned)."""
    output = request.output_token_ids
    banned = set()
    for ids in request.bad_words_token_ids:
        prefix = len(ids) - 1
        if prefix > len(output):
            continue
        if prefix == 0 or list(output[-prefix:]) == list(ids[:-1]):
            banned.add(ids[-1])
    return banned
