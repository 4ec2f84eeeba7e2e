"""The host side of constrained decoding: each step's allowed-token bitmasks.

A constrained sequence (`Request.grammar`, a structured_outputs.GrammarState) needs, before
every token it samples, the bitmask of the tokens its grammar allows there. `rows` packs
them for a step ([rows, W] int32, W = ceil(V / 32); -1 = every token allowed for the rows
of unconstrained sequences). Right after a step, `advance` feeds the sampled tokens to the
grammars and computes the next masks on a worker thread (llguidance releases the GIL), so
they are being made while the host processes the step's outputs and schedules the next
one. Engines that never see a constraint start no thread.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np


@dataclass
class BitmaskStats:
    """Where the masks' time went: `compute_seconds` computing them (worker thread
    included), `wait_seconds` of the step path waiting for or computing them, over
    `steps` constrained steps and `rows` masks."""

    compute_seconds: float = 0.0
    wait_seconds: float = 0.0
    steps: int = 0
    rows: int = 0


class GrammarBitmasks:
    """Bitmasks of the constrained sequences of each step, for a vocabulary of
    `vocab_size` tokens."""

    def __init__(self, vocab_size: int):
        self.words = (vocab_size + 31) // 32  # W: int32 words per mask
        self.stats = BitmaskStats()
        self._worker: Optional[ThreadPoolExecutor] = None
        self._executor: Any = None  # llguidance's LLExecutor: masks of many matchers at once
        self._pending: Optional[Future] = None

    def rows(self, scheduled: Sequence) -> Optional[np.ndarray]:  # [B, W] int32
        """The bitmask of each scheduled chunk (objects with .request, .samples) in order,
        -1 words for unconstrained rows, or None when no chunk that samples is
        constrained (the step needs no mask)."""
        constrained = [(i, chunk.request) for i, chunk in enumerate(scheduled)
                       if chunk.samples and chunk.request.grammar is not None]
        if not constrained:
            return None
        start = time.perf_counter()
        self.wait()
        states = []
        for _, request in constrained:
            request.grammar.sync(request.output_token_ids)
            states.append(request.grammar)
        self.fill([s for s in states if not s.mask_ready])
        masks = np.full((len(scheduled), self.words), -1, np.int32)
        masks[[i for i, _ in constrained]] = np.stack([s.mask for s in states])
        self.stats.wait_seconds += time.perf_counter() - start
        self.stats.steps += 1
        self.stats.rows += len(states)
        return masks

    def advance(self, scheduled: Sequence) -> None:
        """After a step: on the worker thread, feed each constrained sequence of its
        chunks `scheduled` the tokens it just sampled and compute its next mask."""
        requests = [chunk.request for chunk in scheduled
                    if chunk.request.grammar is not None and not chunk.request.is_finished]
        if not requests:
            return
        self.wait()
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="pagedjax-grammar")
        self._pending = self._worker.submit(self._advance, requests)

    def wait(self) -> None:
        """Until the background masks are done (matchers are then the caller's again)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _advance(self, requests: list) -> None:
        # The engine appends tokens only in its next step, after `rows` waited for this.
        start = time.perf_counter()
        for request in requests:
            request.grammar.sync(request.output_token_ids)
        self.stats.compute_seconds += time.perf_counter() - start
        self.fill([r.grammar for r in requests if not r.grammar.mask_ready])

    def fill(self, states: list) -> None:
        """Compute the next-token masks of `states` (GrammarStates) into their `mask`, now
        (the step path and the worker thread call it; never while `advance` runs)."""
        if not states:
            return
        from llguidance import LLExecutor
        from llguidance.numpy import fill_next_token_bitmask_par

        start = time.perf_counter()
        if self._executor is None:
            self._executor = LLExecutor()
        masks = np.empty((len(states), self.words), np.int32)
        fill_next_token_bitmask_par(self._executor,
                                    [(state.matcher, i) for i, state in enumerate(states)],
                                    masks)
        for state, mask in zip(states, masks):
            state.set_mask(mask)
        self.stats.compute_seconds += time.perf_counter() - start
