"""Parallel sampling (`SamplingParams.n > 1`): seeds of the n sequences of one prompt.

The prompt is prefilled once by the first sequence (the parent); when its last prefill
chunk is scheduled the scheduler forks the other n - 1 sequences, which share the parent's
KV blocks by reference count and sample their first token from the same logits in the
same step (the scheduler's fork step). Writes into a shared, partly filled block are
copy-on-write (BlockManager.copy_on_write + pagedjax/kv_copy.py).
"""

from __future__ import annotations

import numpy as np


def child_seed(seed: int, index: int) -> int:
    """The seed sequence `index` of an n > 1 request with request seed `seed` samples with.

    Deterministic and independent of the batch, so completion `index` of
    `SamplingParams(n=n, seed=s)` equals the single completion of
    `SamplingParams(n=1, seed=child_seed(s, index))` with otherwise equal params.
    """
    state = np.random.SeedSequence([int(seed), int(index), 0x5EED]).generate_state(1, np.uint64)
    return int(state[0]) >> 1  # < 2**63, as SamplingParams.seed requires
