"""SamplingParams.prompt_logprobs: raw logprobs of prompt tokens match HF transformers."""

import numpy as np
import pytest

from pagedjax import Logprob, SamplingParams
from tests.helpers.engines import make_llm
from tests.helpers.hf_reference import hf_logprobs

PROMPT = [5, 17, 42, 99, 7, 3, 250, 8, 9, 10, 11, 12, 13, 14, 15, 16, 200, 201, 31, 77, 64,
          90, 120, 33, 44]


def check_prompt_logprobs(entries, prompt, ref, k, tokenizer):
    assert len(entries) == len(prompt)
    assert entries[0] is None
    for pos in range(1, len(prompt)):
        entry, row, token = entries[pos], ref[pos - 1], prompt[pos]
        assert isinstance(entry[token], Logprob)
        assert list(entry)[0] == token  # the prompt token first, then the top k
        assert abs(entry[token].logprob - row[token]) < 1e-4
        assert entry[token].rank == 1 + int(np.sum(row > row[token] + 1e-6))
        assert entry[token].decoded_token == tokenizer.decode([token])
        top = np.argsort(-row, kind="stable")[:k].tolist()
        assert set(entry) == set(top) | {token}
        for rank, tid in enumerate(top, start=1):
            assert abs(entry[tid].logprob - row[tid]) < 1e-4
            if tid != token:
                assert entry[tid].rank == rank


@pytest.mark.parametrize("budget", [64, 8])  # 8 tokens a step: the prompt is chunked
def test_prompt_logprobs_match_hf(tiny_llama_dir, tiny_llama_hf, budget):
    llm = make_llm(tiny_llama_dir, max_num_batched_tokens=budget)
    other = [3, 4, 5, 6, 7, 8, 9, 10, 11]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=4)
    plain = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": other}],
                        [params, plain], use_tqdm=False)
    check_prompt_logprobs(outs[0].prompt_logprobs, PROMPT, hf_logprobs(tiny_llama_hf, PROMPT), 4,
                          llm.get_tokenizer())
    assert outs[1].prompt_logprobs is None
    # Same generated tokens with and without prompt logprobs.
    alone = llm.generate([{"prompt_token_ids": PROMPT}], plain, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert outs[0].outputs[0].logprobs is None


def test_prompt_logprobs_zero_and_single_token_prompt(tiny_llama_dir, tiny_llama_hf):
    llm = make_llm(tiny_llama_dir)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=0,
                            logprobs=2)
    outs = llm.generate([{"prompt_token_ids": PROMPT[:6]}, {"prompt_token_ids": [42]}],
                        params, use_tqdm=False)
    entries = outs[0].prompt_logprobs
    ref = hf_logprobs(tiny_llama_hf, PROMPT[:6])
    assert entries[0] is None and len(entries) == 6
    for pos in range(1, 6):
        assert list(entries[pos]) == [PROMPT[pos]]  # k=0: only the prompt token
        assert abs(entries[pos][PROMPT[pos]].logprob - ref[pos - 1][PROMPT[pos]]) < 1e-4
    assert outs[1].prompt_logprobs == [None]
    assert len(outs[0].outputs[0].logprobs) == 2  # sampled-token logprobs still work


def test_preempted_request_does_not_duplicate_prompt_logprobs(tiny_llama_dir, tiny_llama_hf):
    # A pool too small for all of them: requests are preempted and recomputed.
    llm = make_llm(tiny_llama_dir, num_blocks=20, max_num_batched_tokens=16, max_model_len=48)
    prompts = [PROMPT[i:i + 14] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    for out, prompt in zip(outs, prompts):
        check_prompt_logprobs(out.prompt_logprobs, prompt, hf_logprobs(tiny_llama_hf, prompt), 2,
                              llm.get_tokenizer())


@pytest.mark.parametrize("value", [-1, 21, 1.5, True, "3"])
def test_prompt_logprobs_validation(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)


def test_no_prompt_logprobs_program_without_request(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir)
    llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not any(k.with_prompt_logprobs for k in llm.engine.runner.compiled_keys)
    llm.generate([{"prompt_token_ids": PROMPT}],
                 SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)
    assert any(k.with_prompt_logprobs for k in llm.engine.runner.compiled_keys)
