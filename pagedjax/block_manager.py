"""BlockManager: host-side allocator of fixed-size KV-cache pages (PagedAttention blocks).

Plain Python + numpy on purpose: the allocator runs once per step on the host and must never
be traced or jitted.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Iterable, Optional, Sequence

import numpy as np

from .prefix_cache import PrefixCache
from .request import Request

NULL_BLOCK = 0
"""Page 0 is never handed out: padded token slots write there and padded sequences point there."""


class BlockManager:
    """Hands out KV-cache pages of `block_size` token slots from a pool of `num_blocks` pages.

    Page 0 is the reserved null page, so `num_blocks - 1` pages are usable. Pages are
    reference counted (int32 numpy array) so that `fork` can share them between sequences;
    a page returns to the free list when its count drops to 0.

    The free list is FIFO: a freed page goes to the back and is reused last, which spreads
    writes over the whole pool. With a `prefix_cache` (prefix_cache.PrefixCache), full
    pages keep their key when freed and stay findable in the cache's LRU queue; allocation
    takes pages from the free list first and evicts from that queue after.
    """

    def __init__(self, num_blocks: int, block_size: int,
                 prefix_cache: Optional[PrefixCache] = None):
        _check_int("num_blocks", num_blocks, minimum=2)
        _check_int("block_size", block_size, minimum=1)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._ref_counts = np.zeros(num_blocks, dtype=np.int32)
        self._free: deque[int] = deque(range(1, num_blocks))

    # ------------------------------------------------------------------ sizes and stats

    @property
    def num_usable_blocks(self) -> int:
        """Pages that can ever be handed out (all but the null page)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Pages no sequence references (cached ones included: they can be evicted)."""
        return len(self._free) + self._num_evictable()

    @property
    def num_used_blocks(self) -> int:
        """Pages currently referenced by at least one sequence."""
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable pages in use, in [0, 1]."""
        return self.num_used_blocks / self.num_usable_blocks

    def ref_count(self, block_id: int) -> int:
        """How many sequences reference `block_id` (0 when it is free)."""
        return int(self._ref_counts[block_id])

    def blocks_needed(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens (ceiling division)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def waste(self, requests: Iterable[Request]) -> float:
        """Fraction of the KV slots allocated to `requests` that hold no token.

        `waste = 1 - tokens_held / slots_allocated`, where a request's slots are
        `len(block_ids) * block_size` and it holds `min(num_computed_tokens, slots)` tokens.
        Only the unfilled tail of each sequence's last page should count, so a healthy
        engine keeps this small. Returns 0.0 when nothing is allocated.
        """
        slots = 0
        held = 0
        for request in requests:
            request_slots = len(request.block_ids) * self.block_size
            slots += request_slots
            held += min(request.num_computed_tokens, request_slots)
        if slots == 0:
            return 0.0
        return 1.0 - held / slots

    # ------------------------------------------------------------------ allocation

    def can_allocate(self, n_blocks: int) -> bool:
        """True when `n_blocks` pages are free right now."""
        return n_blocks <= self.num_free_blocks

    def allocate(self, n_blocks: int) -> list[int]:
        """Take `n_blocks` pages off the free list, each with reference count 1.

        Raises RuntimeError when fewer than `n_blocks` pages are free (nothing is taken).
        """
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        if not self.can_allocate(n_blocks):
            raise RuntimeError(
                f"out of KV blocks: asked for {n_blocks}, {self.num_free_blocks} free "
                f"of {self.num_usable_blocks} usable")
        block_ids = [self._free.popleft() if self._free else self.prefix_cache.evict()
                     for _ in range(n_blocks)]
        self._ref_counts[block_ids] = 1
        return block_ids

    def take_cached(self, block_ids: Sequence[int]) -> list[int]:
        """Add a reference to each page of a prefix-cache hit (a free one leaves the
        eviction queue); returns a copy of the ids."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                self.prefix_cache.unpark(block_id)
            self._ref_counts[block_id] += 1
        return list(block_ids)

    def ensure_capacity(self, request: Request, num_tokens: int) -> bool:
        """Grow `request.block_ids` so it can hold `num_tokens` tokens.

        Returns False, allocating nothing, when the pool has too few free pages. Never
        shrinks. Writing into a page shared through `fork` needs `copy_on_write` first.
        """
        missing = self.blocks_needed(num_tokens) - len(request.block_ids)
        if missing <= 0:
            return True
        if not self.can_allocate(missing):
            return False
        request.block_ids.extend(self.allocate(missing))
        return True

    def copy_on_write(self, request: Request, start: int,
                      end: int) -> Optional[list[tuple[int, int]]]:
        """Make the pages holding token positions [start, end) of `request` private before
        it writes them: each one shared with another sequence (ref count > 1) or kept as a
        prefix-cache tail is replaced by a fresh page and one reference to it is dropped.

        Returns the (src, dst) page copies the caller must run on the device before the
        write (the dst pages must get the src pages' filled slots), [] when nothing is
        shared, or None, changing nothing, when the pool has too few free pages.
        """
        if end <= start:
            return []
        shared = self._shared_pages_written(request, start, end)
        if not self.can_allocate(len(shared)):
            return None
        copies = []
        for i, fresh in zip(shared, self.allocate(len(shared))):
            src = request.block_ids[i]
            self.free_blocks([src])  # a tail's last reference: it goes back, still cached
            request.block_ids[i] = fresh
            copies.append((src, fresh))
        return copies

    def num_blocks_to_write(self, request: Request, start: int, end: int) -> int:
        """Free pages `copy_on_write(request, start, end)` followed by
        `ensure_capacity(request, end)` would take: the shared pages holding positions
        [start, end) plus the pages still missing up to `end`."""
        if end <= start:
            return 0
        shared = self._shared_pages_written(request, start, end)
        return len(shared) + max(0, self.blocks_needed(end) - len(request.block_ids))

    def fork(self, block_ids: Sequence[int]) -> list[int]:
        """Share already-allocated pages with another sequence; returns a copy of the ids.

        Each page's reference count goes up by one, so it stays allocated until every sharer
        has freed it.
        """
        block_ids = list(block_ids)
        for block_id in block_ids:
            self._check_live(block_id)
        np.add.at(self._ref_counts, block_ids, 1)
        return block_ids

    def free_blocks(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each page; pages reaching 0 go back on the free list."""
        # Validate everything before mutating so a bad call leaves the books untouched; a page
        # named twice counts as two frees and needs two references.
        for block_id, times in Counter(block_ids).items():
            self._check_live(block_id)
            if self._ref_counts[block_id] < times:
                raise RuntimeError(
                    f"block {block_id} freed {times} times but has "
                    f"{int(self._ref_counts[block_id])} references (double free?)")
        for block_id in block_ids:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0 and not (
                    self.prefix_cache is not None and self.prefix_cache.park(block_id)):
                self._free.append(block_id)

    def free(self, request: Request) -> None:
        """Release every page of `request` and clear its `block_ids`. With a prefix cache
        the deepest page goes back first, so shared roots are evicted last, and a partly
        filled last page this frees stays findable as a tail."""
        if self.prefix_cache is not None:
            self._keep_tail(request)
            self.free_blocks(request.block_ids[::-1])
        else:
            self.free_blocks(request.block_ids)
        request.block_ids.clear()

    def take_cached_prefix(self, request: Request) -> int:
        """Give a request that holds no pages the longest cached run of its full pages,
        then the cached tail sharing the most tokens after them (the last token always left
        to compute); returns the tokens found. The request must write through
        `copy_on_write`, which copies a tail before it is written. Requests
        asking for prompt logprobs compute every position, so they look nothing up."""
        cache = self.prefix_cache
        if cache is None:
            return 0
        request.kv_weights_version = cache.weights_version
        if request.sampling_params.prompt_logprobs is not None:
            return 0
        request.block_ids = self.take_cached(cache.longest_prefix(request))
        num_full = len(request.block_ids)
        tail, num_tail_tokens = cache.longest_tail(request, num_full)
        if num_tail_tokens:  # shared until written: copy_on_write copies it first
            request.block_ids += self.take_cached([tail])
        request.num_computed_tokens = num_full * self.block_size + num_tail_tokens
        return request.num_computed_tokens

    def record_prefix_lookup(self, request: Request, num_cached_tokens: int) -> None:
        """Count an admitted request's cache lookup; its first sets num_cached_tokens."""
        if self.prefix_cache is None:
            return
        self.prefix_cache.record_query(request.num_tokens, num_cached_tokens)
        if request.num_cached_tokens is None:
            request.num_cached_tokens = num_cached_tokens

    def cache_full_blocks(self, request: Request, num_computed_before: int) -> None:
        """Make the pages `request` filled since it had `num_computed_before` tokens
        findable, if its KV was computed with the current weights."""
        cache = self.prefix_cache
        if cache is None or request.kv_weights_version != cache.weights_version:
            return
        first = num_computed_before // self.block_size
        last = request.num_computed_tokens // self.block_size
        if last > first:
            cache.register(request, request.block_ids, first, last)

    def reset_prefix_cache(self) -> None:
        """Forget every cached page (free ones become plain free pages)."""
        if self.prefix_cache is not None:
            self._free.extend(self.prefix_cache.reset())

    def _keep_tail(self, request: Request) -> None:
        """File the partly filled page holding `request`'s last computed positions as a
        prefix-cache tail if this free is its last reference and its KV is of the current
        weights."""
        cache = self.prefix_cache
        computed = request.num_computed_tokens
        index = computed // self.block_size
        if (computed % self.block_size == 0 or index >= len(request.block_ids)
                or request.kv_weights_version != cache.weights_version):
            return
        page = request.block_ids[index]
        if self._ref_counts[page] == 1:
            cache.register_tail(request, page, computed)

    def _shared_pages_written(self, request: Request, start: int, end: int) -> list[int]:
        """Indices into `request.block_ids` of the pages holding positions [start, end)
        that a write must copy first: shared with another sequence, or a cached tail."""
        first = start // self.block_size
        last = min(len(request.block_ids), self.blocks_needed(end))
        cache = self.prefix_cache
        return [i for i in range(first, last)
                if self._ref_counts[request.block_ids[i]] > 1
                or (cache is not None and cache.is_tail(request.block_ids[i]))]

    def _num_evictable(self) -> int:
        return 0 if self.prefix_cache is None else self.prefix_cache.num_evictable

    def check_no_leak(self) -> None:
        """Raise RuntimeError unless every usable page is free and the books balance.

        Call when no request holds pages (tests, engine shutdown).
        """
        used = np.flatnonzero(self._ref_counts)
        free = list(self._free)
        if self.prefix_cache is not None:
            free += self.prefix_cache.evictable_blocks()
        if used.size or len(free) != self.num_usable_blocks or len(set(free)) != len(free):
            raise RuntimeError(
                f"KV block leak: {self.num_used_blocks} pages in use "
                f"(ids with references: {used[:16].tolist()}), "
                f"{len(free)} on the free list of {self.num_usable_blocks} usable")
        if NULL_BLOCK in free:
            raise RuntimeError("KV block accounting broken: null page 0 is on the free list")

    def _check_live(self, block_id: int) -> None:
        if not 0 < block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is not a usable page "
                             f"(1..{self.num_blocks - 1})")
        if self._ref_counts[block_id] <= 0:
            raise RuntimeError(f"block {block_id} is not allocated (double free?)")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
