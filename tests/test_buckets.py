"""Bucket ladders: the step shapes the engine compiles."""

from dataclasses import replace

import pytest

from pagedjax.buckets import BucketKey, Buckets, bucket_aligned_total


def test_smallest_bucket_holding_the_step_is_chosen():
    buckets = Buckets.for_limits(max_num_batched_tokens=512, max_num_seqs=64,
                                 max_pages_per_seq=64)
    assert buckets.tokens == (16, 32, 64, 128, 256, 512)
    assert buckets.seqs == (1, 2, 4, 8, 16, 32, 64)
    assert buckets.key_for(1, 1) == BucketKey(16, 1)
    assert buckets.key_for(17, 3) == BucketKey(32, 4)
    assert buckets.key_for(512, 64, penalty_entries=20, with_logprobs=True) == BucketKey(
        512, 64, penalty_width=32, with_logprobs=True)
    with pytest.raises(ValueError, match="tokens"):
        buckets.key_for(513, 1)
    with pytest.raises(ValueError, match="sequences"):
        buckets.key_for(64, 65)
    # The exact numerics' ladders (min_rows=2): no one-row step, no one-row logits.
    two = Buckets.for_limits(max_num_batched_tokens=512, max_num_seqs=64,
                             max_pages_per_seq=64, min_token_bucket=1, min_rows=2)
    assert two.tokens[0] == 2 and two.seqs[0] == 2 and two.key_for(1, 1) == BucketKey(2, 2)


def test_compiled_shapes_do_not_grow_with_max_model_len():
    # Block tables are always max_model_len / block_size wide and attention stops at the
    # step's longest context, so a longer model length adds no program to warm up.
    short, long = (Buckets.for_limits(max_num_batched_tokens=256, max_num_seqs=32,
                                      max_pages_per_seq=pages) for pages in (4, 512))
    assert short.all_keys() == long.all_keys()
    assert long.pages_per_seq == 512
    assert all(key.num_seqs <= key.num_tokens for key in long.all_keys())
    assert len(long.all_keys()) == sum(1 for t in long.tokens for b in long.seqs if b <= t)


def test_static_samplers_split_decode_calls_only():
    plain = Buckets.for_limits(max_num_batched_tokens=64, max_num_seqs=8, max_pages_per_seq=4)
    split = Buckets.for_limits(max_num_batched_tokens=64, max_num_seqs=8, max_pages_per_seq=4,
                               static_samplers=True)
    assert plain.key_for(5, 2, decode_steps=4, sampler="greedy") == BucketKey(
        16, 2, num_steps=4, decode_call=True)  # one program on CPU: sampler "any"
    assert split.key_for(5, 2, decode_steps=4, sampler="random") == BucketKey(
        16, 2, num_steps=4, decode_call=True, sampler="random")
    assert split.all_keys() == plain.all_keys()  # plain steps are never split
    for steps, calls in ((4, False), (1, True)):  # warmup builds every decode-call sampler
        keys, plain_keys = split.all_keys(steps, calls), plain.all_keys(steps, calls)
        decode_calls = [k for k in plain_keys if k.decode_call]
        assert len(decode_calls) == len(plain.seqs)
        assert set(keys) == set(k for k in plain_keys if not k.decode_call) | {
            replace(k, sampler=s) for k in decode_calls
            for s in ("greedy", "random", "top_k_top_p")}


def test_a_step_just_past_a_bucket_stops_at_it():
    ladder = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert bucket_aligned_total(280, ladder) == 256  # 24 past 256, 232 short of 512
    assert bucket_aligned_total(383, ladder) == 256  # the lower half of the gap
    assert bucket_aligned_total(384, ladder) == 384  # the middle: padding is the cheaper
    assert bucket_aligned_total(256, ladder) == 256
    assert bucket_aligned_total(40, ladder) == 32
    assert bucket_aligned_total(20, ladder) == 20  # small steps: an extra one costs more
    assert bucket_aligned_total(600, ladder) == 600  # past the ladder: nothing to stop at
