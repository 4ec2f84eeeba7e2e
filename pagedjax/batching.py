"""Turn a scheduler decision into a padded numpy StepInput (host side, no JAX)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .buckets import BucketKey, Buckets
from .step_input import SamplingTensors, StepInput

_UINT32_MASK = (1 << 32) - 1


def build_step_input(scheduled: Sequence, buckets: Buckets,
                     block_size: int) -> tuple[BucketKey, StepInput]:
    """Pack scheduled chunks (objects with .request, .start_position, .num_new_tokens) into
    one StepInput padded to the smallest bucket that holds them.

    Padding tokens write to slot 0 of the null page and attend only to each other; padded
    sequences have empty context and read logits of token 0 (their samples are ignored).
    """
    num_tokens = sum(s.num_new_tokens for s in scheduled)
    context_pages = max((-(-s.start_position // block_size) for s in scheduled), default=0)
    key = buckets.key_for(num_tokens, len(scheduled), context_pages)
    T, B, M = key.num_tokens, key.num_seqs, key.num_pages

    input_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slot_mapping = np.zeros(T, np.int32)
    token_seq = np.full(T, -1, np.int32)
    block_tables = np.zeros((B, M), np.int32)
    context_lens = np.zeros(B, np.int32)
    seq_lens = np.zeros(B, np.int32)
    query_start_loc = np.full(B + 1, num_tokens, np.int32)
    logits_indices = np.zeros(B, np.int32)
    temperature = np.zeros(B, np.float32)
    top_p = np.ones(B, np.float32)
    top_k = np.zeros(B, np.int32)
    min_p = np.zeros(B, np.float32)
    seed_words = np.zeros((B, 2), np.uint32)
    sample_index = np.zeros(B, np.int32)

    offset = 0
    for i, chunk in enumerate(scheduled):
        request, start, n = chunk.request, chunk.start_position, chunk.num_new_tokens
        end = offset + n
        prompt_len = len(request.prompt_token_ids)
        pos = np.arange(start, start + n, dtype=np.int32)
        if start + n <= prompt_len:
            input_ids[offset:end] = request.prompt_token_ids[start:start + n]
        else:
            input_ids[offset:end] = request.all_token_ids[start:start + n]
        positions[offset:end] = pos
        blocks = np.asarray(request.block_ids, np.int32)
        slot_mapping[offset:end] = blocks[pos // block_size] * block_size + pos % block_size
        token_seq[offset:end] = i
        cached_pages = -(-start // block_size)
        block_tables[i, :cached_pages] = blocks[:cached_pages]
        context_lens[i] = start
        seq_lens[i] = start + n
        query_start_loc[i] = offset
        logits_indices[i] = end - 1

        params = request.sampling_params
        temperature[i] = params.temperature
        top_p[i] = params.top_p
        top_k[i] = max(params.top_k, 0)
        min_p[i] = params.min_p
        seed_words[i] = (request.seed >> 32) & _UINT32_MASK, request.seed & _UINT32_MASK
        sample_index[i] = len(request.output_token_ids)
        offset = end

    sampling = SamplingTensors(temperature, top_p, top_k, min_p, seed_words, sample_index)
    return key, StepInput(input_ids, positions, slot_mapping, token_seq, block_tables,
                          context_lens, seq_lens, query_start_loc, logits_indices, sampling)
