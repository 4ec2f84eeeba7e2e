"""Automatic prefix caching: full KV pages found again by a hash of everything before them.

A full page's key hashes (its parent page's key, its token ids, extra keys); the extra keys
hold what changes the KV of the same tokens: the weights version, bumped by every weight
update, so no page computed with old weights is ever found again. A page is never written
once full, so sharing a full page is safe.

A sequence's partly filled last page (its "tail": a chat turn's history ends in one) is
kept too when the sequence lets go of it, filed under its parent page's key with the
tokens it holds; a later prompt that continues that parent takes the tail whose tokens
share the most leading ones with its own. The KV of a position depends only on the tokens
up to it, so those shared positions are reusable even where the prompt goes on
differently. A tail is never written: a request that takes one gets a private copy before
its first write (the block manager treats it as shared, copy-on-write), so the next turn
of a chat recomputes only its new tokens, not the rest of its history's last page.

Pages whose last reference goes away keep their key and stay findable in an LRU queue of
free pages; allocation takes a page that holds no key first, then evicts from the queue's
head. Host side only: plain Python.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from typing import Any, Hashable, Optional, Sequence

HASH_ALGOS = ("builtin", "sha256")
# Tails filed under one parent at most: a lookup compares the prompt with each of them, so
# thousands of short prompts ending under the root page must not make admission slow.
MAX_TAILS_PER_PARENT = 32


def block_key(parent: Optional[Hashable], token_ids: Sequence[int], extra: tuple,
              algo: str = "builtin") -> Hashable:
    """The key of a full page: Python's tuple hash ("builtin": fast, 64 bits) or a
    SHA-256 digest ("sha256": no collision can be provoked, for multi-tenant servers)."""
    if algo == "sha256":
        payload = pickle.dumps((parent, tuple(token_ids), extra), protocol=5)
        return hashlib.sha256(payload).digest()
    return hash((parent, tuple(token_ids), extra))


class PrefixCache:
    """Which page holds which key, and the LRU queue of free pages that hold one."""

    def __init__(self, block_size: int, hash_algo: str = "builtin"):
        if hash_algo not in HASH_ALGOS:
            raise ValueError(f"prefix_caching_hash_algo must be one of {HASH_ALGOS}, "
                             f"got {hash_algo!r}")
        self.block_size = block_size
        self.hash_algo = hash_algo
        self.weights_version = 0
        self._block_of: dict[Hashable, int] = {}
        self._key_of: dict[int, Hashable] = {}
        # Tails: (parent key, extra keys) -> {page: the tokens it holds}, and back.
        self._tails: dict[tuple, dict[int, tuple]] = {}
        self._tail_index_of: dict[int, tuple] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ---- keys ----------------------------------------------------------------------

    def keys_for(self, request: Any, num_blocks: int) -> list[Hashable]:
        """The keys of `request`'s first `num_blocks` full pages (kept on the request and
        extended as it grows; recomputed after a weight update)."""
        keys = request.block_hashes
        if request.block_hashes_version != self.weights_version:
            keys.clear()
            request.block_hashes_version = self.weights_version
        if len(keys) < num_blocks:
            tokens = request.all_token_ids
            extra = self._extra_keys()
            size = self.block_size
            parent = keys[-1] if keys else None
            for i in range(len(keys), num_blocks):
                parent = block_key(parent, tokens[i * size:(i + 1) * size], extra,
                                   self.hash_algo)
                keys.append(parent)
        return keys[:num_blocks]

    def longest_prefix(self, request: Any) -> list[int]:
        """The pages holding the longest cached run of `request`'s full pages, leaving at
        least its last token to compute (its logits are needed)."""
        num_blocks = (request.num_tokens - 1) // self.block_size
        pages = []
        for key in self.keys_for(request, num_blocks):
            page = self._block_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def _extra_keys(self) -> tuple:
        return (self.weights_version,)

    def _tail_index(self, request: Any, num_full: int) -> tuple:
        """Where the tails that follow `request`'s first `num_full` full pages are filed."""
        parent = self.keys_for(request, num_full)[-1] if num_full else None
        return parent, self._extra_keys()

    def longest_tail(self, request: Any, num_full: int) -> tuple[int, int]:
        """(page, shared tokens) of the cached tail that shares the most leading tokens
        with `request`'s positions after its first `num_full` full pages, leaving its last
        token to compute; (0, 0) when no tail shares one."""
        candidates = self._tails.get(self._tail_index(request, num_full))
        if not candidates:
            return 0, 0
        start = num_full * self.block_size
        wanted = request.all_token_ids[start:request.num_tokens - 1]
        best_page, best = 0, 0
        for page, tokens in candidates.items():
            shared = 0
            for have, want in zip(tokens, wanted):
                if have != want:
                    break
                shared += 1
            if shared > best:
                best_page, best = page, shared
        return best_page, best

    def register_tail(self, request: Any, page: int, num_tokens: int) -> None:
        """File `page`, the partly filled page holding `request`'s computed positions
        after its full pages (up to `num_tokens`), as a tail; a page already holding a key
        keeps it, and a parent with MAX_TAILS_PER_PARENT tails takes no more."""
        if page in self._key_of or page in self._tail_index_of:
            return
        num_full = num_tokens // self.block_size
        index = self._tail_index(request, num_full)
        tails = self._tails.setdefault(index, {})
        if len(tails) >= MAX_TAILS_PER_PARENT:
            return
        tails[page] = tuple(request.all_token_ids[num_full * self.block_size:num_tokens])
        self._tail_index_of[page] = index

    def is_tail(self, page: int) -> bool:
        """Whether `page` is a cached tail (never written: takers copy it first)."""
        return page in self._tail_index_of

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (in tokens)."""
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def register(self, request: Any, block_ids: Sequence[int], first: int, last: int) -> None:
        """Make `request`'s full pages [first, last) findable. A key already held by
        another page keeps that page (this one stays a plain page)."""
        keys = self.keys_for(request, last)
        for i in range(first, last):
            key, page = keys[i], block_ids[i]
            if key not in self._block_of and page not in self._key_of:
                self._block_of[key] = page
                self._key_of[page] = key

    # ---- the free pages that hold a key ----------------------------------------------

    @property
    def num_evictable(self) -> int:
        """Free pages still holding a key (findable until evicted)."""
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Pages holding a key or filed as a tail, free or in use."""
        return len(self._key_of) + len(self._tail_index_of)

    def evictable_blocks(self) -> list[int]:
        """The free pages holding a key, least recently used first."""
        return list(self._evictable)

    def park(self, page: int) -> bool:
        """A page's last reference went away: keep it findable at the queue's end (most
        recently used) if it holds a key or is a tail; False if neither."""
        if page not in self._key_of and page not in self._tail_index_of:
            return False
        self._evictable[page] = None
        return True

    def unpark(self, page: int) -> None:
        """A free page was found again: it is in use, no longer evictable."""
        self._evictable.pop(page, None)

    def evict(self) -> int:
        """Take the least recently used free page, forgetting its key."""
        page, _ = self._evictable.popitem(last=False)
        if page in self._key_of:
            del self._block_of[self._key_of.pop(page)]
        else:
            index = self._tail_index_of.pop(page)
            del self._tails[index][page]
            if not self._tails[index]:
                del self._tails[index]
        return page

    def new_weights(self) -> None:
        """New weights: every cached page is unreachable from now on (no copy, no scan)."""
        self.weights_version += 1

    def reset(self) -> list[int]:
        """Forget every key; returns the free pages that held one (now plain free pages)."""
        pages = list(self._evictable)
        self._evictable.clear()
        self._block_of.clear()
        self._key_of.clear()
        self._tails.clear()
        self._tail_index_of.clear()
        return pages
