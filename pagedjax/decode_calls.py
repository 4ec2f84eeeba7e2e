"""The host side of chained decode calls (the device side is multi_step.py).

A decode call runs `num_steps` decode steps of one batch in one device program. When the
batch cannot change before the call ends, the next call is dispatched before this one's
tokens reach the host, fed with this call's device-side `next_input`, so the device
computes while the host applies tokens (vLLM V1's async scheduling; vLLM V0's multi-step).
Every page those steps write is reserved through the scheduler before dispatch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .batching import fill_block_tables
from .request import Request
from .scheduler import ScheduledRequest, Scheduler, SchedulerOutput


@dataclass
class DecodeCall:
    """A decode call dispatched to the device: `rows` are its (request, start position)
    pairs in batch order, `tokens` [num_steps, B] and `next_input` (the input of the step
    after it) are device arrays not yet fetched."""

    key: Any  # BucketKey with decode_call set
    rows: list[tuple[Request, int]]
    tokens: Any
    next_input: Any
    start: float
    chainable: bool = True

    def substep(self, j: int) -> tuple[SchedulerOutput, list[int]]:
        """Step `j` of this call as the scheduler would have scheduled it, over the rows
        still unfinished, and those rows' indices in the batch."""
        live = [i for i, (request, _) in enumerate(self.rows) if not request.is_finished]
        return SchedulerOutput(scheduled=[
            ScheduledRequest(self.rows[i][0], 1, self.rows[i][1] + j) for i in live]), live


class DecodeCallPipeline:
    """Decides when a batch runs as a decode call, dispatches calls and chains them."""

    def __init__(self, scheduler: Scheduler, runner: Any, *, num_scheduler_steps: int,
                 async_scheduling: bool, max_model_len: int,
                 copy_pages: Callable[[list[tuple[int, int]]], None]):
        self.scheduler = scheduler
        self.runner = runner
        self.num_steps = num_scheduler_steps
        self.enabled = num_scheduler_steps > 1 or async_scheduling
        self.max_model_len = max_model_len
        self.copy_pages = copy_pages  # runs copy-on-write page copies on the device
        self.in_flight: Optional[DecodeCall] = None  # dispatched, tokens not applied yet

    def plan(self, output: SchedulerOutput) -> int:
        """How many decode steps this batch runs in one call: `num_steps` when calls are
        on, every chunk is a plain decode (one known token, no penalties, logprobs or
        grammar, no children to fork, room below max_model_len), every running request is
        in the batch, nobody waits for admission and the pool holds pages for every step
        (reserved here; page copies go to output.copies); else 0: a plain step."""
        steps, scheduler = self.num_steps, self.scheduler
        if (not self.enabled or scheduler.num_waiting or output.preempted or output.finished
                or output.num_seqs != scheduler.num_running):
            return 0  # a running request left out must not wait `steps` steps
        for chunk in output.scheduled:
            request, params = chunk.request, chunk.request.sampling_params
            if (chunk.num_new_tokens != 1 or not chunk.samples or request.pending_children
                    or params.logprobs is not None or params.uses_penalties
                    or request.grammar is not None  # its mask needs the host every token
                    or chunk.start_position + steps > self.max_model_len):
                return 0
        rows = [(chunk.request, chunk.start_position) for chunk in output.scheduled]
        copies = scheduler.reserve(rows, steps)
        if copies is None:
            return 0
        output.copies.extend(copies)
        return steps

    def dispatch(self, key: Any, step_input: Any, rows: list[tuple[Request, int]],
                 start: float) -> DecodeCall:
        """Start a decode call on the device (asynchronously)."""
        tokens, next_input = self.runner.dispatch_decode_steps(key, step_input)
        return DecodeCall(key, rows, tokens, next_input, start)

    def chain(self, call: DecodeCall) -> Optional[DecodeCall]:
        """Dispatch the call after `call` before its tokens reach the host; its input is
        `call`'s last sampled tokens, advanced on the device. Only when the batch cannot
        change in between: nobody waits, no row has ended, some row outlives `call` by
        max_tokens, every row stays below max_model_len and the pool holds the pages.
        Returns the dispatched call, or None."""
        steps = call.key.num_steps
        rows = [(request, start + steps) for request, start in call.rows]
        if (not call.chainable or self.scheduler.num_waiting
                or any(r.is_finished for r, _ in rows)
                or any(start + steps > self.max_model_len for _, start in rows)):
            return None
        if not any(r.sampling_params.max_tokens is None
                   or r.sampling_params.max_tokens - len(r.output_token_ids) > steps
                   for r, _ in rows):
            return None  # every row ends within `call`
        copies = self.scheduler.reserve(rows, steps)
        if copies is None:
            return None
        self.copy_pages(copies)
        tables = fill_block_tables([r.block_ids for r, _ in rows],
                                   *call.next_input.block_tables.shape)
        return self.dispatch(call.key, call.next_input._replace(block_tables=tables), rows,
                             time.perf_counter())

    def take(self) -> Optional[DecodeCall]:
        """The call in flight (now no longer in flight), or None."""
        call, self.in_flight = self.in_flight, None
        return call

    def stop_chain(self) -> None:
        """Rows ended: the call in flight still gets applied, but is not extended, so pages
        freed now are never written by a later call of the chain."""
        if self.in_flight is not None:
            self.in_flight.chainable = False
