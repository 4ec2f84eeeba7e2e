"""What the scheduler checks before it queues a request (the rest was checked when the
request was built, by the input processor)."""

from __future__ import annotations

from typing import Container

from .block_manager import BlockManager
from .request import Request, RequestStatus


def check_admissible(request: Request, bm: BlockManager, max_num_seqs: int, *,
                     in_use: Container[str], forked: bool = False) -> None:
    """Raise ValueError unless `request` fits the pool, has an id not `in_use`, is fresh
    (or, `forked`, holds exactly the pages of its cached tokens) and its n sequences fit
    `max_num_seqs`."""
    prompt_len = len(request.prompt_token_ids)
    needed = bm.blocks_needed(prompt_len)
    if needed > bm.num_usable_blocks:
        raise ValueError(
            f"prompt: {prompt_len} tokens need {needed} KV blocks but the pool has only "
            f"{bm.num_usable_blocks} usable (num_blocks={bm.num_blocks}, "
            f"block_size={bm.block_size})")
    if request.request_id in in_use:
        raise ValueError(f"request_id: {request.request_id!r} is already in use")
    cached = request.num_computed_tokens
    if forked:
        not_fresh = not (0 <= cached < prompt_len
                         and len(request.block_ids) == bm.blocks_needed(cached))
    else:
        not_fresh = bool(request.block_ids or cached)
    if request.status is not RequestStatus.WAITING or not_fresh:
        raise ValueError(
            f"request: {request.request_id!r} is not a fresh request "
            f"(status={request.status.value}, num_computed_tokens="
            f"{request.num_computed_tokens}, {len(request.block_ids)} blocks)")
    if 1 + len(request.pending_children) > max_num_seqs:
        raise ValueError(
            f"n: {1 + len(request.pending_children)} parallel sequences exceed "
            f"max_num_seqs={max_num_seqs}")
    for child in request.pending_children:
        if child.request_id in in_use or child.request_id == request.request_id:
            raise ValueError(f"request_id: {child.request_id!r} is already in use")
