"""Bucket ladders: the step shapes the engine compiles."""

import pytest

from pagedjax.buckets import BucketKey, Buckets


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


def test_compiled_shapes_do_not_grow_with_max_model_len():
    # Block tables are always max_model_len / block_size wide and attention stops at the
    # step's longest context, so a longer model length adds no program to warm up.
    short, long = (Buckets.for_limits(max_num_batched_tokens=256, max_num_seqs=32,
                                      max_pages_per_seq=pages) for pages in (4, 512))
    assert short.all_keys() == long.all_keys()
    assert long.pages_per_seq == 512
    assert all(key.num_seqs <= key.num_tokens for key in long.all_keys())
    assert len(long.all_keys()) == sum(1 for t in long.tokens for b in long.seqs if b <= t)


def test_greedy_programs_give_all_greedy_steps_keys_of_their_own():
    plain = Buckets.for_limits(max_num_batched_tokens=64, max_num_seqs=8, max_pages_per_seq=4)
    split = Buckets.for_limits(max_num_batched_tokens=64, max_num_seqs=8, max_pages_per_seq=4,
                               greedy_programs=True)
    assert plain.key_for(5, 2, all_greedy=True) == BucketKey(16, 2)  # one program on CPU
    assert split.key_for(5, 2, all_greedy=True) == BucketKey(16, 2, greedy=True)
    assert split.key_for(5, 2, all_greedy=False) == BucketKey(16, 2)
    for steps in (1, 4):  # warmup builds both variants of every shape
        keys = split.all_keys(steps)
        assert len(keys) == 2 * len(plain.all_keys(steps))
        assert {k for k in keys if k.greedy} == {
            BucketKey(k.num_tokens, k.num_seqs, num_steps=k.num_steps, greedy=True,
                      decode_call=k.decode_call)
            for k in plain.all_keys(steps)}
