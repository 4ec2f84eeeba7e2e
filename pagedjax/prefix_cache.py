"""Automatic prefix caching: full KV pages found again by a hash of everything before them.

A full page's key hashes (its parent page's key, its token ids, extra keys); the extra keys
hold what changes the KV of the same tokens: the weights version, bumped by every weight
update, so no page computed with old weights is ever found again. Only full pages are
cached, and a page is never written once full, so sharing it is safe.

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
            extra = (self.weights_version,)
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
        """Pages holding a key, free or in use."""
        return len(self._key_of)

    def evictable_blocks(self) -> list[int]:
        """The free pages holding a key, least recently used first."""
        return list(self._evictable)

    def park(self, page: int) -> bool:
        """A page's last reference went away: keep it findable at the queue's tail (most
        recently used) if it holds a key; False if it holds none."""
        if page not in self._key_of:
            return False
        self._evictable[page] = None
        return True

    def unpark(self, page: int) -> None:
        """A free page was found again: it is in use, no longer evictable."""
        self._evictable.pop(page, None)

    def evict(self) -> int:
        """Take the least recently used free page, forgetting its key."""
        page, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(page)]
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
        return pages
