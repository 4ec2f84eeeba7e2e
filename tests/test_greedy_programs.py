"""Greedy programs (Buckets.greedy_programs, on by default off CPU): decode calls whose
sequences are all greedy run programs without the sampler's run-time lax.cond, whose
predicate a GPU reads back to the host (so dispatch would wait for the device); outputs
stay what one program per shape gives. Forced on here, on CPU."""

import dataclasses

import pytest

from pagedjax import SamplingParams
from tests.helpers.engines import TINY_PROMPTS, make_llm


def with_greedy_programs(llm):
    engine = llm.engine
    engine.buckets = dataclasses.replace(engine.buckets, greedy_programs=True)
    return llm


def conditionals(runner, key) -> int:
    runner.compile(key)
    return runner._compiled[key].as_text().count("conditional(")


@pytest.mark.parametrize("engine_options", [
    dict(num_scheduler_steps=4), dict(async_scheduling=True)], ids=["multi-step", "async"])
def test_greedy_decode_calls_run_cond_free_programs_with_the_same_outputs(tiny_llama_dir,
                                                                          engine_options):
    plain = make_llm(tiny_llama_dir, **engine_options)
    split = with_greedy_programs(make_llm(tiny_llama_dir, **engine_options))
    greedy = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    mixed = [SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=9,
                            ignore_eos=True) for i in range(len(TINY_PROMPTS))]
    for params in (greedy, mixed):
        expected = [o.outputs[0].token_ids for o in plain.generate(TINY_PROMPTS, params,
                                                                   use_tqdm=False)]
        got = [o.outputs[0].token_ids for o in split.generate(TINY_PROMPTS, params,
                                                              use_tqdm=False)]
        assert got == expected
    runner = split.engine.runner
    greedy_keys = [k for k in runner.compiled_keys if k.greedy]
    sampling_keys = [k for k in runner.compiled_keys if not k.greedy]
    assert greedy_keys and sampling_keys
    assert all(k.decode_call for k in greedy_keys)  # plain steps keep one program
    assert any(k.decode_call for k in sampling_keys)  # sampled batches take the other
    # The sampler's cond is gone (the reference attention's own conds stay: the Pallas
    # kernel that a GPU runs has none)
    for key in greedy_keys:
        assert conditionals(runner, key) < conditionals(runner, dataclasses.replace(
            key, greedy=False))
    # one program per shape when off (CPU's default)
    assert not any(k.greedy for k in plain.engine.runner.compiled_keys)
