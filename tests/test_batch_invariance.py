"""Batch invariance: what a request generates does not depend on what it is batched with."""

import numpy as np
import pytest

from pagedjax import SamplingParams
from tests.helpers.engines import make_llm

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def make_prompts(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 290, size=int(rng.integers(3, 24))).tolist() for _ in range(count)]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir, max_num_seqs=32, max_num_batched_tokens=256,
                    num_blocks=512)


def run(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].text) for o in outs]


def test_greedy_outputs_do_not_depend_on_batch_size(llm):
    prompts = make_prompts(32)
    batch_32 = run(llm, prompts, GREEDY)
    batch_7 = run(llm, prompts[:7], GREEDY)
    batch_1 = run(llm, prompts[:1], GREEDY)
    assert batch_7 == batch_32[:7]
    assert batch_1 == batch_32[:1]
    # Different prompts do give different outputs (the comparison above means something).
    assert len({tuple(ids) for ids, _ in batch_32}) > 16
    assert llm.engine.stats.max_seqs_in_step >= 16  # the big batch really ran together


def test_seeded_request_same_alone_and_in_mixed_batch(llm):
    prompts = make_prompts(16, seed=1)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12,
                            ignore_eos=True)
    others = [
        GREEDY,
        SamplingParams(temperature=1.0, top_p=0.5, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=5, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5,
                       max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=1.2, min_p=0.05, seed=5, max_tokens=11, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=3, top_p=0.9, logit_bias={7: 5.0},
                       max_tokens=5, ignore_eos=True),
    ]
    mixed = [others[i % len(others)] for i in range(15)]
    position = 9
    batch_params = mixed[:position] + [seeded] + mixed[position:]
    alone = run(llm, [prompts[position]], seeded)[0]
    in_batch = run(llm, prompts, batch_params)[position]
    assert in_batch == alone
    # The seed matters: another seed gives another continuation.
    reseeded = SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=12,
                              ignore_eos=True)
    assert run(llm, [prompts[position]], reseeded)[0] != alone
