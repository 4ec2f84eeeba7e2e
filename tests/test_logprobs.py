"""SamplingParams.logprobs: raw logprobs of generated tokens match HF transformers."""

import numpy as np
import pytest

from pagedjax import Logprob, SamplingParams
from pagedjax.sampling_params import MAX_LOGPROBS
from tests.helpers.engines import TINY_PROMPTS as PROMPTS
from tests.helpers.engines import make_llm
from tests.helpers.hf_reference import hf_logprobs


def test_greedy_logprobs_match_hf(llm, tiny_llama_hf):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": PROMPTS[1]}],
                        [params, plain], use_tqdm=False)
    ref = llm.generate([{"prompt_token_ids": PROMPTS[1]}], plain, use_tqdm=False)
    out, other = outs[0].outputs[0], outs[1].outputs[0]
    # A request without logprobs in the same batch: None, and the same tokens as alone.
    assert other.logprobs is None and other.cumulative_logprob is None
    assert other.token_ids == ref[0].outputs[0].token_ids

    assert len(out.logprobs) == len(out.token_ids) == 6
    full = hf_logprobs(tiny_llama_hf, PROMPTS[0] + out.token_ids)
    total = 0.0
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = full[len(PROMPTS[0]) - 1 + step]
        assert token == int(np.argmax(row))
        assert isinstance(entry[token], Logprob)
        assert abs(entry[token].logprob - row[token]) < 1e-4
        assert entry[token].rank == 1
        top5 = np.argsort(-row, kind="stable")[:5].tolist()
        assert list(entry) == top5  # greedy: the sampled token is the top one
        for rank, tid in enumerate(top5, start=1):
            assert abs(entry[tid].logprob - row[tid]) < 1e-4
            assert entry[tid].rank == rank
            assert entry[tid].decoded_token == llm.get_tokenizer().decode([tid])
        total += row[token]
    assert abs(out.cumulative_logprob - total) < 1e-3
    assert abs(out.cumulative_logprob - sum(e[t].logprob for t, e in
                                            zip(out.token_ids, out.logprobs))) < 1e-5


def test_sampled_token_rank_and_raw_logprobs(llm, tiny_llama_hf):
    """A non-greedy token (forced by allowed_token_ids) gets its raw logprob and true rank."""
    prompt = PROMPTS[0]
    row = hf_logprobs(tiny_llama_hf, prompt)[-1]
    order = np.argsort(-row, kind="stable")
    forced = int(order[7])  # rank 8 under the raw distribution
    params = SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=[forced], logprobs=2)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [forced]
    entry = out.logprobs[0]
    assert list(entry) == [forced, int(order[0]), int(order[1])]
    assert entry[forced].rank == 8
    assert abs(entry[forced].logprob - row[forced]) < 1e-4  # raw, not after the mask
    assert abs(out.cumulative_logprob - row[forced]) < 1e-4


def test_logprobs_zero_returns_only_sampled(llm):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=5, ignore_eos=True, logprobs=0)
    out = llm.generate([{"prompt_token_ids": PROMPTS[1]}], params, use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert list(entry) == [token]
        assert entry[token].logprob <= 0 and entry[token].rank >= 1
    assert abs(out.cumulative_logprob - sum(e[t].logprob for t, e in
                                            zip(out.token_ids, out.logprobs))) < 1e-5


def test_default_path_compiles_without_logprobs(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir)
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=3), use_tqdm=False)
    assert not any(k.with_logprobs for k in llm.engine.runner.compiled_keys)
    assert set(llm.engine.runner.compiled_keys) <= set(llm.engine.buckets.all_keys())
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=3, logprobs=1),
                 use_tqdm=False)
    assert any(k.with_logprobs for k in llm.engine.runner.compiled_keys)


def test_streaming_delta_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
    final = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)[0]
    deltas = list(llm.generate_stream([{"prompt_token_ids": PROMPTS[0]}], params,
                                      output_kind="delta"))
    merged = [e for d in deltas for e in d.outputs[0].logprobs]
    assert all(len(d.outputs[0].logprobs) == len(d.outputs[0].token_ids) for d in deltas)
    assert merged == final.outputs[0].logprobs
    assert deltas[-1].outputs[0].cumulative_logprob == pytest.approx(
        final.outputs[0].cumulative_logprob)


@pytest.mark.parametrize("value", [-1, MAX_LOGPROBS + 1, 1.5, True, "3"])
def test_invalid_logprobs_rejected(value):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=value)


def test_valid_logprobs_accepted():
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(logprobs=MAX_LOGPROBS).logprobs == MAX_LOGPROBS
    assert SamplingParams().logprobs is None
