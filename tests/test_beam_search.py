"""LLM.beam_search (vLLM's offline beam search): width 1 is greedy, width 4 matches an
independent beam search over HF transformers' logprobs and beats greedy, params validated."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedjax import BeamSearchOutput, BeamSearchParams, SamplingParams
from pagedjax.beam_search import beam_search_score
from tests.helpers.engines import make_llm

PROMPTS = [[5, 17, 42, 99, 7, 3, 250], [8, 9, 10, 11, 12, 13, 14, 15, 16, 200, 201]]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def hf_next_logprobs(hf, token_ids):
    with torch.no_grad():
        logits = hf(torch.tensor([token_ids])).logits[0, -1].double()
    return torch.log_softmax(logits, dim=-1)


def hf_beam_search(hf, prompt, beam_width, max_tokens):
    """Reference: the same algorithm over HF's full next-token distribution (no EOS)."""
    beams = [(list(prompt), 0.0)]
    for _ in range(max_tokens):
        candidates = []
        for tokens, cum in beams:
            logprobs = hf_next_logprobs(hf, tokens)
            top = torch.topk(logprobs, 2 * beam_width)
            for lp, tid in zip(top.values.tolist(), top.indices.tolist()):
                candidates.append((tokens + [tid], cum + lp))
        candidates.sort(key=lambda c: c[1] / len(c[0]), reverse=True)
        beams = candidates[:beam_width]
    return beams


def test_width_one_is_greedy(llm):
    greedy = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                          SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                         logprobs=0), use_tqdm=False)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                           BeamSearchParams(beam_width=1, max_tokens=5, ignore_eos=True))
    assert len(outs) == 2
    for prompt, out, ref in zip(PROMPTS, outs, greedy):
        assert isinstance(out, BeamSearchOutput) and len(out.sequences) == 1
        best = out.sequences[0]
        assert best.tokens == prompt + ref.outputs[0].token_ids
        assert best.cum_logprob == pytest.approx(ref.outputs[0].cumulative_logprob, abs=1e-4)
        assert best.text == llm.get_tokenizer().decode(best.tokens)
    llm.engine.block_manager.check_no_leak()


def test_width_four_matches_reference_and_beats_greedy(llm, hf):
    prompt = PROMPTS[0]
    out = llm.beam_search({"prompt_token_ids": prompt},
                          BeamSearchParams(beam_width=4, max_tokens=3, ignore_eos=True))[0]
    assert len(out.sequences) == 4
    ref = hf_beam_search(hf, prompt, beam_width=4, max_tokens=3)
    assert [s.tokens for s in out.sequences] == [tokens for tokens, _ in ref]
    for seq, (_, cum) in zip(out.sequences, ref):
        assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
    # Best first by vLLM's score.
    scores = [beam_search_score(s.tokens, s.cum_logprob, set(), 1.0) for s in out.sequences]
    assert scores == sorted(scores, reverse=True)
    # Each beam's cum_logprob is the model's log-likelihood of its generated tokens.
    best = out.sequences[0]
    total = sum(float(hf_next_logprobs(hf, best.tokens[:i])[best.tokens[i]])
                for i in range(len(prompt), len(best.tokens)))
    assert best.cum_logprob == pytest.approx(total, abs=1e-4)
    # At least as likely as greedy, and no better than a brute-force search over the same
    # top-8 candidates at every step.
    greedy = llm.generate({"prompt_token_ids": prompt},
                          SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                         logprobs=0), use_tqdm=False)[0].outputs[0]
    assert best.cum_logprob >= greedy.cumulative_logprob - 1e-6
    brute = -math.inf
    level = [(list(prompt), 0.0)]
    for _ in range(3):
        nxt = []
        for tokens, cum in level:
            top = torch.topk(hf_next_logprobs(hf, tokens), 8)
            nxt += [(tokens + [t], cum + v) for v, t in zip(top.values.tolist(),
                                                            top.indices.tolist())]
        level = nxt
    brute = max(cum for _, cum in level)
    assert best.cum_logprob <= brute + 1e-6
    llm.engine.block_manager.check_no_leak()


def test_eos_beams_complete(llm):
    eos = min(llm.engine.eos_token_ids)
    # Bias nothing: just check that EOS-ended beams are kept as finished and scored
    # without the EOS token (vLLM's rule).
    assert beam_search_score([1, 2, eos], -2.0, {eos}, 1.0) == pytest.approx(-1.0)
    assert beam_search_score([1, 2, 3], -3.0, {eos}, 2.0) == pytest.approx(-3.0 / 9)
    out = llm.beam_search("hello", BeamSearchParams(beam_width=2, max_tokens=2))[0]
    assert 1 <= len(out.sequences) <= 2
    assert all(s.finish_reason in ("stop", "length") for s in out.sequences)


@pytest.mark.parametrize("field, kwargs", [
    ("beam_width", dict(beam_width=0, max_tokens=3)),
    ("beam_width", dict(beam_width=11, max_tokens=3)),
    ("beam_width", dict(beam_width="2", max_tokens=3)),
    ("max_tokens", dict(beam_width=2, max_tokens=0)),
    ("max_tokens", dict(beam_width=2, max_tokens=1.5)),
    ("length_penalty", dict(beam_width=2, max_tokens=3, length_penalty=float("nan"))),
    ("ignore_eos", dict(beam_width=2, max_tokens=3, ignore_eos="yes")),
])
def test_invalid_params_rejected(field, kwargs):
    with pytest.raises(ValueError, match=field):
        BeamSearchParams(**kwargs)


def test_params_frozen_and_checked_by_llm(llm):
    params = BeamSearchParams(beam_width=2, max_tokens=3)
    with pytest.raises(Exception):
        params.beam_width = 3
    with pytest.raises(ValueError, match="params"):
        llm.beam_search("hi", SamplingParams())
