"""Automatic prefix caching: cached pages give the tokens a recompute gives, eviction is
LRU (deepest pages first, referenced ones never), a freed partial last page (tail) is
found again by its leading tokens and copied before written, weight updates make old
pages unreachable, and no page leaks."""

import jax
import numpy as np
import pytest

from pagedjax import SamplingParams
from pagedjax.block_manager import BlockManager
from pagedjax.prefix_cache import MAX_TAILS_PER_PARENT, PrefixCache, block_key
from pagedjax.request import Request
from tests.helpers.engines import make_llm, token_ids

BLOCK = 4  # TINY_ENGINE_SETTINGS' block_size
BASE = [5 + (i * 7) % 240 for i in range(3 * BLOCK)]  # three full pages
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def request_of(tokens, request_id="r"):
    return Request(request_id, list(tokens), SamplingParams(), seed=0)


def check_books(llm):
    """free + cached-free + used == the pool, and nothing is used when idle."""
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished_requests()
    bm.check_no_leak()
    assert bm.num_free_blocks == bm.num_usable_blocks


# ---------------------------------------------------------------- pages (no model)


def cache_pages(bm, request):
    """Allocate and fill `request`'s full pages, make them findable, then free them."""
    request.block_ids = bm.allocate(bm.blocks_needed(request.num_tokens))
    request.num_computed_tokens = request.num_tokens
    request.kv_weights_version = bm.prefix_cache.weights_version
    bm.cache_full_blocks(request, 0)


def test_lookup_finds_the_longest_run_and_leaves_the_last_token():
    bm = BlockManager(16, BLOCK, PrefixCache(BLOCK))
    first = request_of(BASE + [1])
    cache_pages(bm, first)
    pages = list(first.block_ids[:3])
    bm.free(first)
    assert bm.num_used_blocks == 0 and bm.prefix_cache.num_evictable == 4  # and the tail
    # 3 pages + 1 token: all three found; exactly 3 pages: the last one is recomputed
    for tokens, found in ((BASE + [9], 3), (BASE, 2), (BASE[:5] + [1] * 7, 1), ([1] * 12, 0)):
        request = request_of(tokens)
        assert bm.take_cached_prefix(request) == found * BLOCK
        assert request.block_ids == pages[:found]
        bm.free(request)
    bm.check_no_leak()


def test_eviction_is_lru_deepest_first_and_spares_referenced_pages():
    bm = BlockManager(9, BLOCK, PrefixCache(BLOCK))  # 8 usable pages, one never used
    old, new = request_of(BASE + [1], "old"), request_of([9] * 8 + [1], "new")
    cache_pages(bm, old)
    cache_pages(bm, new)
    (p1, p2, p3, old_tail), (q1, q2, new_tail) = old.block_ids, new.block_ids
    bm.free(old)
    bm.free(new)
    held = request_of(BASE[:BLOCK] + [2], "held")
    assert bm.take_cached_prefix(held) == BLOCK and held.block_ids == [p1]
    # a page holding no key goes first, then evictions, least recently freed first, each
    # sequence's deepest page (its tail) first; p1 is referenced again: never evicted
    assert bm.allocate(6) == [8, old_tail, p3, p2, new_tail, q2]
    assert bm.allocate(1) == [q1]
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(1)
    assert bm.take_cached_prefix(request_of([9] * 8 + [1], "again")) == 0  # evicted
    assert bm.take_cached_prefix(request_of(BASE[:BLOCK] + [5], "root")) == BLOCK


def test_a_freed_tail_is_found_by_its_leading_tokens_and_copied_before_written():
    bm = BlockManager(8, BLOCK, PrefixCache(BLOCK))
    first = request_of(BASE[:7])  # one full page and a tail of 3 computed tokens
    cache_pages(bm, first)
    full, tail = first.block_ids
    shared = request_of(BASE[:7], "shared")
    shared.block_ids, shared.num_computed_tokens = bm.fork(first.block_ids), 7
    shared.kv_weights_version = first.kv_weights_version
    bm.free(first)  # not the tail's last reference: nothing filed
    assert bm.take_cached_prefix(request_of(BASE[:7] + [9], "early")) == BLOCK
    bm.free_blocks([full])
    bm.free(shared)  # the last one: the tail is filed under its parent page's key
    assert bm.prefix_cache.num_cached_blocks == 2  # the full page and the tail
    # whole tail, one shared token, the last token left to compute, other parents: none
    for tokens, found in ((BASE[:7] + [9], 7), (BASE[:5] + [50, 51, 52], 5),
                          (BASE[:7], 6), ([99] + BASE[1:7] + [9], 0)):
        request = request_of(tokens)
        assert bm.take_cached_prefix(request) == found
        assert request.block_ids == [full, tail][:-(-found // BLOCK)]
        bm.free(request)
    request = request_of(BASE[:7] + [9, 10])
    bm.take_cached_prefix(request)
    assert bm.num_blocks_to_write(request, 7, 9) == 2  # a copy of the tail + one new page
    [(src, dst)] = bm.copy_on_write(request, 7, 9)
    assert src == tail and request.block_ids == [full, dst] and bm.ref_count(tail) == 0
    assert bm.prefix_cache.evictable_blocks()[-1] == tail  # back in the queue, unwritten
    bm.free(request)
    again = request_of(BASE[:7] + [9], "again")
    assert bm.take_cached_prefix(again) == 7  # still filed
    bm.free(again)
    bm.prefix_cache.new_weights()
    assert bm.take_cached_prefix(request_of(BASE[:7] + [9], "new")) == 0
    bm.reset_prefix_cache()
    bm.check_no_leak()


def test_a_parent_files_a_bounded_number_of_tails():
    bm = BlockManager(MAX_TAILS_PER_PARENT + 3, BLOCK, PrefixCache(BLOCK))
    for first in range(MAX_TAILS_PER_PARENT + 1):  # 3-token prompts: tails of the root
        request = request_of([first, 1, 2])
        cache_pages(bm, request)
        bm.free(request)
    assert bm.prefix_cache.num_evictable == MAX_TAILS_PER_PARENT  # the last one is plain
    assert bm.take_cached_prefix(request_of([0, 1, 2, 5], "a")) == 3
    assert bm.take_cached_prefix(request_of([MAX_TAILS_PER_PARENT, 1, 2, 5], "b")) == 0


def test_sha256_keys_chain_like_builtin_ones():
    a = block_key(None, [1, 2], (0,), "sha256")
    assert a == block_key(None, [1, 2], (0,), "sha256") and len(a) == 32
    assert block_key(a, [3], (0,), "sha256") != block_key(None, [3], (0,), "sha256")
    assert block_key(None, [1, 2], (1,)) != block_key(None, [1, 2], (0,))  # weights version
    with pytest.raises(ValueError, match="prefix_caching_hash_algo"):
        PrefixCache(BLOCK, "md5")


# ---------------------------------------------------------------- engine (tiny Llama)


def shared_prefix_prompts():
    """Prompts sharing 0, 1, exactly 3 and 3 pages + a few tokens with BASE."""
    return [BASE + [7], [200] + BASE[1:] + [8], BASE[:BLOCK] + [100, 101, 102],
            BASE[:3 * BLOCK], BASE + [30, 31, 32], BASE[:3 * BLOCK] + [9] * 9]


@pytest.mark.parametrize("options", [
    dict(),
    dict(max_num_batched_tokens=16),  # chunked prefill
    dict(num_blocks=14, max_model_len=40, max_num_batched_tokens=16),  # preemption
], ids=["plain", "chunked", "tiny-pool"])
def test_same_greedy_tokens_with_caching_on_and_off(tiny_llama_dir, options):
    prompts = shared_prefix_prompts()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    off = make_llm(tiny_llama_dir, enable_prefix_caching=False, **options)
    on = make_llm(tiny_llama_dir, **options)
    want = token_ids(off.generate(prompts, params, use_tqdm=False))
    assert token_ids(on.generate(prompts, params, use_tqdm=False)) == want
    # a second pass finds every prompt's pages; one at a time too
    again = on.generate(prompts, params, use_tqdm=False)
    assert token_ids(again) == want
    assert sum(o.num_cached_tokens for o in again) > 0
    for prompt, expected in zip(prompts[:2], want):
        assert token_ids(on.generate([prompt], params, use_tqdm=False)) == [expected]
    stats = on.kv_cache_stats()
    assert 0 < stats.prefix_cache_hits <= stats.prefix_cache_queries
    if "num_blocks" in options:
        assert on.engine.scheduler.num_preemptions > 0
    check_books(on)


def test_a_repeated_prompt_computes_only_its_last_token(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir)
    prompt = BASE + [3]  # three full pages and one token
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    prefilled = llm.engine.stats.num_prompt_tokens
    second = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert llm.engine.stats.num_prompt_tokens - prefilled == 1
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 3 * BLOCK)
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    # prompt logprobs need every position's logits: nothing is looked up
    with_logprobs = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1),
                                 use_tqdm=False)[0]
    assert with_logprobs.num_cached_tokens == 0
    assert len(with_logprobs.prompt_logprobs) == len(prompt)
    llm.reset_prefix_cache()
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
    check_books(llm)


def test_new_weights_never_meet_old_pages(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir)
    prompt = BASE + [3]
    llm.generate([prompt], GREEDY, use_tqdm=False)  # cached with the old weights
    compiles = llm.num_compiles
    params = jax.tree.map(lambda x: np.asarray(x) * 1.5, llm.engine.runner.params)
    if llm.engine.per_layer_matrices:  # back to the stacked form a caller hands in
        params["layers"] = {k: np.stack(v) if isinstance(v, tuple) else v
                            for k, v in params["layers"].items()}
    llm.update_params(params)
    after = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    fresh = make_llm(tiny_llama_dir, enable_prefix_caching=False)
    fresh.update_params(params)
    assert after.num_cached_tokens == 0
    assert after.outputs[0].token_ids == fresh.generate([prompt], GREEDY,
                                                        use_tqdm=False)[0].outputs[0].token_ids
    assert llm.num_compiles == compiles
    check_books(llm)


def test_a_chat_turn_recomputes_only_its_new_tokens(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir)
    off = make_llm(tiny_llama_dir, enable_prefix_caching=False)
    prompt = BASE[:10]
    history = prompt + llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    # 15 of the 16 history tokens have KV (not the last sampled one): 3 pages + 3 in a tail
    turns = [history + [40, 41, 42], history[:13] + [60, 61]]  # the second diverges
    for turn, cached in zip(turns, (15, 13)):
        prefilled = llm.engine.stats.num_prompt_tokens
        out = llm.generate([turn], GREEDY, use_tqdm=False)[0]
        assert out.num_cached_tokens == cached
        assert llm.engine.stats.num_prompt_tokens - prefilled == len(turn) - cached
        assert token_ids([out]) == token_ids(off.generate([turn], GREEDY, use_tqdm=False))
    check_books(llm)
