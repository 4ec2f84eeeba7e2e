"""Scheduler: iteration-level continuous batching with chunked prefill (vLLM V1 style).

Each step gets a token budget. Running requests (decodes and unfinished prefill chunks) are
served first, in admission order; when the KV pool runs dry the newest running request is
preempted by recompute. Whatever budget is left admits waiting requests first come, first
served, splitting long prompts into chunks. Host-side only: plain Python, no JAX.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Optional, Sequence

from .admission import check_admissible
from .block_manager import BlockManager
from .buckets import bucket_aligned_total
from .request import Request, RequestStatus
from .scheduler_output import ScheduledRequest, SchedulerOutput

__all__ = ["ScheduledRequest", "Scheduler", "SchedulerOutput"]


class Scheduler:
    """Decides, step by step, which requests run and how many tokens each one feeds.

    `max_num_seqs` caps sequences per step and `max_num_batched_tokens` caps tokens per
    step (the chunked-prefill budget). With `token_buckets` (the step shapes, on CPU where
    padding costs as much as tokens), a step just past a bucket is cut back to it by
    shortening its newest prompt chunks (buckets.bucket_aligned_total). Which sequences
    end, and when, is the output processor's decision (`finish_requests`).
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, token_buckets: tuple[int, ...] = ()):
        for name, value in (("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not isinstance(block_manager, BlockManager):
            raise ValueError(f"block_manager must be a BlockManager, got {block_manager!r}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.token_buckets = tuple(token_buckets)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._unfinished: dict[str, Request] = {}
        self._num_preemptions = 0
        # Finished requests with retain_blocks whose pages are kept until release().
        self._retained: dict[int, Request] = {}

    # ------------------------------------------------------------------ queue state

    @property
    def num_running(self) -> int:
        """Requests admitted and holding KV pages."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for admission (new or preempted)."""
        return len(self.waiting)

    @property
    def num_preemptions(self) -> int:
        """Preemptions since this scheduler was built."""
        return self._num_preemptions

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.waiting or self.running)

    def get_request(self, request_id: str) -> Optional[Request]:
        """The unfinished request with this id, or None."""
        return self._unfinished.get(request_id)

    # ------------------------------------------------------------------ intake

    def add_request(self, request: Request, *, forked: bool = False) -> None:
        """Validate `request` and queue it (first come, first served).

        The request was validated when it was built (InputProcessor); this checks what
        only the scheduler knows. Raises ValueError for a prompt larger than the whole KV
        pool, a duplicate `request_id`, or a request that is not fresh. With
        `forked=True` (see `add_forked`) the request already holds the pages of its first
        `num_computed_tokens` prompt tokens (shared with another request, at least one
        prompt token left to prefill); only the rest of its prompt is prefilled.
        """
        check_admissible(request, self.block_manager, self.max_num_seqs,
                         in_use=self._unfinished, forked=forked)
        self._unfinished[request.request_id] = request
        for child in request.pending_children:
            self._unfinished[child.request_id] = child
        self.waiting.append(request)

    def abort(self, request_id: str) -> Optional[Request]:
        """Stop a waiting or running request, free its pages; returns it (None if unknown)."""
        request = self._unfinished.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        else:  # a parallel-sampling child not forked yet
            for parent in list(self.waiting) + self.running:
                if request in parent.pending_children:
                    parent.pending_children.remove(request)
        self._finish(request, "abort")
        return request

    def add_forked(self, request: Request, parent: Request, num_cached_tokens: int) -> None:
        """Queue `request` on top of pages `parent` holds: it shares them (by reference
        count) for its first `num_cached_tokens` prompt tokens and prefills only the rest.
        Raises ValueError as `add_request` (nothing is kept then)."""
        request.kv_weights_version = parent.kv_weights_version
        shared_block_ids = parent.block_ids[:self.block_manager.blocks_needed(
            max(num_cached_tokens, 0))]
        if shared_block_ids and num_cached_tokens > 0:
            request.block_ids = self.block_manager.fork(shared_block_ids)
            request.num_computed_tokens = num_cached_tokens
        try:
            self.add_request(request, forked=True)
        except BaseException:
            self.block_manager.free(request)
            request.num_computed_tokens = 0
            raise

    def finish_request(self, request_id: str, reason: str,
                       stop_reason: Optional[int | str] = None) -> list[Request]:
        """End a running request now (a stop rule fired), free its pages; returns every
        request ended ([] if unknown or already finished)."""
        request = self._unfinished.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING:
            return []
        self.running.remove(request)
        return self._finish(request, reason, stop_reason)

    def finish_requests(self, decisions: Sequence) -> list[Request]:
        """End each request of `decisions` (output_processor.StopDecision); returns every
        request ended."""
        ended = []
        for decision in decisions:
            ended += self.finish_request(decision.request.request_id,
                                         decision.finish_reason, decision.stop_reason)
        return ended

    def reserve(self, rows: Sequence[tuple[Request, int]],
                num_positions: int) -> Optional[list[tuple[int, int]]]:
        """Pages for `num_positions` positions from each (request, start position) row on,
        for decode calls that run several steps: private copies of shared pages (the
        page copies to run first are returned), or None when the pool cannot hold them
        (pages reserved so far stay with their requests)."""
        copies = []
        for request, start in rows:
            end = start + num_positions
            row_copies = self.block_manager.copy_on_write(request, start, end)
            if row_copies is None or not self.block_manager.ensure_capacity(request, end):
                return None
            copies += row_copies
        return copies

    # ------------------------------------------------------------------ one step

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch within the token, sequence and KV-page budgets."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # Running requests first: decodes keep their latency low and unfinished prefill
        # chunks make progress before anyone new is admitted.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            target = request.num_computed_tokens + num_new
            fits = self._reserve(request, target, out)
            while not fits:
                if len(self.running) == 1:
                    # Alone and still too big: the sequence has outgrown the whole pool,
                    # and preempting it would only loop forever. The pool caps its length.
                    self.running.pop()
                    out.finished.extend(self._finish(request, "length"))
                    break
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
                fits = self._reserve(request, target, out)
            if not fits:
                break
            out.scheduled.append(ScheduledRequest(request, num_new,
                                                  request.num_computed_tokens))
            budget -= num_new
            i += 1

        # A preemption means the pool is exhausted: admitting new work now would only be
        # preempted again (vLLM V1 does the same).
        if out.preempted:
            return self._apply_forks(self._end_at_bucket(out))

        while self.waiting and budget > 0:
            request = self.waiting[0]
            if self._num_seats() + 1 + len(request.pending_children) > self.max_num_seqs:
                break
            looked_up = not request.block_ids  # a fork already holds its shared pages
            cached = bm.take_cached_prefix(request) if looked_up else 0
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            target = request.num_computed_tokens + num_new
            if request.block_ids:
                # Shared pages (a fork's, a cached tail) are copied before they are written.
                fits = bm.can_allocate(bm.num_blocks_to_write(
                    request, request.num_computed_tokens, target))
                fits = fits and self._reserve(request, target, out)
            else:
                fits = bm.ensure_capacity(request, target)
            if not fits:
                if cached:  # give the pages back (they stay cached)
                    bm.free(request)
                    request.num_computed_tokens = 0
                elif request.block_ids and not self.running:
                    # Pages kept by finished requests (retain_blocks) may fill the pool:
                    # drop the shared prefix and retry as a plain recompute.
                    bm.free(request)
                    request.num_computed_tokens = 0
                    continue
                if not self.running:
                    # An empty pool can't take even this chunk: the sequence is longer than
                    # the pool can ever hold, so waiting would block the queue forever.
                    self.waiting.popleft()
                    out.finished.extend(self._finish(request, "length"))
                    continue
                # Never preempt for a waiting request: running ones have priority.
                break
            self.waiting.popleft()
            if looked_up:
                bm.record_prefix_lookup(request, cached)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new,
                                                  request.num_computed_tokens))
            budget -= num_new
        return self._apply_forks(self._end_at_bucket(out))

    def _num_seats(self) -> int:
        """Sequences running plus the children their parents will fork (reserved seats)."""
        return len(self.running) + sum(len(r.pending_children) for r in self.running)

    def _reserve(self, request: Request, target: int, out: SchedulerOutput) -> bool:
        """Make `request` able to write positions [num_computed_tokens, target): private
        copies of shared pages it writes into (copy-on-write) and room to grow."""
        copies = self.block_manager.copy_on_write(request, request.num_computed_tokens,
                                                  target)
        if copies is None:
            return False
        out.copies.extend(copies)
        return self.block_manager.ensure_capacity(request, target)

    def _end_at_bucket(self, out: SchedulerOutput) -> SchedulerOutput:
        """`out` with its newest prompt chunks shortened (each keeps a token) so the step
        stops at the bucket below it where that saves padding; as it was when it can't.
        Pages reserved past a shortened chunk's end stay its own, written next step."""
        total = out.num_batched_tokens
        cut = total - bucket_aligned_total(total, self.token_buckets) if self.token_buckets else 0
        if cut <= 0 or cut > sum(c.num_new_tokens - 1 for c in out.scheduled):
            return out
        for i in reversed(range(len(out.scheduled))):
            chunk = out.scheduled[i]
            take = min(cut, chunk.num_new_tokens - 1)  # decodes feed one token: never cut
            if take > 0:
                out.scheduled[i] = ScheduledRequest(chunk.request, chunk.num_new_tokens - take,
                                                    chunk.start_position)
                cut -= take
        return out

    def _apply_forks(self, out: SchedulerOutput) -> SchedulerOutput:
        """Fork the pending children of parents whose prompt completes this step: each
        shares the parent's prompt pages (ref counts) and samples its first token from the
        parent's logits in this very step (a zero-token chunk scheduled last). Also drops
        page copies whose destination a preemption in this step freed again."""
        forks = [c.request for c in out.scheduled if c.samples and c.request.pending_children]
        for parent in forks:
            prompt_len = len(parent.prompt_token_ids)
            for child in parent.pending_children:
                child.block_ids = self.block_manager.fork(parent.block_ids)
                child.kv_weights_version = parent.kv_weights_version
                child.num_computed_tokens = prompt_len
                child.status = RequestStatus.RUNNING
                child.first_scheduled_time = time.monotonic()
                self.running.append(child)
                out.scheduled.append(ScheduledRequest(child, 0, prompt_len,
                                                      logits_source=parent))
            parent.pending_children = []
        if out.copies:
            live = {b for chunk in out.scheduled for b in chunk.request.block_ids}
            by_dst = {dst: src for src, dst in out.copies if dst in live}
            out.copies = [(src, dst) for dst, src in by_dst.items()]
        return out

    def update(self, output: SchedulerOutput,
               sampled_token_ids: Sequence[int]) -> list[Request]:
        """Apply a step's results: advance each chunk's cache and append the tokens of
        chunks that sample. Stop rules are the output processor's (`finish_requests`
        ends what it decides). Returns the requests the scheduler ended itself in
        `schedule` (pass every output here, even an empty one).

        `sampled_token_ids[i]` belongs to `output.scheduled[i]` and is ignored for chunks
        that don't sample; extra trailing entries (batch padding) are ignored.
        """
        if len(sampled_token_ids) < len(output.scheduled):
            raise ValueError(
                f"sampled_token_ids: got {len(sampled_token_ids)} ids for "
                f"{len(output.scheduled)} scheduled requests")
        for index, scheduled in enumerate(output.scheduled):
            request = scheduled.request
            if request.is_finished:
                continue  # aborted between schedule() and update()
            request.num_computed_tokens += scheduled.num_new_tokens
            self.block_manager.cache_full_blocks(request, scheduled.start_position)
            if not scheduled.samples:
                continue
            request.output_token_ids.append(int(sampled_token_ids[index]))
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
        return list(output.finished)

    # ------------------------------------------------------------------ helpers

    def kv_waste(self) -> float:
        """Block-tail waste of the running requests (BlockManager.waste)."""
        return self.block_manager.waste(self.running)

    def _preempt(self, request: Request) -> None:
        # Recompute, not swap: dropping the KV is cheap here and re-prefill is one chunked
        # pass. Going to the front keeps it ahead of requests that arrived after it.
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.appendleft(request)

    def release(self, request: Request) -> None:
        """Free the pages a finished `retain_blocks` request kept (no-op otherwise)."""
        if self._retained.pop(id(request), None) is not None:
            self.block_manager.free(request)

    @property
    def num_retained(self) -> int:
        """Finished requests whose pages are kept until `release`."""
        return len(self._retained)

    def _finish(self, request: Request, reason: str,
                stop_reason: Optional[int | str] = None) -> list[Request]:
        """End `request` and free its pages (kept until `release` with retain_blocks,
        unless aborted); children it never forked end with it. Returns every request
        ended."""
        if request.retain_blocks and reason != "abort":
            self._retained[id(request)] = request
        else:
            self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        request.finished_time = time.monotonic()
        self._unfinished.pop(request.request_id, None)
        ended = [request]
        children, request.pending_children = request.pending_children, []
        for child in children:
            ended += self._finish(child, reason, stop_reason)
        return ended
