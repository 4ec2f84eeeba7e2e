"""Scheduler: continuous batching, chunked prefill, preemption, and the stop rules the
output processor applies to what it schedules (fake tokens, no model)."""

import random

import pytest

from pagedjax.block_manager import BlockManager
from pagedjax.output_processor import OutputProcessor
from pagedjax.request import Request, RequestStatus
from pagedjax.sampling_params import SamplingParams
from pagedjax.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

EOS = 2
FILLER = 5


def make_request(request_id, prompt_len, max_tokens=4, **params):
    prompt = [10 + (i % 50) for i in range(prompt_len)]
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **params),
                   seed=0, eos_token_ids=frozenset({EOS}))


class StepLoop:
    """A scheduler whose `update` also applies the engine's stop rules (the output
    processor's decisions, then `finish_requests`), as an engine step does."""

    def __init__(self, scheduler, max_model_len):
        self.scheduler = scheduler
        self.rules = OutputProcessor(tokenizer=None, max_model_len=max_model_len)

    def __getattr__(self, name):
        return getattr(self.scheduler, name)

    def update(self, out, tokens):
        finished = self.scheduler.update(out, tokens)
        return finished + self.scheduler.finish_requests(self.rules.process(out.scheduled))


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8,
                   max_num_batched_tokens=64, max_model_len=128):
    bm = BlockManager(num_blocks=num_blocks, block_size=block_size)
    return StepLoop(Scheduler(bm, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens), max_model_len)


def step(scheduler, token=FILLER):
    """One engine step with a fake model; `token` is an int or a function of the request."""
    out = scheduler.schedule()
    tokens = [token(s.request) if callable(token) else token for s in out.scheduled]
    return out, scheduler.update(out, tokens)


def run_all(scheduler, token=FILLER, max_steps=10_000):
    finished = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return finished
        out, done = step(scheduler, token)
        assert out.num_batched_tokens <= scheduler.max_num_batched_tokens
        assert out.num_seqs <= scheduler.max_num_seqs
        finished += done
    raise AssertionError("scheduler did not drain")


def summary(out):
    return [(s.request.request_id, s.start_position, s.num_new_tokens, s.samples)
            for s in out.scheduled]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_seqs=-1), "max_num_seqs"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(max_num_seqs=True), "max_num_seqs"),
])
def test_constructor_rejects_bad_values(kwargs, field):
    args = dict(max_num_seqs=4, max_num_batched_tokens=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        Scheduler(BlockManager(16, 4), **args)


def test_constructor_rejects_non_block_manager():
    with pytest.raises(ValueError, match="block_manager"):
        Scheduler(None, max_num_seqs=4, max_num_batched_tokens=32)


def test_prompt_one_shorter_than_max_model_len_is_accepted():
    sched = make_scheduler(max_model_len=16)
    request = make_request("r", 15, max_tokens=None)
    sched.add_request(request)
    run_all(sched)
    assert request.finish_reason == "length"
    assert len(request.output_token_ids) == 1


def test_prompt_bigger_than_the_pool_is_rejected():
    sched = make_scheduler(num_blocks=4, block_size=4)  # 3 usable pages = 12 slots
    with pytest.raises(ValueError, match="num_blocks") as info:
        sched.add_request(make_request("r", 13))
    assert "prompt" in str(info.value)
    sched.add_request(make_request("fits", 12))  # exactly the pool is fine


def test_duplicate_request_id_is_rejected():
    sched = make_scheduler()
    sched.add_request(make_request("same", 3))
    with pytest.raises(ValueError, match="request_id"):
        sched.add_request(make_request("same", 3))


def test_finished_request_cannot_be_re_added():
    sched = make_scheduler()
    request = make_request("r", 3, max_tokens=1)
    sched.add_request(request)
    run_all(sched)
    with pytest.raises(ValueError, match="request"):
        sched.add_request(request)


def test_short_sampled_token_list_is_rejected():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    sched.add_request(make_request("b", 3))
    out = sched.schedule()
    with pytest.raises(ValueError, match="sampled_token_ids"):
        sched.update(out, [FILLER])


# ---------------------------------------------------------------- batching


def test_decodes_are_scheduled_before_prefills():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = make_request("a", 4, max_tokens=10)
    sched.add_request(a)
    out, _ = step(sched)
    assert summary(out) == [("a", 0, 4, True)]
    sched.add_request(make_request("b", 10, max_tokens=10))
    out, _ = step(sched)
    # The running decode comes first; the new prompt gets what is left of the budget.
    assert summary(out) == [("a", 4, 1, True), ("b", 0, 7, False)]
    out, _ = step(sched)
    assert summary(out) == [("a", 5, 1, True), ("b", 7, 3, True)]
    out, _ = step(sched)
    assert summary(out) == [("a", 6, 1, True), ("b", 10, 1, True)]


def test_waiting_request_is_admitted_behind_running_one_in_the_same_step():
    sched = make_scheduler(max_num_batched_tokens=64)
    sched.add_request(make_request("a", 4))
    step(sched)
    sched.add_request(make_request("b", 6))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    assert out.num_batched_tokens == 1 + 6


def test_chunked_prefill_splits_a_long_prompt_exactly_on_the_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    request = make_request("long", 25, max_tokens=2)
    sched.add_request(request)
    chunks = []
    for _ in range(4):
        out, _ = step(sched)
        assert out.num_batched_tokens == out.scheduled[0].num_new_tokens
        chunks.append(summary(out)[0])
        assert request.num_computed_tokens == chunks[-1][1] + chunks[-1][2]
    assert chunks == [("long", 0, 8, False), ("long", 8, 8, False),
                      ("long", 16, 8, False), ("long", 24, 1, True)]
    assert request.output_token_ids == [FILLER]  # only the last chunk sampled
    out, done = step(sched)
    assert summary(out) == [("long", 25, 1, True)]
    assert done == [request] and request.finish_reason == "length"


def test_chunk_feeds_the_right_token_ids():
    sched = make_scheduler(max_num_batched_tokens=4)
    request = make_request("r", 6)
    sched.add_request(request)
    out, _ = step(sched)
    assert out.scheduled[0].token_ids == request.prompt_token_ids[:4]
    assert out.scheduled[0].seq_len == 4
    out, _ = step(sched)
    assert out.scheduled[0].token_ids == request.prompt_token_ids[4:]
    out, _ = step(sched)
    assert out.scheduled[0].token_ids == [FILLER]


def test_budget_is_shared_across_several_new_prompts():
    sched = make_scheduler(max_num_batched_tokens=10)
    for i, n in enumerate([4, 4, 4]):
        sched.add_request(make_request(f"r{i}", n))
    out, _ = step(sched)
    # The third prompt is admitted with the 2 tokens left, as a partial chunk.
    assert summary(out) == [("r0", 0, 4, True), ("r1", 0, 4, True), ("r2", 0, 2, False)]
    out, _ = step(sched)
    assert summary(out) == [("r0", 4, 1, True), ("r1", 4, 1, True), ("r2", 2, 2, True)]


def test_max_num_seqs_is_respected():
    sched = make_scheduler(max_num_seqs=2)
    requests = [make_request(f"r{i}", 3, max_tokens=2 + i) for i in range(5)]
    for request in requests:
        sched.add_request(request)
    out, _ = step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 3
    seen_running = []
    while sched.has_unfinished():
        out, _ = step(sched)
        assert out.num_seqs <= 2 and sched.num_running <= 2
        seen_running.append([s.request.request_id for s in out.scheduled])
    # A freed seat is taken by the next request in arrival order.
    assert seen_running[1] == ["r1", "r2"]
    assert all(len(r.output_token_ids) == r.sampling_params.max_tokens for r in requests)
    sched.block_manager.check_no_leak()


def test_first_scheduled_and_first_token_times_are_set():
    sched = make_scheduler(max_num_batched_tokens=4)
    request = make_request("r", 6)
    sched.add_request(request)
    step(sched)
    assert request.first_scheduled_time is not None
    assert request.first_token_time is None  # first chunk did not sample
    assert request.status is RequestStatus.RUNNING
    step(sched)
    assert request.first_token_time >= request.first_scheduled_time >= request.arrival_time


# ---------------------------------------------------------------- preemption


def test_tiny_pool_preempts_the_newest_and_requeues_it_at_the_front():
    sched = make_scheduler(num_blocks=5, block_size=4)  # 4 usable pages = 16 slots
    a, b, c = (make_request(name, 6, max_tokens=6) for name in "abc")
    for request in (a, b, c):
        sched.add_request(request)
    out, _ = step(sched)
    # a and b take two pages each; c does not fit and waits (no preemption for waiting).
    assert [s.request for s in out.scheduled] == [a, b]
    assert out.preempted == [] and list(sched.waiting) == [c]
    step(sched)  # 7 tokens each, still 2 pages
    step(sched)  # 8 tokens each, pages full
    out, _ = step(sched)
    # a needs a third page: the newest running request (b) is preempted by recompute.
    assert out.preempted == [b]
    assert [s.request for s in out.scheduled] == [a]
    assert list(sched.waiting) == [b, c]  # front of the queue, ahead of c
    assert b.status is RequestStatus.WAITING
    assert b.num_computed_tokens == 0 and b.block_ids == []
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert b.output_token_ids == [FILLER] * 3  # generated tokens are kept
    finished = run_all(sched)
    assert set(finished) == {a, b, c}
    for request in (a, b, c):
        assert request.finish_reason == "length"
        assert request.output_token_ids == [FILLER] * 6
    sched.block_manager.check_no_leak()


def test_preempted_request_re_prefills_prompt_and_output_tokens():
    sched = make_scheduler(num_blocks=5, block_size=4)
    a, b = make_request("a", 6, max_tokens=6), make_request("b", 6, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(4):
        out, _ = step(sched)
    assert out.preempted == [b]
    tokens_before = b.all_token_ids
    while b.status is not RequestStatus.RUNNING:
        out, _ = step(sched)
    resumed = next(s for s in out.scheduled if s.request is b)
    assert resumed.start_position == 0
    assert resumed.num_new_tokens == len(tokens_before) == 9
    assert resumed.token_ids == tokens_before
    assert resumed.samples  # the re-prefill ends on the last token, so it samples


def test_request_that_needs_a_block_and_is_newest_preempts_itself():
    sched = make_scheduler(num_blocks=5, block_size=4)
    a, b = make_request("a", 5, max_tokens=8), make_request("b", 8, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # a: 5 tokens in 2 pages, b: 8 tokens in 2 pages (pool full)
    out, _ = step(sched)
    # a still fits in its pages; b needs a third page and is itself the newest.
    assert out.preempted == [b]
    assert summary(out) == [("a", 5, 1, True)]
    assert list(sched.waiting) == [b]
    finished = run_all(sched)
    assert set(finished) == {a, b}
    assert all(len(r.output_token_ids) == 8 for r in (a, b))
    sched.block_manager.check_no_leak()


def test_no_waiting_request_is_admitted_in_a_step_that_preempted():
    # A small budget keeps re-prefill chunks small enough to fit the page a preemption
    # frees, so only the rule itself keeps them out of the step that preempted.
    sched = make_scheduler(num_blocks=5, block_size=4, max_num_batched_tokens=5)
    for name in "abc":
        sched.add_request(make_request(name, 8, max_tokens=8))
    preempting_steps = 0
    while sched.has_unfinished():
        running_before = list(sched.running)
        out, _ = step(sched)
        if out.preempted:
            preempting_steps += 1
            scheduled = [s.request for s in out.scheduled]
            assert all(r in running_before for r in scheduled)
            assert not any(r in scheduled for r in out.preempted)
            assert all(r.status is RequestStatus.WAITING for r in out.preempted)
    assert preempting_steps > 0
    sched.block_manager.check_no_leak()


def test_sequence_longer_than_the_whole_pool_stops_with_length():
    sched = make_scheduler(num_blocks=3, block_size=4)  # 8 slots
    request = make_request("r", 6, max_tokens=20)
    sched.add_request(request)
    finished = run_all(sched)
    assert finished == [request]
    assert request.finish_reason == "length"
    # 8 tokens fit; the 9th token is sampled but its K/V would need a third page.
    assert len(request.output_token_ids) == 3
    assert sched.num_preemptions == 0
    sched.block_manager.check_no_leak()


def test_waiting_sequence_longer_than_the_whole_pool_does_not_block_the_queue():
    sched = make_scheduler(num_blocks=3, block_size=4)  # 8 slots
    too_long = make_request("too_long", 6, max_tokens=20)
    after = make_request("after", 3, max_tokens=2)
    sched.add_request(too_long)
    sched.add_request(after)
    # As if preempted after generating: 6 + 4 tokens can never fit in 8 slots again.
    too_long.output_token_ids.extend([FILLER] * 4)
    out, done = step(sched)
    assert out.finished == [too_long] and done[0] is too_long
    assert too_long.finish_reason == "length" and too_long.block_ids == []
    assert [s.request for s in out.scheduled] == [after]
    run_all(sched)
    assert after.output_token_ids == [FILLER] * 2
    sched.block_manager.check_no_leak()


# ---------------------------------------------------------------- stop rules


def test_eos_stops():
    sched = make_scheduler()
    request = make_request("r", 3, max_tokens=10)
    sched.add_request(request)
    tokens = iter([FILLER, FILLER, EOS, FILLER])
    finished = run_all(sched, token=lambda r: next(tokens))
    assert finished == [request]
    assert request.output_token_ids == [FILLER, FILLER, EOS]
    assert request.finish_reason == "stop"
    assert request.status is RequestStatus.FINISHED and request.finished_time is not None


def test_ignore_eos_runs_to_max_tokens():
    sched = make_scheduler()
    request = make_request("r", 3, max_tokens=5, ignore_eos=True)
    sched.add_request(request)
    run_all(sched, token=EOS)
    assert request.output_token_ids == [EOS] * 5
    assert request.finish_reason == "length"


def test_min_tokens_delays_eos():
    sched = make_scheduler()
    request = make_request("r", 3, max_tokens=10, min_tokens=3)
    sched.add_request(request)
    run_all(sched, token=EOS)
    assert request.output_token_ids == [EOS] * 3
    assert request.finish_reason == "stop"


def test_stop_token_ids_stop_after_min_tokens():
    sched = make_scheduler()
    plain = make_request("plain", 3, max_tokens=10, stop_token_ids=[7])
    delayed = make_request("delayed", 3, max_tokens=10, stop_token_ids=[7], min_tokens=2)
    sched.add_request(plain)
    sched.add_request(delayed)
    run_all(sched, token=7)
    assert plain.output_token_ids == [7] and plain.finish_reason == "stop"
    assert delayed.output_token_ids == [7, 7] and delayed.finish_reason == "stop"


def test_eos_of_another_model_does_not_stop():
    sched = make_scheduler()
    request = make_request("r", 3, max_tokens=4)
    sched.add_request(request)
    run_all(sched, token=3)  # not in eos_token_ids nor stop_token_ids
    assert request.output_token_ids == [3] * 4 and request.finish_reason == "length"


def test_max_tokens_stops_with_length():
    sched = make_scheduler()
    request = make_request("r", 3, max_tokens=7)
    sched.add_request(request)
    run_all(sched)
    assert len(request.output_token_ids) == 7
    assert request.finish_reason == "length"


def test_max_model_len_stops_with_length():
    sched = make_scheduler(max_model_len=8)
    request = make_request("r", 5, max_tokens=None)
    sched.add_request(request)
    run_all(sched)
    assert request.num_tokens == 8
    assert len(request.output_token_ids) == 3
    assert request.finish_reason == "length"


def test_eos_takes_priority_over_length():
    sched = make_scheduler()
    request = make_request("r", 3, max_tokens=2)
    sched.add_request(request)
    run_all(sched, token=lambda r: EOS if r.output_token_ids else FILLER)
    assert request.output_token_ids == [FILLER, EOS]
    assert request.finish_reason == "stop"


def test_finished_request_frees_its_blocks_immediately():
    sched = make_scheduler()
    short = make_request("short", 5, max_tokens=1)
    long = make_request("long", 5, max_tokens=5)
    sched.add_request(short)
    sched.add_request(long)
    _, done = step(sched)
    assert done == [short]
    assert short.block_ids == []
    assert sched.block_manager.num_used_blocks == len(long.block_ids) == 2
    assert sched.running == [long]


# ---------------------------------------------------------------- aborts


def test_abort_waiting_and_running_requests_frees_everything():
    sched = make_scheduler(max_num_seqs=1)
    running = make_request("running", 9, max_tokens=10)
    waiting = make_request("waiting", 3, max_tokens=10)
    sched.add_request(running)
    sched.add_request(waiting)
    step(sched)
    assert running.block_ids and sched.num_waiting == 1
    assert sched.abort("waiting") is waiting
    assert sched.abort("running") is running
    for request in (running, waiting):
        assert request.finish_reason == "abort"
        assert request.status is RequestStatus.FINISHED
        assert request.block_ids == []
    assert sched.abort("nope") is None
    assert sched.abort("running") is None  # already gone
    assert not sched.has_unfinished()
    assert sched.schedule().is_empty
    sched.block_manager.check_no_leak()


def test_abort_between_schedule_and_update_is_safe():
    sched = make_scheduler()
    a, b = make_request("a", 3, max_tokens=3), make_request("b", 3, max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.abort("a")
    finished = sched.update(out, [FILLER, FILLER])
    assert finished == []
    assert a.output_token_ids == [] and a.finish_reason == "abort"
    assert b.output_token_ids == [FILLER]
    assert sched.running == [b]
    run_all(sched)
    sched.block_manager.check_no_leak()


def test_aborted_preempted_request_leaves_no_leak():
    sched = make_scheduler(num_blocks=5, block_size=4)
    a, b = make_request("a", 6, max_tokens=6), make_request("b", 6, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(4):
        out, _ = step(sched)
    assert out.preempted == [b]
    sched.abort("b")
    assert sched.num_waiting == 0
    run_all(sched)
    assert a.finish_reason == "length" and b.finish_reason == "abort"
    sched.block_manager.check_no_leak()


# ---------------------------------------------------------------- output objects


def test_scheduled_request_samples_is_frozen_at_schedule_time():
    request = make_request("r", 6)
    request.num_computed_tokens = 2
    chunk = ScheduledRequest(request, 3, 2)
    last = ScheduledRequest(request, 4, 2)
    assert not chunk.samples and last.samples
    request.output_token_ids.append(FILLER)  # later growth must not change the decision
    assert last.samples


def test_scheduler_output_counts():
    request = make_request("r", 6)
    out = SchedulerOutput([ScheduledRequest(request, 6, 0)])
    assert out.num_batched_tokens == 6 and out.num_seqs == 1 and not out.is_empty
    assert SchedulerOutput().is_empty and SchedulerOutput().num_batched_tokens == 0


# ---------------------------------------------------------------- randomized property


def expected_token(request, index):
    """The fake model's deterministic token for output position `index` (never EOS)."""
    return 100 + (len(request.prompt_token_ids) * 7 + index * 13) % 50


def test_random_workload_with_tiny_pool():
    rng = random.Random(1234)
    block_size, max_num_seqs, budget = 4, 6, 24
    max_prompt, max_new = 40, 30
    # Capacity 80 slots: enough for any single sequence, far too little for all at once.
    bm = BlockManager(num_blocks=21, block_size=block_size)
    sched = StepLoop(Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
                     max_model_len=max_prompt + max_new + 1)
    pending = [make_request(f"r{i}", rng.randint(1, max_prompt),
                            max_tokens=rng.randint(1, max_new)) for i in range(100)]
    all_requests = list(pending)
    finished = []
    saw_chunk = False
    for _ in range(20_000):
        # Requests keep arriving while others run, as in a server.
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add_request(pending.pop(0))
        if not pending and not sched.has_unfinished():
            break
        out = sched.schedule()
        assert out.num_batched_tokens <= budget
        assert out.num_seqs <= max_num_seqs and sched.num_running <= max_num_seqs
        assert out.finished == []
        assert len({id(s.request) for s in out.scheduled}) == out.num_seqs
        # Every scheduled chunk starts where the cache ends and has pages for its tokens.
        for s in out.scheduled:
            assert s.start_position == s.request.num_computed_tokens
            assert s.num_new_tokens >= 1
            assert len(s.request.block_ids) >= bm.blocks_needed(s.seq_len)
            saw_chunk |= not s.samples
        # Running requests own disjoint, non-null pages that account for the whole pool.
        owned = [b for r in sched.running for b in r.block_ids]
        assert len(owned) == len(set(owned)) == bm.num_used_blocks
        assert 0 not in owned
        assert all(not r.block_ids for r in sched.waiting)
        tokens = [expected_token(s.request, len(s.request.output_token_ids))
                  for s in out.scheduled]
        finished += sched.update(out, tokens)
    else:
        raise AssertionError("workload did not drain")

    assert sorted(r.request_id for r in finished) == sorted(r.request_id for r in all_requests)
    for request in all_requests:
        n = request.sampling_params.max_tokens
        assert request.finish_reason == "length"
        assert request.output_token_ids == [expected_token(request, i) for i in range(n)]
        assert request.block_ids == []
    assert sched.num_preemptions > 0  # the pool really was tiny
    assert saw_chunk  # long prompts really were chunked
    assert bm.num_free_blocks == bm.num_blocks - 1
    bm.check_no_leak()


def test_with_token_buckets_a_step_past_a_bucket_is_cut_back_to_it():
    """Decodes and older chunks keep their tokens; the newest prompt chunk gives up the
    excess and finishes next step; a step in the upper half of a gap is left to pad."""
    bm = BlockManager(num_blocks=256, block_size=4)
    sched = StepLoop(Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=128,
                               token_buckets=(1, 2, 4, 8, 16, 32, 64, 128)), 256)
    sched.add_request(make_request("decoding", 6, max_tokens=8))
    step(sched)
    for name, length in (("old", 30), ("new", 10)):
        sched.add_request(make_request(name, length))
    out, _ = step(sched)  # 1 + 30 + 10 = 41 tokens: 9 past 32, 23 short of 64
    assert summary(out) == [("decoding", 6, 1, True), ("old", 0, 30, True),
                            ("new", 0, 1, False)]
    out, _ = step(sched)
    assert ("new", 1, 9, True) in summary(out)
    sched.add_request(make_request("long", 60))
    out, _ = step(sched)  # 3 decodes + 60 = 63: upper half of 32..64, padded instead
    assert out.num_batched_tokens == 63
    run_all(sched)
    assert bm.num_free_blocks == bm.num_blocks - 1
