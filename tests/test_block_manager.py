"""BlockManager: page allocation, reference counting, capacity growth and stats (no JAX)."""

import pytest

from pagedjax.block_manager import BlockManager
from pagedjax.request import Request
from pagedjax.sampling_params import SamplingParams


def make_request(request_id="r", num_computed=0, block_ids=()):
    request = Request(request_id, [1, 2, 3], SamplingParams(), seed=0)
    request.num_computed_tokens = num_computed
    request.block_ids = list(block_ids)
    return request


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_blocks=1, block_size=16), "num_blocks"),
    (dict(num_blocks=0, block_size=16), "num_blocks"),
    (dict(num_blocks=8, block_size=0), "block_size"),
    (dict(num_blocks=8.0, block_size=16), "num_blocks"),
    (dict(num_blocks=8, block_size=True), "block_size"),
])
def test_constructor_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BlockManager(**kwargs)


def test_smallest_pool_has_one_usable_block():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert bm.num_usable_blocks == 1
    assert bm.allocate(1) == [1]
    assert not bm.can_allocate(1)


@pytest.mark.parametrize("num_tokens, expected", [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_needed_is_ceil_division(num_tokens, expected):
    assert BlockManager(num_blocks=16, block_size=4).blocks_needed(num_tokens) == expected


def test_allocate_hands_out_unique_non_null_blocks_until_exhausted():
    bm = BlockManager(num_blocks=6, block_size=4)
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 0 and bm.usage == 0.0
    first = bm.allocate(3)
    second = bm.allocate(2)
    all_ids = first + second
    assert sorted(all_ids) == [1, 2, 3, 4, 5]  # page 0 is reserved, never handed out
    assert all(bm.ref_count(b) == 1 for b in all_ids)
    assert bm.ref_count(0) == 0
    assert bm.num_free_blocks == 0 and bm.num_used_blocks == 5 and bm.usage == 1.0
    assert not bm.can_allocate(1)
    assert bm.can_allocate(0)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(1)


def test_failed_allocate_takes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(2)
    with pytest.raises(RuntimeError):
        bm.allocate(2)
    assert bm.num_free_blocks == 1
    assert bm.allocate(1) == [3]


def test_free_list_is_fifo():
    bm = BlockManager(num_blocks=5, block_size=4)
    assert bm.allocate(4) == [1, 2, 3, 4]
    bm.free_blocks([3])
    bm.free_blocks([1])
    # The page freed first is reused first.
    assert bm.allocate(2) == [3, 1]


def test_ensure_capacity_grows_incrementally_and_never_shrinks():
    bm = BlockManager(num_blocks=5, block_size=4)
    request = make_request()
    assert bm.ensure_capacity(request, 3)
    assert len(request.block_ids) == 1
    assert bm.ensure_capacity(request, 4)
    assert len(request.block_ids) == 1  # 4 tokens still fit in one page
    assert bm.ensure_capacity(request, 5)
    assert len(request.block_ids) == 2
    kept = list(request.block_ids)
    assert bm.ensure_capacity(request, 1)
    assert request.block_ids == kept
    assert bm.num_used_blocks == 2


def test_ensure_capacity_refuses_without_allocating_anything():
    bm = BlockManager(num_blocks=5, block_size=4)  # 4 usable pages = 16 slots
    hog = make_request("hog")
    assert bm.ensure_capacity(hog, 8)
    request = make_request()
    assert bm.ensure_capacity(request, 4)
    assert not bm.ensure_capacity(request, 13)  # needs 4 pages, only 1 more is free
    assert len(request.block_ids) == 1
    assert bm.num_free_blocks == 1
    assert bm.ensure_capacity(request, 8)
    assert bm.num_free_blocks == 0


def test_free_returns_blocks_and_clears_request():
    bm = BlockManager(num_blocks=5, block_size=4)
    request = make_request()
    bm.ensure_capacity(request, 10)
    ids = list(request.block_ids)
    bm.free(request)
    assert request.block_ids == []
    assert all(bm.ref_count(b) == 0 for b in ids)
    assert bm.num_free_blocks == 4
    bm.check_no_leak()


def test_double_free_is_an_error_and_leaves_books_intact():
    bm = BlockManager(num_blocks=5, block_size=4)
    ids = bm.allocate(2)
    bm.free_blocks([ids[0]])
    with pytest.raises(RuntimeError, match="double free"):
        bm.free_blocks([ids[1], ids[0]])
    assert bm.ref_count(ids[1]) == 1  # the valid id in the bad call was not freed
    with pytest.raises(RuntimeError):
        bm.free_blocks([ids[1], ids[1]])
    assert bm.ref_count(ids[1]) == 1
    with pytest.raises(ValueError):
        bm.free_blocks([0])  # the null page is never owned
    bm.free_blocks([ids[1]])
    bm.check_no_leak()


def test_fork_shares_blocks_until_every_owner_frees():
    bm = BlockManager(num_blocks=5, block_size=4)
    parent = make_request("parent")
    bm.ensure_capacity(parent, 8)
    child = make_request("child", block_ids=bm.fork(parent.block_ids))
    assert child.block_ids == parent.block_ids
    assert child.block_ids is not parent.block_ids
    assert all(bm.ref_count(b) == 2 for b in parent.block_ids)
    assert bm.num_used_blocks == 2  # sharing costs no extra pages
    shared = list(parent.block_ids)
    bm.free(parent)
    assert all(bm.ref_count(b) == 1 for b in shared)
    assert bm.num_free_blocks == 2
    bm.free(child)
    assert bm.num_free_blocks == 4
    bm.check_no_leak()


def test_fork_of_a_free_block_is_an_error():
    bm = BlockManager(num_blocks=5, block_size=4)
    with pytest.raises(RuntimeError):
        bm.fork([2])
    with pytest.raises(ValueError):
        bm.fork([0])
    assert bm.ref_count(2) == 0


def test_check_no_leak_detects_held_blocks():
    bm = BlockManager(num_blocks=5, block_size=4)
    bm.check_no_leak()
    request = make_request()
    bm.ensure_capacity(request, 1)
    with pytest.raises(RuntimeError, match="leak"):
        bm.check_no_leak()
    bm.free(request)
    bm.check_no_leak()


def test_waste_hand_checked_example():
    bm = BlockManager(num_blocks=16, block_size=4)
    # 2 pages (8 slots) holding 5 tokens; 1 page (4 slots) holding 4; 2 pages whose
    # request counts 10 computed tokens but can only hold 8 (clamped to the slots).
    requests = [make_request("a", 5, [1, 2]), make_request("b", 4, [3]),
                make_request("c", 10, [4, 5])]
    # slots = 8 + 4 + 8 = 20, held = 5 + 4 + 8 = 17
    assert bm.waste(requests) == pytest.approx(3 / 20)
    assert bm.waste(requests[1:2]) == 0.0
    assert bm.waste([make_request("d", 1, [6, 7])]) == pytest.approx(7 / 8)


def test_waste_of_nothing_allocated_is_zero():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.waste([]) == 0.0
    assert bm.waste([make_request("empty", 0, [])]) == 0.0
