"""Multi-step decode (EngineConfig.num_scheduler_steps): several decode steps per device
call give exactly what single steps give, and fall back to single steps when a batch needs
host work between tokens."""

import numpy as np
import pytest

from pagedjax import EngineConfig, SamplingParams
from pagedjax.buckets import Buckets
from pagedjax.multi_step import advance_decode_input
from pagedjax.runner import step_input_spec
from tests.helpers.engines import TINY_PROMPTS, make_llm

PROMPTS = TINY_PROMPTS + [[30 + i for i in range(21)], [44, 45]]


def outputs_of(llm, params):
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason,
             o.outputs[0].stop_reason) for o in outputs]


def multi_step_keys(llm):
    return [key for key in llm.engine.runner.compiled_keys if key.num_steps > 1]


def spy_on_chaining(llm):
    """A list that collects every call the engine chains (dispatches before applying)."""
    pipeline, chained = llm.engine.decode_calls, []
    chain = pipeline.chain

    def spy(call):
        result = chain(call)
        if result is not None:
            chained.append(result)
        return result

    pipeline.chain = spy
    return chained


@pytest.mark.parametrize("params", [
    # max_tokens not a multiple of the step count: sequences end inside a multi-step call
    SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),
    # seeded sampling: keys depend on (seed, token index), not on how steps are grouped
    [SamplingParams(temperature=0.9, top_p=0.9, seed=s, max_tokens=13, ignore_eos=True)
     for s in range(len(PROMPTS))],
    # a stop token id and min_tokens end sequences at different steps
    SamplingParams(temperature=0.8, seed=3, max_tokens=24, stop_token_ids=[40, 41, 42, 43],
                   min_tokens=2),
], ids=["greedy", "seeded", "stop-token"])
def test_same_outputs_as_single_steps(tiny_llama_dir, params):
    single = make_llm(tiny_llama_dir)
    multi = make_llm(tiny_llama_dir, num_scheduler_steps=4)
    chained = spy_on_chaining(multi)
    assert outputs_of(multi, params) == outputs_of(single, params)
    assert [key.num_steps for key in multi_step_keys(multi)] == [4]  # it really ran
    assert chained  # and calls were dispatched before the previous call's tokens came back
    assert multi.engine.stats.num_generated_tokens == single.engine.stats.num_generated_tokens


def test_requests_added_or_aborted_while_a_call_is_in_flight(tiny_llama_dir):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = {tuple(p): out for p, out in zip(PROMPTS, outputs_of(make_llm(tiny_llama_dir),
                                                                params))}
    engine = make_llm(tiny_llama_dir, num_scheduler_steps=4).engine
    requests = [engine.make_request(p, params) for p in PROMPTS[:3]]
    for request in requests:
        engine.add_request(request)
    for _ in range(20):  # until a call runs while the host applies the one before
        if engine.decode_calls.in_flight is not None:
            break
        engine.step()
    assert engine.decode_calls.in_flight is not None
    late = engine.make_request(PROMPTS[3], params)
    engine.add_request(late)  # the chain must stop so it gets admitted
    engine.abort_request(requests[1].request_id)  # its pages are freed mid-flight
    while engine.has_unfinished_requests():
        engine.step()
    assert requests[1].finish_reason == "abort"
    for request in (requests[0], requests[2], late):
        got = (request.output_token_ids, request.output_text, request.finish_reason,
               request.stop_reason)
        assert got == want[tuple(request.prompt_token_ids)]
    assert engine.block_manager.num_used_blocks == 0  # every page came back


def test_stop_strings_cut_where_single_steps_cut(tiny_llama_dir):
    single = make_llm(tiny_llama_dir)
    reference = outputs_of(single, SamplingParams(temperature=0, max_tokens=16,
                                                  ignore_eos=True))
    # a stop string made of text the first prompt's output really contains
    text = reference[0][1]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop])
    multi = make_llm(tiny_llama_dir, num_scheduler_steps=8)
    got = outputs_of(multi, params)
    assert got == outputs_of(single, params)
    assert got[0][2:] == ("stop", stop)
    assert multi_step_keys(multi)


def test_sequences_reaching_max_model_len_end_like_single_steps(tiny_llama_dir):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    single = make_llm(tiny_llama_dir, max_model_len=40)
    multi = make_llm(tiny_llama_dir, max_model_len=40, num_scheduler_steps=8)
    got = outputs_of(multi, params)
    assert got == outputs_of(single, params)
    assert {finish for _, _, finish, _ in got} == {"length"}
    assert [len(ids) + len(p) for (ids, *_), p in zip(got, PROMPTS)] == [40] * len(PROMPTS)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, repetition_penalty=1.3),
], ids=["logprobs", "penalty"])
def test_host_work_between_tokens_keeps_single_steps(tiny_llama_dir, params):
    single = make_llm(tiny_llama_dir)
    multi = make_llm(tiny_llama_dir, num_scheduler_steps=4)
    got = multi.generate(PROMPTS, params, use_tqdm=False)
    want = single.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert multi_step_keys(multi) == []


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),
    [SamplingParams(temperature=0.9, top_p=0.9, seed=s, max_tokens=13, ignore_eos=True)
     for s in range(len(PROMPTS))],
], ids=["greedy", "seeded"])
def test_async_scheduling_chains_one_step_calls_with_single_step_outputs(tiny_llama_dir,
                                                                        params):
    single = make_llm(tiny_llama_dir)
    chained_llm = make_llm(tiny_llama_dir, async_scheduling=True)
    chained = spy_on_chaining(chained_llm)
    assert outputs_of(chained_llm, params) == outputs_of(single, params)
    calls = [k for k in chained_llm.engine.runner.compiled_keys if k.decode_call]
    assert [k.num_steps for k in calls] == [1]
    assert chained  # each call was dispatched before the previous one's tokens came back
    assert not any(k.decode_call for k in single.engine.runner.compiled_keys)


def test_async_scheduling_warmup_builds_its_decode_calls(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir, async_scheduling=True)
    llm.warmup()
    buckets = llm.engine.buckets
    assert set(llm.engine.runner.compiled_keys) == set(buckets.all_keys(1, True))
    assert set(llm.engine.warmup_keys()) == set(buckets.all_keys(1, True))
    assert len(buckets.all_keys(1, True)) == len(buckets.all_keys()) + len(buckets.seqs)
    compiles = llm.num_compiles
    outputs_of(llm, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert llm.num_compiles == compiles


def test_async_scheduling_is_validated():
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")


def test_warmup_builds_the_multi_step_programs_too(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir, num_scheduler_steps=4)
    llm.warmup()
    buckets = llm.engine.buckets
    assert set(llm.engine.runner.compiled_keys) == set(buckets.all_keys(4))
    assert len(buckets.all_keys(4)) == len(buckets.all_keys()) + len(buckets.seqs)
    compiles = llm.num_compiles
    outputs_of(llm, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert llm.num_compiles == compiles


def test_advance_decode_input_feeds_sampled_tokens_one_position_on():
    buckets = Buckets.for_limits(max_num_batched_tokens=16, max_num_seqs=4,
                                 max_pages_per_seq=4)
    key = buckets.key_for(2, 2)
    spec = step_input_spec(key, buckets.pages_per_seq)
    zeros = {name: np.zeros(s.shape, s.dtype) for name, s in spec._asdict().items()
             if name not in ("sampling", "penalties")}
    step = spec._replace(**zeros, sampling=spec.sampling._replace(
        **{n: np.zeros(s.shape, s.dtype) for n, s in spec.sampling._asdict().items()
           if s is not None}),
        penalties=None)
    page = 4
    step = step._replace(
        input_ids=np.array([7, 9] + [0] * 14, np.int32),
        positions=np.array([3, 6] + [0] * 14, np.int32),  # sequence 0 crosses a page next
        token_seq=np.array([0, 1] + [-1] * 14, np.int32),
        block_tables=np.array([[5, 8, 0, 0], [2, 3, 0, 0], [0] * 4, [0] * 4], np.int32),
        context_lens=np.array([3, 6, 0, 0], np.int32),
        seq_lens=np.array([4, 7, 0, 0], np.int32),
        sampling=step.sampling._replace(sample_index=np.array([2, 5, 0, 0], np.int32)))
    nxt = advance_decode_input(step, np.array([11, 12, 13, 14], np.int32), page)
    assert np.asarray(nxt.input_ids)[:3].tolist() == [11, 12, 0]
    assert np.asarray(nxt.positions)[:3].tolist() == [4, 7, 0]
    # position 4 is slot 0 of sequence 0's second page (8); 7 is slot 3 of page 3
    assert np.asarray(nxt.slot_mapping)[:3].tolist() == [8 * page + 0, 3 * page + 3, 0]
    assert np.asarray(nxt.context_lens).tolist() == [4, 7, 0, 0]
    assert np.asarray(nxt.seq_lens).tolist() == [5, 8, 0, 0]
    assert np.asarray(nxt.sampling.sample_index).tolist() == [3, 6, 0, 0]


def test_num_scheduler_steps_is_validated():
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        EngineConfig(num_scheduler_steps=0)
