"""Static samplers (Buckets.static_samplers, on by default off CPU): decode calls run a
program compiled for the sampler their batch needs (greedy, random, random with top-k /
top-p), chosen on the host, without the run-time lax.cond whose predicate a GPU reads
back to the host (so dispatch would wait for the device). Outputs stay what the one
run-time-deciding program gives. Forced on here, on CPU."""

import dataclasses

import pytest

from pagedjax import SamplingParams
from pagedjax.sampler import static_sampler
from tests.helpers.engines import TINY_PROMPTS, make_llm


def with_static_samplers(llm):
    engine = llm.engine
    engine.buckets = dataclasses.replace(engine.buckets, static_samplers=True)
    return llm


def conditionals(runner, key) -> int:
    runner.compile(key)
    return runner.program_text(key).count("conditional(")


def test_static_sampler_is_the_choice_the_run_time_conds_make():
    greedy = SamplingParams(temperature=0)
    hot = SamplingParams(temperature=0.8)
    assert static_sampler([greedy, greedy]) == "greedy"
    assert static_sampler([greedy, hot]) == "random"
    assert static_sampler([hot, SamplingParams(temperature=0.8, top_p=0.9)]) == "top_k_top_p"
    # a greedy row's top-k still makes the run-time cond sort: so does the static choice
    assert static_sampler([hot, SamplingParams(temperature=0, top_k=5)]) == "top_k_top_p"
    assert static_sampler([hot, SamplingParams(temperature=0.8, top_k=-1)]) == "random"


BATCHES = {
    "greedy": SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
    "random": [SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=9,
                              ignore_eos=True) for i in range(len(TINY_PROMPTS))],
    "top_k_top_p": [SamplingParams(temperature=0.9, top_p=0.8 if i == 0 else 1.0, top_k=20,
                                   seed=i, max_tokens=9, ignore_eos=True)
                    for i in range(len(TINY_PROMPTS))],
}


@pytest.mark.parametrize("engine_options", [
    dict(num_scheduler_steps=4), dict(async_scheduling=True)], ids=["multi-step", "async"])
def test_decode_calls_run_cond_free_samplers_with_the_same_outputs(tiny_llama_dir,
                                                                   engine_options):
    plain = make_llm(tiny_llama_dir, **engine_options)
    split = with_static_samplers(make_llm(tiny_llama_dir, **engine_options))
    for params in BATCHES.values():
        expected = [o.outputs[0].token_ids for o in plain.generate(TINY_PROMPTS, params,
                                                                   use_tqdm=False)]
        got = [o.outputs[0].token_ids for o in split.generate(TINY_PROMPTS, params,
                                                              use_tqdm=False)]
        assert got == expected
    runner = split.engine.runner
    decode_calls = [k for k in runner.compiled_keys if k.decode_call]
    assert {k.sampler for k in decode_calls} == set(BATCHES)  # each batch took its own
    assert all(k.sampler == "any" for k in runner.compiled_keys if not k.decode_call)
    # The sampler's conds are gone (the reference attention's own conds stay: the Pallas
    # kernel that a GPU runs has none)
    for key in decode_calls:
        assert conditionals(runner, key) < conditionals(runner, dataclasses.replace(
            key, sampler="any"))
    # one program per shape when off (CPU's default)
    assert all(k.sampler == "any" for k in plain.engine.runner.compiled_keys)
