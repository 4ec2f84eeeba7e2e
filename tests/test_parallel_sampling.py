"""Parallel sampling (SamplingParams.n > 1): one prefill, forked sequences sharing KV
blocks with copy-on-write, seeded per child, no block leaks (also under preemption)."""

import pytest

from pagedjax import SamplingParams
from pagedjax.block_manager import BlockManager
from pagedjax.parallel_sampling import child_seed
from pagedjax.request import Request
from tests.helpers.engines import make_llm

PROMPT = [5, 17, 42, 99, 7, 3, 250, 8, 9, 10]  # 10 tokens: the last 4-slot block is half full
LONG_PROMPT = list(range(20, 50))  # 30 tokens


def sampled(n=1, seed=11, max_tokens=12, **kwargs):
    return SamplingParams(n=n, seed=seed, temperature=1.0, max_tokens=max_tokens,
                          ignore_eos=True, **kwargs)


def alone(llm, prompt, params):
    """Token ids of a single n=1 request run by itself."""
    return llm.generate([{"prompt_token_ids": prompt}], params,
                        use_tqdm=False)[0].outputs[0].token_ids


def assert_clean(llm):
    assert not llm.engine.has_unfinished_requests()
    llm.engine.block_manager.check_no_leak()


def test_n4_distinct_reproducible_and_equal_to_child_seeds(llm):
    params = sampled(n=4)
    first = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
    assert len(first) == 1
    outs = first[0].outputs
    assert [c.index for c in outs] == [0, 1, 2, 3]
    tokens = [c.token_ids for c in outs]
    assert all(len(t) == 12 for t in tokens)
    assert len({tuple(t) for t in tokens}) == 4  # independent draws
    assert all(c.finish_reason == "length" for c in outs)
    # Reproducible, also batched with other work.
    again = llm.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": PROMPT}],
                         [sampled(max_tokens=3), params], use_tqdm=False)[1]
    assert [c.token_ids for c in again.outputs] == tokens
    # Completion i is exactly the n=1 request seeded with child_seed(seed, i). The
    # children diverge inside the prompt's half-full last block, so this only holds when
    # that block is copied on write rather than written by all four.
    copies_before = llm.engine.stats.num_block_copies
    for i in range(4):
        assert alone(llm, PROMPT, sampled(seed=child_seed(11, i))) == tokens[i]
    assert llm.engine.stats.num_block_copies == copies_before  # n=1 never copies
    assert_clean(llm)


def test_copy_on_write_of_the_shared_last_block(llm):
    before = llm.engine.stats.num_block_copies
    outs = llm.generate([{"prompt_token_ids": PROMPT}], sampled(n=2, seed=5, max_tokens=2),
                        use_tqdm=False)[0].outputs
    # Both sequences write into the shared half-full block: the first writer copies it,
    # the last one (now sole owner) writes in place.
    assert llm.engine.stats.num_block_copies - before == 1
    assert outs[0].token_ids != outs[1].token_ids
    for i in range(2):
        assert alone(llm, PROMPT, sampled(seed=child_seed(5, i), max_tokens=2)) == \
            outs[i].token_ids
    assert_clean(llm)


def test_unseeded_children_differ(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0].outputs
    assert len({tuple(c.token_ids) for c in outs}) == 3
    assert_clean(llm)


def test_greedy_children_are_identical(llm):
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ref = alone(llm, LONG_PROMPT, greedy)
    outs = llm.generate([{"prompt_token_ids": LONG_PROMPT}],
                        SamplingParams(n=4, temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)[0].outputs
    assert [c.token_ids for c in outs] == [ref] * 4
    assert_clean(llm)


def test_fewer_peak_blocks_than_separate_requests(tiny_llama_dir):
    # Without prefix caching, so separate requests hold a copy of the prompt each (the
    # cache would share their full pages too: test_prefix_caching covers that).
    llm = make_llm(tiny_llama_dir, enable_prefix_caching=False)
    stats = llm.engine.stats
    stats.peak_used_blocks = 0
    forked = llm.generate([{"prompt_token_ids": LONG_PROMPT}], sampled(n=4, max_tokens=4),
                          use_tqdm=False)[0]
    forked_peak = stats.peak_used_blocks
    stats.peak_used_blocks = 0
    separate = llm.generate([{"prompt_token_ids": LONG_PROMPT}] * 4,
                            [sampled(seed=child_seed(11, i), max_tokens=4) for i in range(4)],
                            use_tqdm=False)
    separate_peak = stats.peak_used_blocks
    assert [c.token_ids for c in forked.outputs] == [o.outputs[0].token_ids for o in separate]
    # 30 prompt tokens in 4-slot blocks: 7 full blocks shared + a private last block each
    # (+ one growth block each) = 15, vs 8-9 blocks per separate request (34 measured: the
    # chunked-prefill budget staggers them a little).
    assert forked_peak == 7 + 4 * 2
    assert separate_peak >= 4 * 8
    assert forked_peak < separate_peak / 2
    assert_clean(llm)


def test_no_leak_and_same_outputs_under_preemption(tiny_llama_dir):
    small = make_llm(tiny_llama_dir, num_blocks=24, max_model_len=64)
    prompt = list(range(60, 78))  # 18 tokens
    params = sampled(n=4, seed=3, max_tokens=30)
    out = small.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert small.engine.scheduler.num_preemptions > 0
    assert sum(c.finish_reason == "length" for c in out.outputs) == 4
    assert_clean(small)
    for i, completion in enumerate(out.outputs):
        assert len(completion.token_ids) == 30
        assert alone(small, prompt, sampled(seed=child_seed(3, i), max_tokens=30)) == \
            completion.token_ids
    assert_clean(small)


def test_streaming_children(llm):
    params = sampled(n=3, max_tokens=6)
    final = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0]
    for kind in ("delta", "cumulative"):
        got = {0: [], 1: [], 2: []}
        finished, request_ids = [], set()
        for out in llm.generate_stream([{"prompt_token_ids": PROMPT}], params,
                                       output_kind=kind):
            request_ids.add(out.request_id)
            assert len(out.outputs) == 1
            c = out.outputs[0]
            got[c.index] = (got[c.index] + c.token_ids) if kind == "delta" else c.token_ids
            finished.append(out.finished)
        assert finished.count(True) == 1 and finished[-1]
        assert len(request_ids) == 1  # the prompt's id on every child's output
        assert [got[i] for i in range(3)] == [c.token_ids for c in final.outputs]
    # Closing a stream early aborts every sequence, forked or not, and frees the blocks.
    stream = llm.generate_stream([{"prompt_token_ids": PROMPT}], params)
    next(stream)
    stream.close()
    assert_clean(llm)


def test_abort_before_fork_ends_all_sequences(llm):
    engine = llm.engine
    request = engine.make_request(PROMPT, sampled(n=3))
    engine.add_request(request)
    engine.abort_request(request.request_id)
    assert all(s.finish_reason == "abort" for s in request.sequences)
    assert_clean(llm)


def test_n_validation(llm):
    with pytest.raises(ValueError, match="n"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="n"):
        llm.generate("hi", SamplingParams(n=9), use_tqdm=False)  # max_num_seqs=8
    assert SamplingParams(n=4).n == 4


def test_copy_on_write_books():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent = Request("p", [1] * 6, SamplingParams(), seed=0)
    assert bm.ensure_capacity(parent, 6)
    child = Request("c", [1] * 6, SamplingParams(), seed=0)
    child.block_ids = bm.fork(parent.block_ids)
    shared = list(parent.block_ids)
    assert [bm.ref_count(b) for b in shared] == [2, 2]
    assert bm.copy_on_write(child, 8, 10) == []  # a block it lacks: growth, not a copy
    copies = bm.copy_on_write(child, 6, 7)
    assert copies == [(shared[1], child.block_ids[1])]
    assert child.block_ids[0] == shared[0] and child.block_ids[1] != shared[1]
    assert bm.ref_count(shared[1]) == 1 and bm.ref_count(shared[0]) == 2
    assert bm.copy_on_write(parent, 6, 7) == []  # now the sole owner writes in place
    bm.free(parent)
    bm.free(child)
    bm.check_no_leak()
